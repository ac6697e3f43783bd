"""CONCH image towers, rebuilt from timm parts so their released checkpoints load without the CONCH package.

CONCH v1 (MahmoodLab/CONCH) is a CoCa model; its image tower is a timm ViT-B/16 at 448 px whose
tokens an attentional pooler (one query, nn.MultiheadAttention) reduces to 512 values, then a
LayerNorm. TRIDENT's `conch_v1` calls `encode_image(proj_contrast=False, normalize=False)`: that is
this pooled vector *before* the contrastive projection, not L2-normalised. CONCH v1.5 (the patch
encoder in MahmoodLab/TITAN, weights in MahmoodLab/conchv1_5) is a ViT-L/16 (LayerScale) with a
pooler of separate to_q / to_kv / to_out projections giving 768 values. Parameter names match the
checkpoints (`trunk.*`, `attn_pool_contrast.*`, `ln_contrast.*`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class MultiheadAttentionPooler(nn.Module):
    """CONCH v1's pooler: learned queries attend over the trunk tokens. `[b, n, context_dim] -> [b, q, d_model]`."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.empty(n_queries, d_model))
        nn.init.normal_(self.query)
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(tokens)
        q = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(q, kv, kv, need_weights=False)[0]


class ProjectionAttentionPooler(nn.Module):
    """CONCH v1.5's pooler: bias-free q / kv / out projections, softmax(q k^T / sqrt(d_head)) v.

    `[b, n, context_dim] -> [b, q, d_model]`.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        inner = (d_model // n_head) * n_head
        self.heads = n_head
        self.query = nn.Parameter(torch.empty(n_queries, d_model))
        nn.init.normal_(self.query)
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).unsqueeze(0).expand(b, -1, -1)  # [b, q, inner]
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)  # [b, n, inner] each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [b, h, *, d_head]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchV1VisionTower(nn.Module):
    """CONCH v1 image tower: ViT-B/16 at 448 px -> attentional pool -> LayerNorm. `[b, 3, 448, 448] -> [b, 512]`."""

    def __init__(self, img_size: int = 448) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(img_size=img_size, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                       mlp_ratio=4.0, num_classes=0, dynamic_img_size=True, weight_init="skip")
        self.attn_pool_contrast = MultiheadAttentionPooler(512, 768, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # [b, 1 + n, 768], after the final norm
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


class ConchV15VisionTower(nn.Module):
    """CONCH v1.5 image tower: ViT-L/16 (LayerScale) at 448 px -> attentional pool -> LayerNorm.

    `[b, 3, 448, 448] -> [b, 768]`.
    """

    def __init__(self, img_size: int = 448) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(img_size=img_size, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                                       mlp_ratio=4.0, qkv_bias=True, init_values=1.0, num_classes=0,
                                       weight_init="skip")
        self.attn_pool_contrast = ProjectionAttentionPooler(768, 1024, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # [b, 1 + n, 1024]
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def adapt_conch_v1_state(state: dict[str, torch.Tensor], tower: nn.Module) -> dict[str, torch.Tensor]:
    """Keep the image tower of a CONCH v1 CoCa checkpoint (`visual.*`), minus the parts not run here.

    Drops the contrastive projection and caption pooler, and resamples the position embedding when the
    checkpoint's grid differs (bilinear, as CONCH's own loader does).
    """
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    unused = ("proj_contrast", "attn_pool_caption.", "ln_caption.")
    state = {k: v for k, v in state.items() if not k.startswith(unused)}
    pos = state.get("trunk.pos_embed")
    trunk: Any = tower.trunk
    if pos is not None and pos.shape != trunk.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        state["trunk.pos_embed"] = resample_abs_pos_embed(pos.float(), new_size=list(trunk.patch_embed.grid_size),
                                                          num_prefix_tokens=1, interpolation="bilinear",
                                                          antialias=False)
    return state


def dino_resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample `[1, 1 + g0*g0, d]` to `[1, 1 + grid*grid, d]` the DINO / iBOT way.

    Bicubic with scale factor (grid + 0.1) / g0, exactly what TRIDENT's CONCH v1.5 tower does at every
    forward pass at 448 px from its 224-px position embedding; done once at load time here.
    """
    n = pos_embed.shape[1] - 1
    g0 = int(math.isqrt(n))
    if g0 * g0 != n:
        raise ValueError(f"position embedding with {n} patch positions is not a square grid")
    if g0 == grid:
        return pos_embed
    d = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].float().reshape(1, g0, g0, d).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / g0
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if patch.shape[-2:] != (grid, grid):
        raise ValueError(f"resampled position grid is {tuple(patch.shape[-2:])}, expected {(grid, grid)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, d)
    return torch.cat([pos_embed[:, :1].float(), patch], dim=1)


def adapt_conch_v15_state(state: dict[str, torch.Tensor], tower: nn.Module) -> dict[str, torch.Tensor]:
    """Fit a CONCH v1.5 checkpoint (its position embedding is for 224 px) to the 448-px tower."""
    pos = state.get("trunk.pos_embed")
    trunk: Any = tower.trunk
    if pos is not None:
        state = dict(state)
        state["trunk.pos_embed"] = dino_resample_pos_embed(pos, int(trunk.patch_embed.grid_size[0]))
    return state
