"""Connectors: any number of tile features in, a fixed `k` LLM tokens plus per-tile relevance out.

- `base.py`: `ConnectorOutput`, the `Connector` contract, `ConnectorConfig` (type-tagged).
- `positions.py`: slide-relative µm coordinates, Fourier positions, the coarse grid and its pooling.
- `attention.py`: the query transformer (self-attention, masked cross-attention to tiles, FFN).
- `scale_invariant.py`: the default, grid + latent queries over µm-positioned tiles.
- `mlp.py`, `pool.py`, `resampler.py`: baselines (SlideChat, WSI-LLaVA-like pooling, Perceiver).
- `registry.py`: `CONNECTORS` and `build_connector`.
"""

from pathchat.model.connectors.base import Connector, ConnectorConfig, ConnectorOutput
from pathchat.model.connectors.mlp import MLPConfig, MLPConnector, sample_tile_indices
from pathchat.model.connectors.pool import PoolConfig, PoolConnector
from pathchat.model.connectors.registry import CONNECTORS, DEFAULT_CONNECTOR, build_connector
from pathchat.model.connectors.resampler import ResamplerConfig, ResamplerConnector
from pathchat.model.connectors.scale_invariant import ScaleInvariantConfig, ScaleInvariantConnector

__all__ = [
    "CONNECTORS",
    "DEFAULT_CONNECTOR",
    "Connector",
    "ConnectorConfig",
    "ConnectorOutput",
    "MLPConfig",
    "MLPConnector",
    "PoolConfig",
    "PoolConnector",
    "ResamplerConfig",
    "ResamplerConnector",
    "ScaleInvariantConfig",
    "ScaleInvariantConnector",
    "build_connector",
    "sample_tile_indices",
]
