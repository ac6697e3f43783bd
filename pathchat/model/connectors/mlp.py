"""Baseline: SlideChat-style one token per tile through a 2-layer MLP, capped at k tiles.

Above the cap a deterministic sampler, seeded by the config seed and the tile count, picks k tiles,
so training and inference see the same ones. It indexes tiles in raster order of their µm
coordinates (scale, then y, then x), which makes the output independent of input tile order;
without coordinates, or with duplicate coordinates, input order decides. Fewer tiles than k are
padded with a learned embedding, so there are always exactly k tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pathchat.model.connectors.base import (
    Connector,
    ConnectorConfig,
    ConnectorOutput,
    check_inputs,
    tile_projection,
)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a fixed, platform-independent hash."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_tile_indices(n_valid: int, k: int, seed: int) -> Tensor:
    """Which of `n_valid` tiles to keep: all when `n_valid <= k`, else k chosen by a seeded hash.

    Depends only on `(n_valid, k, seed)` and integer hashing (no RNG state, no torch version), so
    training and inference pick the same tiles on any machine.

    Returns:
        `[min(n_valid, k)]` long, sorted ascending.
    """
    if n_valid < 0 or k < 1:
        raise ValueError(f"need n_valid >= 0 and k >= 1, got n_valid={n_valid}, k={k}")
    if n_valid <= k:
        return torch.arange(n_valid, dtype=torch.long)
    base = _splitmix64(np.array([((seed & _MASK64) * 0x100000001B3 ^ n_valid) & _MASK64], dtype=np.uint64))
    keys = _splitmix64(np.arange(n_valid, dtype=np.uint64) ^ base)
    chosen = np.sort(np.argsort(keys, kind="stable")[:k])
    return torch.from_numpy(chosen.astype(np.int64))


def raster_order(tile_coords_um: Tensor | None, tile_scale: Tensor, valid_index: Tensor) -> Tensor:
    """Valid tiles of one slide sorted by (scale, y, x), stable, as indices into the slide's tiles.

    Args:
        tile_coords_um: `[n, 2]` or None (keep input order).
        tile_scale: `[n]` long.
        valid_index: `[n_valid]` long positions of the valid tiles.
    """
    if tile_coords_um is None:
        return valid_index
    order = valid_index
    # Least significant key first; each stable sort keeps the previous order among ties.
    keys = (tile_coords_um[:, 0], tile_coords_um[:, 1], tile_scale)
    for key in keys:
        order = order[torch.sort(key[order], stable=True).indices]
    return order


@dataclass
class MLPConfig(ConnectorConfig):
    """One token per tile, capped; `k = max_tiles`.

    Attributes:
        type: registry tag, always "mlp".
        max_tiles: k; slides with more valid tiles are subsampled, fewer are padded.
        seed: seed of the tile sampler (saved with the checkpoint so inference picks the same tiles).
    """

    type: str = "mlp"
    max_tiles: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.type != "mlp":
            raise ValueError(f"MLPConfig.type must be 'mlp', got {self.type!r}")
        if self.max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {self.max_tiles}")

    @property
    def num_tokens(self) -> int:
        return self.max_tiles


class MLPConnector(Connector):
    """Linear -> GELU -> Linear per sampled tile; a learned padding token fills up to k."""

    config: MLPConfig

    config_class = MLPConfig

    def __init__(self, config: MLPConfig, feature_dim: int, llm_dim: int):
        super().__init__(config)
        self.mlp = tile_projection(feature_dim, llm_dim, config.feature_noise, hidden_dim=llm_dim)
        self.padding_token = nn.Parameter(torch.randn(llm_dim) * 0.02)

    def forward(self, tile_features: Tensor, tile_coords_um: Tensor | None, tile_mask: Tensor | None,
                tile_scale: Tensor | None = None, slide_size_um: Tensor | None = None) -> ConnectorOutput:
        """`[b, n, d_enc]` -> `[b, k, d_llm]`; relevance is uniform over the tiles used.

        token_relevance: a tile's token is one-hot on that tile; padding tokens are uniform over
        the tiles used (so every row sums to 1).
        """
        tile_mask, tile_scale = check_inputs(tile_features, tile_coords_um, tile_mask, tile_scale)
        b, n, _ = tile_features.shape
        k = self.num_tokens
        device = tile_features.device
        tokens = self.padding_token.expand(b, k, -1).clone()
        token_relevance = torch.zeros(b, k, n, dtype=torch.float32, device=device)
        relevance = torch.zeros(b, n, dtype=torch.float32, device=device)
        for i in range(b):
            valid = tile_mask[i].nonzero().squeeze(1)
            coords = None if tile_coords_um is None else tile_coords_um[i]
            order = raster_order(coords, tile_scale[i], valid)
            used = order[sample_tile_indices(len(order), k, self.config.seed).to(device)]
            m = len(used)
            tokens[i, :m] = self.mlp(tile_features[i, used].to(self.padding_token.dtype))
            token_relevance[i, torch.arange(m, device=device), used] = 1.0
            token_relevance[i, m:, used] = 1.0 / m
            relevance[i, used] = 1.0 / m
        return ConnectorOutput(tokens=tokens, relevance=relevance, token_relevance=token_relevance)
