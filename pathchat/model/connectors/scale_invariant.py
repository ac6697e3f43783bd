"""The default connector: a coarse spatial view of the slide plus learned latents query all tiles.

Like PA-LLaVA's connector at gigapixel scale: `grid_size**2` queries are tile features pooled on a
grid (what is where), `num_latents` learned queries gather the rest, and every layer cross-attends
to all tiles (memory O(k * n)). Tile positions are Fourier-encoded in micrometres, so tokens do not
depend on scanner resolution. In the default "tissue" frame the grid spans the tissue's bounding box
and tokens do not depend on where the tissue lies on the glass either; the "slide" frame spans the
whole slide instead, for models that must answer where on the slide something is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pathchat.model.connectors.attention import QueryTransformer
from pathchat.model.connectors.base import (
    Connector,
    ConnectorConfig,
    ConnectorOutput,
    check_inputs,
    normalise_relevance,
    tile_projection,
)
from pathchat.model.connectors.positions import (
    FourierPositions,
    check_position_frame,
    frame_coords_um,
    grid_cells,
    masked_grid_mean,
)


@dataclass
class ScaleInvariantConfig(ConnectorConfig):
    """Scale-invariant connector; `k = grid_size**2 + num_latents` tokens.

    Attributes:
        type: registry tag, always "scale_invariant".
        grid_size: g; the coarse view has g x g query tokens (cells of the frame's extent).
        num_latents: learned query tokens added to the grid queries.
        hidden_dim: width of queries and tile memory.
        num_heads: attention heads (must divide hidden_dim).
        num_kv_heads: key/value heads of the cross-attention (must divide num_heads); fewer than
            num_heads shrinks the per-tile key/value projection, the main cost at 10^4+ tiles.
        num_layers: query blocks (self-attention, cross-attention to tiles, feed-forward).
        ffn_ratio: feed-forward width as a multiple of hidden_dim.
        num_frequencies: Fourier frequencies per axis for tile positions.
        min_wavelength_um: shortest positional wavelength, in µm.
        max_wavelength_um: longest positional wavelength, in µm.
        num_scales: magnifications distinguished by a learned scale embedding (tile_scale values).
        position_frame: "tissue" (positions and grid relative to the tissue's bounding box:
            placement-invariant) or "slide" (on the glass, grid over the slide's size: needs
            `slide_size_um` at every call to mean the same thing on every slide).
        local_grid: each grid token cross-attends only to the tiles of its own cell (an empty cell's
            token takes nothing from the tiles), so it says what is in that cell and nothing else;
            off, grid tokens attend to every tile like the latents.
        grid_self_attention: grid tokens attend to one another in the query self-attention. Off,
            each grid token sees only itself there (latents still see every token): with
            `local_grid`, a token then holds its own cell's content and no other cell's, so the LLM
            cannot find a class in the wrong cell's token. (On the built-in recipe it did not raise
            location accuracy: data_recipes/synthetic/README.md.)
        per_token_output: each output token has its own projection into the LLM's space (else one is
            shared). A token's content then lands in a subspace of its own, so the cell and what it
            holds are bound in the vector itself: a sum over the tokens (attention that does not pick
            one) still says which cell held what, where with a shared projection it only says which
            classes and which cells. (There, with grid_self_attention off and more location questions: location
            64.6% against 60.4%, one run each.)
        grid_total_count: grid tokens also carry the slide's total tile count (log), as the latents do.
            Without latents and with `grid_self_attention` off, no token holds the total: the LLM has to
            add the cells' log counts to tell how much tissue there is. On the built-in recipe it
            named the amount by the number of occupied cells instead (data_recipes/synthetic/README.md).
    """

    type: str = "scale_invariant"
    grid_size: int = 8
    num_latents: int = 64
    hidden_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    num_layers: int = 2
    ffn_ratio: float = 4.0
    num_frequencies: int = 16
    min_wavelength_um: float = 32.0
    max_wavelength_um: float = 32_000.0
    num_scales: int = 2
    position_frame: str = "tissue"
    local_grid: bool = False
    grid_self_attention: bool = True
    per_token_output: bool = False
    grid_total_count: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.type != "scale_invariant":
            raise ValueError(f"ScaleInvariantConfig.type must be 'scale_invariant', got {self.type!r}")
        if self.grid_size < 1 or self.num_latents < 0:
            raise ValueError(f"grid_size must be >= 1 and num_latents >= 0, got {self.grid_size}, {self.num_latents}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if not 0 < self.min_wavelength_um <= self.max_wavelength_um:
            raise ValueError("min_wavelength_um must be > 0 and <= max_wavelength_um")
        check_position_frame(self.position_frame)

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2 + self.num_latents


class ScaleInvariantConnector(Connector):
    """Grid + latent queries cross-attending to position-encoded tiles; relevance from the last layer."""

    config: ScaleInvariantConfig

    config_class = ScaleInvariantConfig

    def __init__(self, config: ScaleInvariantConfig, feature_dim: int, llm_dim: int):
        super().__init__(config)
        d = config.hidden_dim
        self.tile_proj = tile_projection(feature_dim, d, config.feature_noise)
        self.positions = FourierPositions(config.num_frequencies, config.min_wavelength_um,
                                          config.max_wavelength_um, d, num_scales=config.num_scales)
        self.cell_embedding = nn.Parameter(torch.randn(config.grid_size**2, d) * 0.02)
        self.empty_cell = nn.Parameter(torch.zeros(d))
        self.latents = nn.Parameter(torch.randn(config.num_latents, d) * 0.02)
        # Averages forget how much tissue there is; log tile counts (per cell for the grid tokens, plus
        # the slide's with `grid_total_count`; the slide's for the latents) put extent back: into the queries, and again into the output
        # tokens, where attention has not diluted them.
        num_counts = 2 if config.grid_total_count else 1  # (own count, slide total) per token
        self.count_proj = nn.Linear(num_counts, d)
        self.count_out = nn.Linear(num_counts, d)
        self.transformer = QueryTransformer(d, config.num_heads, config.num_layers, config.ffn_ratio,
                                            num_kv_heads=config.num_kv_heads)
        # Which token is which (grid cell r, c or latent j), added after the cross-attention: attention
        # mixes the cell identity into the content, and the LLM's own positions cannot name a slide
        # token when the text after it varies in length. At LayerNorm scale, so it is read from the start.
        self.token_embedding = nn.Parameter(torch.randn(config.num_tokens, d))
        if config.per_token_output:  # nn.Linear's initialisation, one matrix per token
            bound = d**-0.5
            self.token_out = nn.Parameter(torch.empty(config.num_tokens, d, llm_dim).uniform_(-bound, bound))
            self.token_out_bias = nn.Parameter(torch.empty(config.num_tokens, llm_dim).uniform_(-bound, bound))
        else:
            self.out_proj = nn.Linear(d, llm_dim)

    def forward(self, tile_features: Tensor, tile_coords_um: Tensor | None, tile_mask: Tensor | None,
                tile_scale: Tensor | None = None, slide_size_um: Tensor | None = None) -> ConnectorOutput:
        """`[b, n, d_enc]` tiles -> `[b, k, d_llm]` tokens, relevance `[b, n]`, token_relevance `[b, k, n]`."""
        tile_mask, tile_scale = check_inputs(tile_features, tile_coords_um, tile_mask, tile_scale)
        if int(tile_scale.max()) >= self.config.num_scales or int(tile_scale.min()) < 0:
            raise ValueError(f"tile_scale values must be in [0, {self.config.num_scales})")
        b = tile_features.shape[0]
        g = self.config.grid_size
        content = self.tile_proj(tile_features.to(self.token_embedding.dtype))  # [b, n, d]
        rel_um, extent_um = frame_coords_um(tile_coords_um, tile_mask, self.config.position_frame, slide_size_um)
        memory = content + self.positions(rel_um, tile_scale)  # positions include the scale embedding

        cells = grid_cells(rel_um, extent_um, g)  # [b, n]
        pooled, counts = masked_grid_mean(content, cells, tile_mask, g * g)
        grid_queries = torch.where(counts[..., None] > 0, pooled, self.empty_cell) + self.cell_embedding
        log_counts = torch.log1p(counts.to(content.dtype))[..., None]  # [b, g*g, 1]
        total = torch.log1p(tile_mask.sum(dim=1, keepdim=True).to(content.dtype))[..., None]  # [b, 1, 1]
        token_counts = torch.cat([log_counts, total.expand(-1, self.config.num_latents, -1)], dim=1)  # [b, k, 1]
        if self.config.grid_total_count:
            token_counts = torch.cat([token_counts, total.expand(-1, self.config.num_tokens, -1)], dim=-1)
        queries = torch.cat([grid_queries, self.latents.expand(b, -1, -1)], dim=1) + self.count_proj(token_counts)

        cross_mask, gate = tile_mask, None
        if self.config.local_grid:
            own = (cells[:, None, :] == torch.arange(g * g, device=cells.device)[None, :, None]) & tile_mask[:, None, :]
            # An empty cell has no tile to attend to: it attends to all of them and keeps nothing (gate 0).
            occupied = counts > 0  # [b, g*g]
            own = torch.where(occupied[..., None], own, tile_mask[:, None, :])
            cross_mask = torch.cat([own, tile_mask[:, None, :].expand(-1, self.config.num_latents, -1)], dim=1)
            gate = torch.cat([occupied, occupied.new_ones(b, self.config.num_latents)], dim=1).float()
        self_mask = None
        if not self.config.grid_self_attention:
            k = self.config.num_tokens
            self_mask = torch.ones(k, k, dtype=torch.bool, device=queries.device)
            self_mask[: g * g] = torch.eye(g * g, k, dtype=torch.bool, device=queries.device)
        queries, token_relevance = self.transformer(queries, memory, cross_mask, gate, self_mask)
        hidden = queries + self.token_embedding + self.count_out(token_counts)
        if self.config.per_token_output:
            tokens = torch.einsum("bkd,kde->bke", hidden, self.token_out) + self.token_out_bias
        else:
            tokens = self.out_proj(hidden)
        relevance = normalise_relevance(token_relevance.mean(dim=1), tile_mask)
        return ConnectorOutput(tokens=tokens, relevance=relevance, token_relevance=token_relevance)
