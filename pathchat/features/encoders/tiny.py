"""Tiny random encoders for tests, demos and CI: no weights to download, same output everywhere."""

from __future__ import annotations

import torch
from torch import nn


def tiny_vit(embed_dim: int = 192, depth: int = 2, num_heads: int = 3, img_size: int = 224,
             patch_size: int = 16) -> nn.Module:
    """A genuine ViT (timm's VisionTransformer), ViT-Ti width, two blocks; returns the class token."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, num_classes=0, global_pool="token", weight_init="skip")


class TinyConvNet(nn.Module):
    """Three strided 3x3 conv + ReLU stages and a global average pool: `[b, 3, h, w] -> [b, widths[-1]]`."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for w in widths:
            layers += [nn.Conv2d(in_ch, w, kernel_size=3, stride=2, padding=1), nn.ReLU(inplace=True)]
            in_ch = w
        self.features = nn.Sequential(*layers)
        self.num_features = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))
