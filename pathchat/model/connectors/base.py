"""The connector contract: tile features of any count in, a fixed number `k` of LLM tokens out.

Every connector also says how much each tile contributed (`relevance`), which the UI and the
reports use to show the evidence behind an answer. Configs are typed dataclasses whose `type`
tag is saved with the checkpoint and dispatched through the registry when loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput


@dataclass
class ConnectorOutput(ModelOutput):
    """What a connector returns.

    A transformers ``ModelOutput`` (a dict as well as a dataclass), so DeepSpeed ZeRO-3 finds the
    tensors in it and re-gathers the connector's partitioned weights for the backward pass.

    Attributes:
        tokens: `[b, k, d_llm]` slide tokens that replace the `<slide>` placeholders.
        relevance: `[b, n]` float, >= 0, sums to 1 over each slide's valid tiles, exactly 0 on padding.
        token_relevance: `[b, k, n]` each output token's weights over tiles (each row sums to 1 over
            valid tiles), so relevance can be re-weighted by how much an answer attended to each token.
    """

    tokens: Tensor = None  # type: ignore[assignment]  # ModelOutput fields need defaults
    relevance: Tensor = None  # type: ignore[assignment]
    token_relevance: Tensor | None = None


@dataclass
class ConnectorConfig:
    """Base of the connector configs; each subclass starts with a fixed `type` tag.

    Attributes:
        feature_noise: standard deviation of Gaussian noise added to the standardised tile features
            while the connector trains (never in eval mode), in units of each dimension's spread
            over the training slides. Tile features are fixed per slide, so without it a connector
            can tell training slides apart by detail no new slide shares; 0 turns it off.
    """

    type: str = ""
    feature_noise: float = 0.0

    def __post_init__(self) -> None:
        if not self.feature_noise >= 0:
            raise ValueError(f"feature_noise must be >= 0, got {self.feature_noise}")

    @property
    def num_tokens(self) -> int:
        """How many slide tokens a connector of this config outputs (each subclass says)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-safe) holding the `type` tag and every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConnectorConfig:
        """Rebuild a config from `to_dict` output, dispatching on `d["type"]` through the registry.

        Raises:
            ValueError: unknown `type` (the message lists the known ones), a `type` that does not
                match the subclass this was called on, or unknown fields.
        """
        from pathchat.model.connectors.registry import CONNECTORS  # the registry imports this module

        if "type" not in d:
            raise ValueError(f"connector config has no 'type'; known types: {sorted(CONNECTORS)}")
        name = d["type"]
        if name not in CONNECTORS:
            raise ValueError(f"unknown connector type {name!r}; known types: {sorted(CONNECTORS)}")
        config_cls = CONNECTORS[name][0]
        if cls is not ConnectorConfig and not issubclass(config_cls, cls):
            raise ValueError(f"config type {name!r} is not a {cls.__name__}")
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown fields for connector {name!r}: {unknown}; known: {sorted(known)}")
        return config_cls(**d)


class Connector(nn.Module):
    """Base class: `forward(tile_features, tile_coords_um, tile_mask, tile_scale, slide_size_um) -> ConnectorOutput`.

    Inputs (shared by every connector):
        tile_features: `[b, n, d_enc]` float.
        tile_coords_um: `[b, n, 2]` float, each tile's top-left (x, y) in micrometres
            (level-0 pixels x mpp, computed by the caller), or None when unknown.
        tile_mask: `[b, n]` bool, True for real tiles; None means all real.
        tile_scale: `[b, n]` long, 0 = primary magnification, 1 = the optional coarser one; None = all 0.
        slide_size_um: `[b, 2]` float, (width, height) of the scanned slide in micrometres, or None;
            read only by connectors whose `position_frame` is "slide".
    """

    config_class: ClassVar[type[ConnectorConfig]] = ConnectorConfig
    num_tokens: int

    def __init__(self, config: ConnectorConfig) -> None:
        """Every connector keeps its config (its type tag is saved in checkpoints) and its fixed token count."""
        super().__init__()
        self.config = config
        self.num_tokens = config.num_tokens

    def forward(self, tile_features: Tensor, tile_coords_um: Tensor | None, tile_mask: Tensor | None,
                tile_scale: Tensor | None = None, slide_size_um: Tensor | None = None) -> ConnectorOutput:
        raise NotImplementedError


class FeatureStandardizer(nn.Module):
    """Per-dimension ``(x - mean) / std`` with the encoder's feature statistics on the training slides.

    Encoder features share a large common component (every tile looks like "tissue"); what tells
    tiles apart is a small per-dimension variation, which a freshly initialised connector barely
    sees. Standardising with dataset statistics puts that variation at unit scale. The statistics
    are buffers, saved with the weights, so inference standardises exactly as training did. The
    identity until ``set_feature_statistics`` is called.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, dim: int, noise_std: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.noise_std = noise_std  # training-time augmentation (ConnectorConfig.feature_noise)

    def forward(self, x: Tensor) -> Tensor:
        z = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.training and self.noise_std > 0:
            z = z + self.noise_std * torch.randn_like(z)
        return z

    def extra_repr(self) -> str:
        return f"dim={self.mean.shape[0]}, noise_std={self.noise_std}"


def tile_projection(feature_dim: int, out_dim: int, noise_std: float = 0.0, hidden_dim: int | None = None
                    ) -> nn.Sequential:
    """Every connector's tile input: dataset statistics, per-tile LayerNorm, then a linear map to `out_dim`
    (with `hidden_dim`, a two-layer GELU MLP through it). `[.., d_enc]` -> `[.., out_dim]`.

    Encoders differ in feature scale by orders of magnitude; with both normalisations, one initialisation
    and learning rate fit them all. ``noise_std``: see ``ConnectorConfig.feature_noise``.
    """
    layers: list[nn.Module] = [FeatureStandardizer(feature_dim, noise_std), nn.LayerNorm(feature_dim)]
    if hidden_dim is None:
        layers.append(nn.Linear(feature_dim, out_dim))
    else:
        layers += [nn.Linear(feature_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)


def set_feature_statistics(connector: nn.Module, mean: Tensor, std: Tensor, min_std: float = 1e-6) -> None:
    """Load per-dimension feature statistics into every standardiser of a connector."""
    layers = [m for m in connector.modules() if isinstance(m, FeatureStandardizer)]
    if not layers:
        raise ValueError(f"{type(connector).__name__} has no FeatureStandardizer")
    for layer in layers:
        if tuple(mean.shape) != tuple(layer.mean.shape) or tuple(std.shape) != tuple(layer.std.shape):
            raise ValueError(f"feature statistics of shape {tuple(mean.shape)} do not fit a connector for "
                             f"{layer.mean.shape[0]}-dimensional features")
        with torch.no_grad():
            layer.mean.copy_(mean.to(layer.mean))
            layer.std.copy_(std.to(layer.std).clamp_min(min_std))


def check_inputs(tile_features: Tensor, tile_coords_um: Tensor | None, tile_mask: Tensor | None,
                 tile_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """Validate the shared inputs and return `(tile_mask [b, n] bool, tile_scale [b, n] long)`.

    Raises:
        ValueError: wrong ranks or shapes, or a slide with no valid tile (its attention is undefined).
    """
    if tile_features.ndim != 3:
        raise ValueError(f"tile_features must be [b, n, d_enc], got shape {tuple(tile_features.shape)}")
    b, n, _ = tile_features.shape
    if n == 0:
        raise ValueError("tile_features has no tiles (n = 0)")
    if tile_coords_um is not None and tuple(tile_coords_um.shape) != (b, n, 2):
        raise ValueError(f"tile_coords_um must be [{b}, {n}, 2], got {tuple(tile_coords_um.shape)}")
    if tile_mask is None:
        tile_mask = torch.ones(b, n, dtype=torch.bool, device=tile_features.device)
    elif tuple(tile_mask.shape) != (b, n):
        raise ValueError(f"tile_mask must be [{b}, {n}], got {tuple(tile_mask.shape)}")
    tile_mask = tile_mask.bool()
    if not bool(tile_mask.any(dim=1).all()):
        raise ValueError("every slide needs at least one valid tile (a tile_mask row is all False)")
    if tile_scale is None:
        tile_scale = torch.zeros(b, n, dtype=torch.long, device=tile_features.device)
    elif tuple(tile_scale.shape) != (b, n):
        raise ValueError(f"tile_scale must be [{b}, {n}], got {tuple(tile_scale.shape)}")
    return tile_mask, tile_scale.long()


def normalise_relevance(weights: Tensor, tile_mask: Tensor) -> Tensor:
    """`[b, n]` non-negative weights -> exactly 0 on padding and summing to 1 over valid tiles."""
    weights = weights.float().clamp_min(0) * tile_mask
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
