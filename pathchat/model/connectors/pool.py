"""Baseline: WSI-LLaVA-like spatial pooling of tile features to a g x g grid, then an MLP.

Cells tile the tissue's bounding box in µm (or the whole slide, in the "slide" frame); an empty
cell gets a learned token. Cheap and
parameter-light: it shows what attention adds over plain spatial averaging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pathchat.model.connectors.base import (
    Connector,
    ConnectorConfig,
    ConnectorOutput,
    check_inputs,
    normalise_relevance,
    tile_projection,
)
from pathchat.model.connectors.positions import (
    check_position_frame,
    frame_coords_um,
    grid_cells,
    masked_grid_mean,
)


@dataclass
class PoolConfig(ConnectorConfig):
    """Spatial mean pooling; `k = grid_size**2`.

    Attributes:
        type: registry tag, always "pool".
        grid_size: g; the g x g cells are the output tokens, row-major.
        position_frame: "tissue" (cells over the tissue's bounding box) or "slide" (over the slide's
            size, `slide_size_um`).
    """

    type: str = "pool"
    grid_size: int = 12
    position_frame: str = "tissue"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.type != "pool":
            raise ValueError(f"PoolConfig.type must be 'pool', got {self.type!r}")
        if self.grid_size < 1:
            raise ValueError(f"grid_size must be >= 1, got {self.grid_size}")
        check_position_frame(self.position_frame)

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2


class PoolConnector(Connector):
    """Mask-aware cell means of the raw features -> Linear, GELU, Linear; empty cells -> learned token."""

    config: PoolConfig

    config_class = PoolConfig

    def __init__(self, config: PoolConfig, feature_dim: int, llm_dim: int):
        super().__init__(config)
        self.mlp = tile_projection(feature_dim, llm_dim, config.feature_noise, hidden_dim=llm_dim)
        self.empty_token = nn.Parameter(torch.randn(llm_dim) * 0.02)

    def forward(self, tile_features: Tensor, tile_coords_um: Tensor | None, tile_mask: Tensor | None,
                tile_scale: Tensor | None = None, slide_size_um: Tensor | None = None) -> ConnectorOutput:
        """`[b, n, d_enc]` -> `[b, g*g, d_llm]`.

        token_relevance: an occupied cell's token weighs its tiles 1/count each; an empty cell's
        token is uniform over all valid tiles. relevance averages the occupied cells' rows.
        Without coordinates every tile falls in cell 0.
        """
        tile_mask, _ = check_inputs(tile_features, tile_coords_um, tile_mask, tile_scale)
        g2 = self.num_tokens
        rel_um, extent_um = frame_coords_um(tile_coords_um, tile_mask, self.config.position_frame, slide_size_um)
        cells = grid_cells(rel_um, extent_um, self.config.grid_size)
        features = tile_features.to(self.empty_token.dtype)
        pooled, counts = masked_grid_mean(features, cells, tile_mask, g2)  # [b, G, d_enc], [b, G]
        occupied = counts > 0
        tokens = torch.where(occupied[..., None], self.mlp(pooled), self.empty_token)

        share = tile_mask / counts.gather(1, cells).clamp_min(1)  # [b, n]: 1 / tiles in own cell
        token_relevance = torch.zeros(*counts.shape, tile_mask.shape[1], dtype=torch.float32,
                                      device=tile_features.device)
        token_relevance.scatter_(1, cells[:, None, :], share[:, None, :].float())
        uniform = tile_mask.float() / tile_mask.sum(dim=1, keepdim=True)
        token_relevance = torch.where(occupied[..., None], token_relevance, uniform[:, None, :])
        relevance = (token_relevance * occupied[..., None]).sum(dim=1)
        return ConnectorOutput(tokens=tokens, relevance=normalise_relevance(relevance, tile_mask),
                               token_relevance=token_relevance)
