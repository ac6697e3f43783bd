"""Batches of samples with different token and tile counts: right padding and padding masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

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

        n_tiles = max(int(it["tile_features"].shape[0]) for it in items)
        dim = int(items[0]["tile_features"].shape[1])
        features = torch.zeros((b, n_tiles, dim), dtype=items[0]["tile_features"].dtype)
        tile_mask = torch.zeros((b, n_tiles), dtype=torch.bool)
        with_coords = [it.get("tile_coords") is not None for it in items]
        if any(with_coords) and not all(with_coords):
            missing = [it["id"] for it, c in zip(items, with_coords, strict=True) if not c]
            raise ValueError(f"some slides in the batch have tile coordinates and some do not: {missing}")
        coords = torch.zeros((b, n_tiles, 2), dtype=torch.float32) if all(with_coords) else None
        for i, it in enumerate(items):
            f = it["tile_features"]
            if int(f.shape[1]) != dim:
                raise ValueError(f"sample {it['id']!r} has feature width {f.shape[1]}, the batch {dim}")
            n = int(f.shape[0])
            features[i, :n] = f
            tile_mask[i, :n] = True
            if coords is not None:
                coords[i, :n] = it["tile_coords"]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "tile_features": features,
            "tile_coords": coords,
            "tile_mask": tile_mask,
            "sample_ids": [it["id"] for it in items],
        }
