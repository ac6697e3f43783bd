"""The tile-coordinates file: one h5 per slide in TRIDENT's layout.

`coords` int64 `[n, 2]` holds level-0 (x, y) of each tile's top-left corner; attributes carry the
tiling (TRIDENT's names, CLAM's `patch_level`, `edge_pixels`) plus PathChat's provenance: the slide
fingerprint, where the mpp came from and the allow-listed slide metadata. Nothing else about the slide
is stored. The file is `patches/<slide>_patches.h5`, TRIDENT's name (`pathchat.wsi.tile_job`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

import pathchat
from pathchat.utils.atomic import atomic_path
from pathchat.wsi.grid import TileGrid
from pathchat.wsi.slide import SlideInfo


@dataclass
class TileCoords:
    """Coordinates read back from a coords h5."""

    l0_coords: np.ndarray  # int64 [n, 2]
    tissue_fraction: np.ndarray | None  # float32 [n]
    attrs: dict[str, Any]


def write_coords_h5(path: str | os.PathLike[str], grid: TileGrid, name: str, slide_info: SlideInfo,
                    fingerprint: str, mpp_source: str, extra_attrs: dict[str, Any] | None = None) -> None:
    """Write the coordinates of `grid` atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        f.create_dataset("coords", data=grid.l0_coords.astype(np.int64), dtype=np.int64)
        f.create_dataset("tissue_fraction", data=grid.tissue_fraction.astype(np.float32))
        attrs = f["coords"].attrs
        for key, value in grid.h5_attrs().items():
            attrs[key] = value
        attrs["name"] = name
        attrs["fingerprint"] = fingerprint
        attrs["mpp_source"] = mpp_source
        attrs["slide_info"] = json.dumps(slide_info.to_dict(), sort_keys=True)
        attrs["pathchat_version"] = pathchat.__version__
        for key, value in (extra_attrs or {}).items():
            attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value, sort_keys=True)


def read_coords_h5(path: str | os.PathLike[str]) -> TileCoords:
    """Read a coords h5 written by PathChat or TRIDENT (attrs on `coords`, or on the file for CLAM)."""
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise ValueError(f"{path}: no 'coords' dataset (keys: {sorted(f.keys())})")
        coords = np.asarray(f["coords"][()], dtype=np.int64).reshape(-1, 2)
        attrs = {**dict(f.attrs), **dict(f["coords"].attrs)}
        fraction = np.asarray(f["tissue_fraction"][()]) if "tissue_fraction" in f else None
    clean = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
    return TileCoords(coords, fraction, clean)
