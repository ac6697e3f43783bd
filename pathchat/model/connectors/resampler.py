"""Baseline: a Perceiver/Flamingo-style resampler, k learned latents cross-attending to the tiles.

No positions and no spatial queries: it shows what the scale-invariant connector's grid view and
µm positions add. Relevance comes from the last layer's cross-attention, as there.
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


@dataclass
class ResamplerConfig(ConnectorConfig):
    """Learned-query resampler; `k = num_latents`.

    Attributes:
        type: registry tag, always "resampler".
        num_latents: k learned queries, one output token each.
        hidden_dim: width of queries and tile memory.
        num_heads: attention heads (must divide hidden_dim).
        num_kv_heads: key/value heads of the cross-attention (must divide num_heads); fewer than
            num_heads shrinks the per-tile key/value projection, the main cost at 10^4+ tiles.
        num_layers: query blocks (self-attention, cross-attention to tiles, feed-forward).
        ffn_ratio: feed-forward width as a multiple of hidden_dim.
    """

    type: str = "resampler"
    num_latents: int = 128
    hidden_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    num_layers: int = 2
    ffn_ratio: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.type != "resampler":
            raise ValueError(f"ResamplerConfig.type must be 'resampler', got {self.type!r}")
        if self.num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {self.num_latents}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")

    @property
    def num_tokens(self) -> int:
        return self.num_latents


class ResamplerConnector(Connector):
    """k latents -> query transformer over projected tiles -> LLM width."""

    config: ResamplerConfig

    config_class = ResamplerConfig

    def __init__(self, config: ResamplerConfig, feature_dim: int, llm_dim: int):
        super().__init__(config)
        d = config.hidden_dim
        self.tile_proj = tile_projection(feature_dim, d, config.feature_noise)
        self.latents = nn.Parameter(torch.randn(config.num_latents, d) * 0.02)
        self.transformer = QueryTransformer(d, config.num_heads, config.num_layers, config.ffn_ratio,
                                            num_kv_heads=config.num_kv_heads)
        self.out_proj = nn.Linear(d, llm_dim)

    def forward(self, tile_features: Tensor, tile_coords_um: Tensor | None, tile_mask: Tensor | None,
                tile_scale: Tensor | None = None, slide_size_um: Tensor | None = None) -> ConnectorOutput:
        """`[b, n, d_enc]` -> `[b, k, d_llm]`; coordinates and scale are ignored."""
        tile_mask, _ = check_inputs(tile_features, tile_coords_um, tile_mask, tile_scale)
        memory = self.tile_proj(tile_features.to(self.out_proj.weight.dtype))
        queries = self.latents.expand(tile_features.shape[0], -1, -1)
        queries, token_relevance = self.transformer(queries, memory, tile_mask)
        relevance = normalise_relevance(token_relevance.mean(dim=1), tile_mask)
        return ConnectorOutput(tokens=self.out_proj(queries), relevance=relevance,
                               token_relevance=token_relevance)
