"""Batches of samples with different token and tile counts: right padding and padding masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pathchat.model.connectors.positions import stack_slide_sizes
from pathchat.model.conversation import IGNORE_INDEX

__all__ = ["PathChatCollator"]


@dataclass
class PathChatCollator:
    """Pads tokens (right, for training) and tiles (with ``tile_mask``) to the longest in the batch.

    ``sample_ids`` stays a list of record ids so a bad loss can name the samples it came from.
    ``pad_to_multiple_of`` rounds the token length up (tensor-core friendly shapes on GPU).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        length = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        b = len(items)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[i, :n] = it["input_ids"]
            labels[i, :n] = it["labels"]
            attention_mask[i, :n] = 1

        features, coords, tile_mask = pad_tiles([it["tile_features"] for it in items],
                                                [it.get("tile_coords") for it in items],
                                                [str(it["id"]) for it in items])
        segmented = [it.get("segment_ids") for it in items]
        position_ids = None
        if any(seg is not None for seg in segmented):
            attention_mask, position_ids = isolated_attention(segmented, attention_mask)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            **({"position_ids": position_ids} if position_ids is not None else {}),
            "labels": labels,
            "tile_features": features,
            "tile_coords": coords,
            "tile_mask": tile_mask,
            "slide_size_um": stack_slide_sizes([it.get("slide_size_um") for it in items]),
            "sample_ids": [it["id"] for it in items],
        }


def pad_tiles(features: Sequence[Tensor], coords: Sequence[Tensor | None],
              names: Sequence[str] | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Right-pad slides of different tile counts into one batch (training and inference share it).

    Args:
        features: per slide `[n_i, d]` tile features.
        coords: per slide `[n_i, 2]` tile positions, or None (all or none must have them).
        names: per slide a name for error messages (sample ids).
    Returns:
        (`[b, n_max, d]` features, `[b, n_max, 2]` float32 coords or None, `[b, n_max]` bool tile_mask).
    Raises:
        ValueError: feature widths differ, or only some slides have coordinates (naming them).
    """
    b = len(features)
    names = list(names) if names is not None else [str(i) for i in range(b)]
    n_tiles = max(int(f.shape[0]) for f in features)
    dim = int(features[0].shape[1])
    out = torch.zeros((b, n_tiles, dim), dtype=features[0].dtype)
    tile_mask = torch.zeros((b, n_tiles), dtype=torch.bool)
    with_coords = [c is not None for c in coords]
    if any(with_coords) and not all(with_coords):
        missing = [name for name, c in zip(names, with_coords, strict=True) if not c]
        raise ValueError(f"some slides in the batch have tile coordinates and some do not: {missing}")
    out_coords = torch.zeros((b, n_tiles, 2), dtype=torch.float32) if all(with_coords) else None
    for i, f in enumerate(features):
        if int(f.shape[1]) != dim:
            raise ValueError(f"sample {names[i]!r} has feature width {f.shape[1]}, the batch {dim}")
        n = int(f.shape[0])
        out[i, :n] = f
        tile_mask[i, :n] = True
        if out_coords is not None:
            c = coords[i]
            assert c is not None
            out_coords[i, :n] = c
    return out, out_coords, tile_mask


def isolated_attention(segment_ids: Sequence[Tensor | None], padding_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The `[b, 1, L, L]` boolean attention mask (True = may attend) and `[b, L]` position ids of
    records packed with `isolate_records`.

    A token sees the earlier tokens of the shared prefix (segment 0) and of its own segment, never
    another segment's; positions restart after the prefix, so each segment sits exactly where it
    would in a sequence of its own. Rows without segment ids (None) are plain causal sequences.
    Padding rows see only themselves, which keeps the softmax finite.
    """
    b, length = padding_mask.shape
    seg = torch.zeros(b, length, dtype=torch.long)
    for i, s in enumerate(segment_ids):
        if s is not None:
            seg[i, : len(s)] = s
    real = padding_mask.bool()
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)  # [b, query, key]
    mask = causal & same & real[:, None, :] & real[:, :, None]
    mask |= torch.eye(length, dtype=torch.bool)[None] & ~real[:, :, None]
    prefix = ((seg == 0) & real).sum(dim=1, keepdim=True)  # the prefix is the first tokens of a row
    within = torch.zeros_like(seg)
    for r in range(1, int(seg.max()) + 1):
        in_r = seg == r
        within += (in_r.long().cumsum(dim=1) - 1) * in_r
    positions = torch.where(seg == 0, torch.arange(length).expand(b, -1), prefix + within)
    plain = [i for i, s in enumerate(segment_ids) if s is None]
    positions[plain] = torch.arange(length)
    return mask[:, None], positions
