"""Tile pixels for later layers: a torch Dataset of `(tile RGB uint8, level-0 coords)`.

Each DataLoader worker opens its own slide handle (OpenSlide handles are not shared across
processes). Tiles are read in grid (row-major) order, so consecutive reads hit the same source tiles
and the slide layer's direct JPEG decoding serves tile-aligned grids without compositing. A corrupt
tile is reported with its coordinates and skipped; it never poisons later reads (the slide layer
reopens a handle after an error). Pixels past the slide edge are black by default, as TRIDENT and CLAM
read them (`edge_pixels="white"` composites them on white), so the same coordinates give the same
tiles, and the same features, in all three tools.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pathchat.wsi.errors import SlideError
from pathchat.wsi.grid import TileGrid
from pathchat.wsi.slide import DEFAULT_MAX_READ_PIXELS, EDGE_PIXEL_MODES, Slide, open_slide


@dataclass
class TileFailure:
    """A tile that could not be read."""

    index: int
    l0_x: int
    l0_y: int
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "l0_x": self.l0_x, "l0_y": self.l0_y, "error": self.error}


class TileDataset(Dataset):
    """Tiles of one slide at the grid's resolution.

    Items are dicts: `tile` uint8 `[tile_px, tile_px, 3]` (zeros when unreadable), `l0_coords`
    int64 `[2]`, `index` int, `error` str or None. Use `collate_tiles` to drop failed items.
    `edge_pixels` ("black" or "white") renders pixels past the slide edge and unscanned areas
    (`Slide.read_region`).
    """

    def __init__(
        self,
        slide_path: str | os.PathLike[str],
        l0_coords: np.ndarray,
        read_level: int,
        read_px: int,
        tile_px: int,
        max_read_pixels: int = DEFAULT_MAX_READ_PIXELS,
        opener: Callable[..., Slide] = open_slide,
        edge_pixels: str = "black",
    ):
        if edge_pixels not in EDGE_PIXEL_MODES:
            raise ValueError(f"{slide_path}: edge_pixels must be one of {EDGE_PIXEL_MODES}, got {edge_pixels!r}")
        self.edge_pixels = edge_pixels
        self.slide_path = os.fspath(slide_path)
        self.l0_coords = np.asarray(l0_coords, dtype=np.int64).reshape(-1, 2)
        self.read_level, self.read_px, self.tile_px = read_level, read_px, tile_px
        self.max_read_pixels = max_read_pixels
        self.opener = opener
        self._slide: Slide | None = None
        self._owner_pid = os.getpid()

    @classmethod
    def from_grid(cls, slide_path: str | os.PathLike[str], grid: TileGrid, **kwargs: Any) -> TileDataset:
        return cls(slide_path, grid.l0_coords, grid.read_level, grid.read_px, grid.tile_px, **kwargs)

    def __len__(self) -> int:
        return len(self.l0_coords)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slide"] = None  # every worker process opens its own handle
        return state

    @property
    def slide(self) -> Slide:
        # A forked DataLoader worker inherits the parent's handle, whose file offset it would share:
        # every process opens its own.
        if self._slide is None or self._owner_pid != os.getpid():
            self._slide = self.opener(self.slide_path, max_read_pixels=self.max_read_pixels)
            self._owner_pid = os.getpid()
        return self._slide

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def _item(self, index: int, tile: np.ndarray | None, error: str | None) -> dict[str, Any]:
        if tile is None:
            tile = np.zeros((self.tile_px, self.tile_px, 3), dtype=np.uint8)
        return {"tile": tile, "l0_coords": self.l0_coords[index], "index": index, "error": error}

    def _read_one(self, index: int) -> dict[str, Any]:
        x, y = (int(v) for v in self.l0_coords[index])
        try:
            region = self.slide.read_region((x, y), self.read_level, (self.read_px, self.read_px), self.edge_pixels)
        except SlideError as e:
            return self._item(index, None, e.cause)
        if self.read_px != self.tile_px:
            region = cv2.resize(region, (self.tile_px, self.tile_px), interpolation=cv2.INTER_AREA)
        return self._item(index, region, None)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._read_one(int(index))


@dataclass
class TileBatch:
    """Readable tiles of a batch and the failures among it."""

    tiles: torch.Tensor  # uint8 [b, tile_px, tile_px, 3]
    l0_coords: torch.Tensor  # int64 [b, 2]
    indices: torch.Tensor  # int64 [b], positions in the dataset
    failed: list[TileFailure] = field(default_factory=list)
    inputs: torch.Tensor | None = None  # `transform(tiles)` when the loader was given a transform


def collate_tiles(items: list[dict[str, Any]],
                  transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TileBatch:
    """DataLoader collate function that keeps good tiles and lists failed ones.

    `transform` (e.g. an encoder's preprocessing) runs here, in the loader's worker processes, on the
    whole batch of uint8 tiles, so the process running the model does not spend time on it.
    """
    good = [it for it in items if it["error"] is None]
    failed = [
        TileFailure(int(it["index"]), int(it["l0_coords"][0]), int(it["l0_coords"][1]), str(it["error"]))
        for it in items
        if it["error"] is not None
    ]
    if good:
        tiles = torch.from_numpy(np.stack([it["tile"] for it in good]))
        coords = torch.from_numpy(np.stack([it["l0_coords"] for it in good]).astype(np.int64))
        indices = torch.tensor([it["index"] for it in good], dtype=torch.int64)
    else:
        tile_px = items[0]["tile"].shape[0] if items else 0
        tiles = torch.zeros((0, tile_px, tile_px, 3), dtype=torch.uint8)
        coords = torch.zeros((0, 2), dtype=torch.int64)
        indices = torch.zeros(0, dtype=torch.int64)
    inputs = transform(tiles) if transform is not None and len(tiles) else None
    return TileBatch(tiles, coords, indices, failed, inputs)


def tile_loader(dataset: TileDataset, batch_size: int = 64, workers: int = 0, pin_memory: bool = False,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> DataLoader:
    """A DataLoader over the dataset in grid order.

    Args:
        workers: reading processes; 0 reads in this process, N >= 1 uses N DataLoader worker processes
            (so reading overlaps whatever this process does with the batches).
        transform: applied to each batch's uint8 tiles in the workers; the result is `batch.inputs`.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=functools.partial(collate_tiles, transform=transform),
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def iter_tiles(
    dataset: TileDataset, batch_size: int = 64, workers: int = 0, failures: list[TileFailure] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield `(tile RGB uint8 [h, w, 3], l0 coords int64 [2])` for every readable tile.

    Unreadable tiles are skipped and appended to `failures` when given.
    """
    for batch in tile_loader(dataset, batch_size=batch_size, workers=workers):
        if failures is not None:
            failures.extend(batch.failed)
        yield from zip(batch.tiles.numpy(), batch.l0_coords.numpy(), strict=True)
