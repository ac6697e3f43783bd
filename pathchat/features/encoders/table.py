"""`encoders_table`: one row per registered encoder, for the `pathchat encoders` CLI verb."""

from __future__ import annotations

from typing import Any

from pathchat.features.encoders.registry import list_encoders
from pathchat.features.encoders.weights import load_weights_map, weights_available_offline


def encoders_table(weights_map: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows `{name, dim, tile_px, magnification, source, precision, offline}` in registry order.

    `offline` says whether the weights are here already (random, mapped to a local path, or in the hub
    cache); `weights_map` None reads the map named by $PATHCHAT_ENCODER_WEIGHTS. No network access.
    """
    mapping = load_weights_map() if weights_map is None else weights_map
    return [
        {"name": s.name, "dim": s.dim, "tile_px": s.tile_px, "magnification": s.magnification, "source": s.source,
         "precision": s.precision, "offline": weights_available_offline(s, mapping)}
        for s in list_encoders()
    ]
