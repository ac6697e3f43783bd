"""The connector registry: type tag -> (config class, module class), and `build_connector`."""

from __future__ import annotations

from typing import Any

from pathchat.model.connectors.base import Connector, ConnectorConfig
from pathchat.model.connectors.mlp import MLPConfig, MLPConnector
from pathchat.model.connectors.pool import PoolConfig, PoolConnector
from pathchat.model.connectors.resampler import ResamplerConfig, ResamplerConnector
from pathchat.model.connectors.scale_invariant import ScaleInvariantConfig, ScaleInvariantConnector

DEFAULT_CONNECTOR = "scale_invariant"

CONNECTORS: dict[str, tuple[type[ConnectorConfig], type[Connector]]] = {
    "scale_invariant": (ScaleInvariantConfig, ScaleInvariantConnector),
    "mlp": (MLPConfig, MLPConnector),
    "pool": (PoolConfig, PoolConnector),
    "resampler": (ResamplerConfig, ResamplerConnector),
}


def build_connector(config: ConnectorConfig | dict[str, Any], feature_dim: int, llm_dim: int) -> Connector:
    """Instantiate the connector a config names.

    Args:
        config: a config object, or its `to_dict()` form (dispatched on `"type"`).
        feature_dim: d_enc, the tile encoder's feature width.
        llm_dim: d_llm, the LLM's embedding width.

    Raises:
        ValueError: unknown type, or a config object of a class the registry does not know.
    """
    if isinstance(config, dict):
        config = ConnectorConfig.from_dict(config)
    entry = CONNECTORS.get(config.type)
    if entry is None or not isinstance(config, entry[0]):
        raise ValueError(f"no registered connector for config {config!r}; known types: {sorted(CONNECTORS)}")
    return entry[1](config, feature_dim, llm_dim)  # type: ignore[call-arg]
