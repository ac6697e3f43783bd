"""The default connector: a coarse spatial view of the slide plus learned latents query all tiles.

Like PA-LLaVA's connector at gigapixel scale: `grid_size**2` queries are tile features pooled on a
grid over the slide's bounding box (what is where), `num_latents` learned queries gather the rest,
and every layer cross-attends to all tiles (memory O(k * n)). Tile positions are Fourier-encoded in
slide-relative micrometres, so tokens do not depend on scanner resolution or slide placement.
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
    tile_normalisation,
)
from pathchat.model.connectors.positions import (
    FourierPositions,
    grid_cells,
    masked_grid_mean,
    relative_coords_um,
)


@dataclass
class ScaleInvariantConfig(ConnectorConfig):
    """Scale-invariant connector; `k = grid_size**2 + num_latents` tokens.

    Attributes:
        type: registry tag, always "scale_invariant".
        grid_size: g; the coarse view has g x g query tokens (cells of the tile bounding box).
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

    def __post_init__(self) -> None:
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

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2 + self.num_latents


class ScaleInvariantConnector(Connector):
    """Grid + latent queries cross-attending to position-encoded tiles; relevance from the last layer."""

    config_class = ScaleInvariantConfig

    def __init__(self, config: ScaleInvariantConfig, feature_dim: int, llm_dim: int):
        super().__init__()
        self.config = config
        self.num_tokens = config.num_tokens
        d = config.hidden_dim
        self.tile_proj = nn.Sequential(*tile_normalisation(feature_dim), nn.Linear(feature_dim, d))
        self.positions = FourierPositions(config.num_frequencies, config.min_wavelength_um,
                                          config.max_wavelength_um, d, num_scales=config.num_scales)
        self.cell_embedding = nn.Parameter(torch.randn(config.grid_size**2, d) * 0.02)
        self.empty_cell = nn.Parameter(torch.zeros(d))
        self.latents = nn.Parameter(torch.randn(config.num_latents, d) * 0.02)
        # Averages forget how much tissue there is; log tile counts (per cell, and of the slide for
        # the latents) put extent back into the queries.
        self.count_proj = nn.Linear(1, d)
        self.transformer = QueryTransformer(d, config.num_heads, config.num_layers, config.ffn_ratio,
                                            num_kv_heads=config.num_kv_heads)
        self.out_proj = nn.Linear(d, llm_dim)

    def forward(self, tile_features: Tensor, tile_coords_um: Tensor | None, tile_mask: Tensor | None,
                tile_scale: Tensor | None = None) -> ConnectorOutput:
        """`[b, n, d_enc]` tiles -> `[b, k, d_llm]` tokens, relevance `[b, n]`, token_relevance `[b, k, n]`."""
        tile_mask, tile_scale = check_inputs(tile_features, tile_coords_um, tile_mask, tile_scale)
        if int(tile_scale.max()) >= self.config.num_scales or int(tile_scale.min()) < 0:
            raise ValueError(f"tile_scale values must be in [0, {self.config.num_scales})")
        b = tile_features.shape[0]
        g = self.config.grid_size
        content = self.tile_proj(tile_features.to(self.out_proj.weight.dtype))  # [b, n, d]
        rel_um, extent_um = relative_coords_um(tile_coords_um, tile_mask)
        memory = content + self.positions(rel_um, tile_scale)  # positions include the scale embedding

        pooled, counts = masked_grid_mean(content, grid_cells(rel_um, extent_um, g), tile_mask, g * g)
        grid_queries = torch.where(counts[..., None] > 0, pooled, self.empty_cell) + self.cell_embedding
        log_counts = torch.log1p(counts.to(content.dtype))[..., None]  # [b, g*g, 1]
        grid_queries = grid_queries + self.count_proj(log_counts)
        total = torch.log1p(tile_mask.sum(dim=1, keepdim=True).to(content.dtype))[..., None]  # [b, 1, 1]
        latents = self.latents.expand(b, -1, -1) + self.count_proj(total)
        queries = torch.cat([grid_queries, latents], dim=1)

        queries, token_relevance = self.transformer(queries, memory, tile_mask)
        tokens = self.out_proj(queries)
        relevance = normalise_relevance(token_relevance.mean(dim=1), tile_mask)
        return ConnectorOutput(tokens=tokens, relevance=relevance, token_relevance=token_relevance)
