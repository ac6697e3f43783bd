"""Slide id → cached tile features, with the seeded tile cap shared by training and inference."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pathchat.features.store import FeatureBag, FeatureFileError, read_features_h5
from pathchat.model.connectors.mlp import sample_tile_indices

__all__ = ["MissingFeaturesError", "SlideFeatureStore", "SlideTiles", "tiles_from_bag"]


class MissingFeaturesError(FileNotFoundError):
    """A record's slide has no feature file; the message names the slide, the folder and the record."""


@dataclass
class SlideTiles:
    """One slide's tiles as model inputs."""

    features: Tensor  # float32 [n, d]
    coords_um: Tensor | None  # float32 [n, 2], top-left in µm; None when the file has no mpp/coords
    num_tiles_in_file: int  # before the cap
    sampled: bool  # True when the cap dropped tiles
    slide_size_um: Tensor | None = None  # float32 [2], (width, height) of the slide in µm; None when unknown


def tiles_from_bag(bag: FeatureBag, max_tiles: int | None = None, sample_seed: int = 0) -> SlideTiles:
    """A feature file's contents as model inputs; above `max_tiles`, the `sample_tile_indices` subset
    that inference draws too."""
    features = torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32))
    coords_np = bag.coords_um()
    coords = torch.from_numpy(coords_np.astype(np.float32)) if coords_np is not None else None
    n = len(bag)
    sampled = max_tiles is not None and n > max_tiles
    if sampled:
        assert max_tiles is not None
        idx = sample_tile_indices(n, max_tiles, sample_seed)
        features = features[idx]
        coords = coords[idx] if coords is not None else None
    size_np = bag.slide_size_um()
    return SlideTiles(features=features, coords_um=coords, num_tiles_in_file=n, sampled=sampled,
                      slide_size_um=None if size_np is None else torch.from_numpy(size_np.astype(np.float32)))


class SlideFeatureStore:
    """Reads ``<folder>/<slide>.h5`` feature files (a ``features_<encoder>`` folder of an extract job).

    Args:
        folder: the features folder.
        max_tiles: cap on tiles per slide; above it ``sample_tile_indices(n, max_tiles, seed)`` picks
            the same tiles every time, here and at inference (None: no cap).
        sample_seed: seed of that sampler, recorded in the training config.
        cache_bytes: feature bytes kept in memory (an LRU over slides), since every epoch re-reads
            the same slides; a slide of 10k tiles x 1536 floats is 60 MB, a synthetic one 4 KB.
    """

    def __init__(self, folder: str | os.PathLike[str], max_tiles: int | None = None, sample_seed: int = 0,
                 cache_bytes: int = 1 << 30):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"features folder not found: {self.folder}")
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1 or None, got {max_tiles}")
        self.max_tiles = max_tiles
        self.sample_seed = sample_seed
        self._cache: OrderedDict[str, SlideTiles] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._dim: int | None = None

    def path(self, slide_id: str) -> Path:
        return self.folder / f"{slide_id}.h5"

    def has(self, slide_id: str) -> bool:
        return self.path(slide_id).is_file()

    def check(self, slide_id: str, record_id: str | None = None) -> None:
        """Raise ``MissingFeaturesError`` unless the slide has a feature file."""
        if not self.has(slide_id):
            who = f" (record {record_id!r})" if record_id is not None else ""
            raise MissingFeaturesError(f"no features for slide {slide_id!r}{who}: "
                                       f"{self.path(slide_id)} does not exist")

    def statistics(self, slide_ids: list[str], max_slides: int = 256, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Per-dimension mean and std of tile features over (a seeded sample of) these slides.

        Each slide weighs by its (capped) tile count; float64 sums, so any number of tiles is exact.
        """
        unique = sorted(set(slide_ids))
        if not unique:
            raise ValueError("no slides to compute feature statistics from")
        if len(unique) > max_slides:
            keep = sample_tile_indices(len(unique), max_slides, seed).tolist()
            unique = [unique[i] for i in keep]
        total = sq = None
        count = 0
        for sid in unique:
            x = self.load(sid).features.double()
            total = x.sum(0) if total is None else total + x.sum(0)
            sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
            count += x.shape[0]
        assert total is not None and sq is not None
        mean = total / count
        var = (sq / count - mean * mean).clamp_min(0)
        return mean.float(), var.sqrt().float()

    def load(self, slide_id: str, record_id: str | None = None) -> SlideTiles:
        """The slide's (capped) tiles; errors name the file and the record."""
        hit = self._cache.get(slide_id)
        if hit is not None:
            self._cache.move_to_end(slide_id)
            return hit
        self.check(slide_id, record_id)
        try:
            bag = read_features_h5(self.path(slide_id))
        except FeatureFileError as e:
            who = f" (record {record_id!r})" if record_id is not None else ""
            raise FeatureFileError(e.path, e.problem + who) from e
        if len(bag) == 0:
            raise FeatureFileError(self.path(slide_id), "holds no tiles")
        if self._dim is None:
            self._dim = bag.dim
        elif bag.dim != self._dim:
            raise FeatureFileError(self.path(slide_id), f"feature width {bag.dim} differs from the "
                                   f"{self._dim} of earlier slides in {self.folder}")
        tiles = tiles_from_bag(bag, self.max_tiles, self.sample_seed)
        size = _nbytes(tiles)
        if size <= self._cache_bytes:
            self._cache[slide_id] = tiles
            self._cached += size
            while self._cached > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= _nbytes(old)
        return tiles


def _nbytes(tiles: SlideTiles) -> int:
    n = tiles.features.element_size() * tiles.features.nelement()
    if tiles.coords_um is not None:
        n += tiles.coords_um.element_size() * tiles.coords_um.nelement()
    return int(n)
