"""Tile grids: where the tiles of a slide lie, in level-0 pixels, at a target resolution.

A tile of `tile_px` pixels at `mpp` µm/px covers `l0_tile_px = tile_px * mpp / l0_mpp` level-0 pixels.
It is read from the coarsest pyramid level that is still at least as fine as the target and resized,
so a 40x slide without a 20x level gives the same grid as one with it. A level within
`snap_tolerance` of the target is used as is (0.499 µm/px counts as 0.5), so common scanners never
pay for a resize of 1.002x. The grid covers the whole slide: edge tiles that stick out are judged on
their in-slide part (the reader pads them, black by default as TRIDENT and CLAM do).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pathchat.utils.checks import check_positive, check_range
from pathchat.wsi.errors import ResolutionTooLowError
from pathchat.wsi.slide import Slide
from pathchat.wsi.tissue import TissueMask

DEFAULT_MPP = 0.5  # µm per pixel, i.e. 20x


@dataclass(frozen=True)
class TilingParams:
    """Tile grid settings. Give `magnification` or `mpp`, not both; neither means 20x (0.5 µm/px)."""

    magnification: float | None = None  # target objective power, converted as mpp = 10 / magnification
    mpp: float | None = None  # target µm per pixel
    tile_px: int = 256  # tile side at the target resolution, pixels
    overlap_px: int = 0  # overlap between neighbouring tiles at the target resolution, pixels
    min_tissue: float = 0.25  # minimum tissue share of a tile's in-slide area (0 keeps the whole grid)
    snap_tolerance: float = 0.05  # a pyramid level within this relative distance of the target is used as is
    low_resolution: str = "native"  # slides coarser than the target: "native" (tile at level 0, warn) or "error"

    def __post_init__(self) -> None:
        if self.magnification is not None and self.mpp is not None:
            raise ValueError("give --mag or --mpp, not both")
        check_positive("--mag", self.magnification)
        check_positive("--mpp", self.mpp, unit=" of µm per pixel")
        check_positive("--snap-tolerance", self.snap_tolerance)
        # One canonical form (the target mpp), so 20x, 0.5 µm/px and the default compare equal
        # wherever settings are compared (resume keys, reuse of coordinates).
        object.__setattr__(self, "mpp", self.target_mpp)
        object.__setattr__(self, "magnification", None)
        if self.tile_px < 8:
            raise ValueError(f"--tile-size must be at least 8 px, got {self.tile_px}")
        if not 0 <= self.overlap_px < self.tile_px:
            raise ValueError(f"--overlap must be in [0, tile size), got {self.overlap_px}")
        check_range("--min-tissue", self.min_tissue, 0.0, 1.0, allow_none=False)
        if self.low_resolution not in ("native", "error"):
            raise ValueError(f"--low-res must be 'native' or 'error', got {self.low_resolution!r}")

    @property
    def target_mpp(self) -> float:
        if self.mpp is not None:
            return self.mpp
        if self.magnification is not None:
            return 10.0 / self.magnification
        return DEFAULT_MPP

    @property
    def target_magnification(self) -> float:
        return 10.0 / self.target_mpp

    @property
    def folder_name(self) -> str:
        """TRIDENT's job sub-folder name, e.g. `20x_256px_0px_overlap`."""
        return f"{self.target_magnification:g}x_{self.tile_px}px_{self.overlap_px}px_overlap"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TileGrid:
    """The tiles kept on one slide, and how to read them."""

    l0_coords: np.ndarray  # int64 [n, 2], level-0 (x, y) of each tile's top-left corner
    tissue_fraction: np.ndarray  # float32 [n]
    tile_px: int  # output tile side, pixels
    overlap_px: int
    l0_tile_px: int  # tile side in level-0 pixels
    l0_step_px: int  # grid step in level-0 pixels
    read_level: int  # pyramid level tiles are read from
    read_px: int  # region side read at `read_level` (resized to `tile_px` when different)
    l0_mpp: float  # level-0 µm per pixel
    mpp: float  # µm per pixel of the output tiles
    target_mpp: float  # what was asked for (differs from `mpp` only for low-resolution slides)
    l0_size: tuple[int, int]
    grid_shape: tuple[int, int]  # (columns, rows) of the full grid before tissue filtering

    def __len__(self) -> int:
        return len(self.l0_coords)

    @property
    def magnification(self) -> float:
        return 10.0 / self.mpp

    def h5_attrs(self) -> dict[str, Any]:
        """TRIDENT- and CLAM-compatible attributes for the coordinates file.

        `patch_size` is TRIDENT's: the tile side at the target resolution. CLAM reads `patch_size` pixels
        at `patch_level`, which covers the same area only when no resize happens (`read_px == patch_size`);
        `read_px` is the side to read at `patch_level` in every case.
        """
        return {
            "patch_size": self.tile_px,
            "patch_level": self.read_level,  # CLAM: the pyramid level tiles are read from
            "patch_size_level0": self.l0_tile_px,
            "level0_magnification": 10.0 / self.l0_mpp,
            "target_magnification": self.magnification,
            "mpp": self.l0_mpp,
            "target_mpp": self.mpp,
            "requested_mpp": self.target_mpp,
            "overlap": self.overlap_px,
            "level0_width": self.l0_size[0],
            "level0_height": self.l0_size[1],
            "read_level": self.read_level,
            "read_px": self.read_px,
        }


def coarser_than_target(l0_mpp: float, params: TilingParams) -> bool:
    """True when level 0 (`l0_mpp` µm/px) is coarser than the target beyond `snap_tolerance`: such a
    slide is tiled at its native resolution (or refused with `low_resolution="error"`)."""
    return params.target_mpp / l0_mpp < 1 - params.snap_tolerance


def plan_read(slide: Slide, l0_mpp: float, params: TilingParams) -> tuple[float, int, int, float]:
    """Decide the level-0 scale of a tile and where to read it.

    Returns:
        (level-0 pixels per output pixel, read level, read size at that level, output mpp).
    Raises:
        ResolutionTooLowError: the slide is coarser than the target and `low_resolution="error"`.
    """
    scale = params.target_mpp / l0_mpp
    tol = params.snap_tolerance
    if coarser_than_target(l0_mpp, params):
        message = (
            f"finest level is {l0_mpp:.4g} µm/px, coarser than the requested {params.target_mpp:.4g} µm/px "
            f"({1 / scale:.3g}x upsampling)"
        )
        if params.low_resolution == "error":
            raise ResolutionTooLowError(slide.path, message + "; tile at a lower --mag or pass --low-res native")
        warnings.warn(f"{slide.path}: {message}; tiling at the native {l0_mpp:.4g} µm/px instead", stacklevel=2)
        scale = 1.0
    for level, d in enumerate(slide.level_downsamples):
        if abs(scale / d - 1) <= tol:  # a level matches the target: no resize
            return d, level, params.tile_px, l0_mpp * d
    level = slide.best_level_for_downsample(scale)
    read_px = max(1, round(params.tile_px * scale / slide.level_downsamples[level]))
    return scale, level, read_px, params.target_mpp


def build_grid(slide: Slide, l0_mpp: float, tissue: TissueMask | None, params: TilingParams) -> TileGrid:
    """All grid tiles whose tissue share is at least `params.min_tissue`, in row-major order.

    Args:
        tissue: the slide's tissue mask; None keeps every grid position (fraction 1).
    """
    scale, level, read_px, mpp = plan_read(slide, l0_mpp, params)
    l0_tile = max(1, round(params.tile_px * scale))
    l0_step = max(1, round((params.tile_px - params.overlap_px) * scale))
    width, height = slide.dimensions

    def count(extent: int) -> int:
        return 1 if extent <= l0_tile else math.ceil((extent - l0_tile) / l0_step) + 1

    nx, ny = count(width), count(height)
    ys, xs = np.meshgrid(np.arange(ny, dtype=np.int64) * l0_step, np.arange(nx, dtype=np.int64) * l0_step,
                         indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    if tissue is None:
        fraction = np.ones(len(coords), dtype=np.float32)
    else:
        boxes = np.concatenate([coords, coords + l0_tile], axis=1)
        fraction = tissue.tissue_fraction(boxes).astype(np.float32)
    keep = fraction >= params.min_tissue if params.min_tissue > 0 else np.ones(len(coords), dtype=bool)
    if tissue is not None and params.min_tissue > 0:
        keep &= fraction > 0
    return TileGrid(
        l0_coords=coords[keep],
        tissue_fraction=fraction[keep],
        tile_px=params.tile_px,
        overlap_px=params.overlap_px,
        l0_tile_px=l0_tile,
        l0_step_px=l0_step,
        read_level=level,
        read_px=read_px,
        l0_mpp=l0_mpp,
        mpp=mpp,
        target_mpp=params.target_mpp,
        l0_size=(width, height),
        grid_shape=(nx, ny),
    )
