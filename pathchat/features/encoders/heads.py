"""Output conventions: small wrappers that turn a backbone's output into one vector per tile.

Each wrapper keeps the backbone as `self.backbone`, so a wrapper's state dict is the official
checkpoint with a `backbone.` prefix (the loader strips it back). All map a normalised float batch
`[b, 3, input_px, input_px]` to `[b, dim]`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Pooled(nn.Module):
    """The backbone already returns `[b, dim]` (timm `num_classes=0` heads, CONCH towers, tiny nets)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class ClsMeanPatch(nn.Module):
    """Concatenate the class token and the mean of patch tokens, skipping register tokens (Virchow2).

    The backbone returns all tokens `[b, num_prefix_tokens + n, d]` (timm `global_pool=""`); the first
    prefix token is the class token, the others are registers. Output `[b, 2 * d]`.
    """

    def __init__(self, backbone: nn.Module, num_prefix_tokens: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(x)
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)


class FeatureMapAvgPool(nn.Module):
    """Global average pool of a (truncated) CNN's feature map: `[b, c, h, w] -> [b, c]` (ResNet-50 layer3)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x)
        if isinstance(out, (list, tuple)):  # timm features_only returns one map per out_index
            out = out[-1]
        return out.mean(dim=(2, 3))


class HFTokens(nn.Module):
    """A transformers vision model: class token, class token + mean patch token, or its pooled output.

    `pooling`: "cls" (last_hidden_state[:, 0]), "cls+mean" (concat with the mean of tokens 1:, for
    models without registers), or "auto" (class token when tokens are returned, else pooler_output).
    """

    def __init__(self, backbone: nn.Module, pooling: str) -> None:
        super().__init__()
        if pooling not in ("cls", "cls+mean", "auto"):
            raise ValueError(f"HFTokens pooling must be 'cls', 'cls+mean' or 'auto', got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: Any = self.backbone(pixel_values=x)
        tokens = out.last_hidden_state
        if self.pooling == "auto":
            if tokens.ndim == 3:
                return tokens[:, 0]
            return out.pooler_output.flatten(1)  # CNNs: [b, c, 1, 1]
        if self.pooling == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)


class ClipImageEmbeds(nn.Module):
    """CLIP image embedding: visual projection of the pooled vision output (`CLIPModel.get_image_features`)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=x).image_embeds


def make_head(output: str, backbone: nn.Module) -> nn.Module:
    """Wrap `backbone` with the output convention named `output` (see `spec.OUTPUTS`)."""
    if output == "pooled":
        return Pooled(backbone)
    if output == "cls+mean_patch":
        return ClsMeanPatch(backbone, int(getattr(backbone, "num_prefix_tokens", 1)))
    if output == "feature_map_avg":
        return FeatureMapAvgPool(backbone)
    if output in ("hf_cls", "hf_cls+mean_patch", "hf_auto"):
        return HFTokens(backbone, {"hf_cls": "cls", "hf_cls+mean_patch": "cls+mean", "hf_auto": "auto"}[output])
    if output == "clip_image_embeds":
        return ClipImageEmbeds(backbone)
    raise ValueError(f"unknown output convention {output!r}")
