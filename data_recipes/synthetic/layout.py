"""Slide layouts whose answers are unambiguous: where each tissue region lies and which tiles it yields.

A slide is a square grid of `grid_tiles` x `grid_tiles` tiles. It has 1-4 regions, at most one per
quadrant, each confined to the quadrant's outer `grid_tiles / 2 - 1` tile rows and columns, so regions
in neighbouring quadrants are always at least two tile rows apart and never merge into one piece on the
tile grid. A layout is drawn, then kept only if every tile is clearly in or clearly out (its predicted
tissue share is outside an uncertain band around the tiler's `min_tissue`), every region is well above
the tissue detector's dust size, the predicted tile count sits inside its tissue-amount bin, and the
dominant class wins by a margin: then the answers computed later from the tiles that really survived
tissue detection are the ones the layout was drawn for.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pathchat.wsi.synthetic import TISSUE_CLASSES, SyntheticSlideSpec, TissueRegion, class_map

#: Classes the recipe draws. "fat" is left out: it is mostly white, and the saturation-based tissue
#: detector keeps almost none of its tiles, so its presence could not be read from the features.
RECIPE_CLASSES: tuple[str, ...] = tuple(c for c in TISSUE_CLASSES if c != "fat")

#: How each class is named in reports, questions and answers.
CLASS_NAMES: dict[str, str] = {
    "tumor": "tumor",
    "stroma": "stroma",
    "lymphocytes": "lymphocytes",
    "necrosis": "necrosis",
    "mucin": "mucin",
    "faint": "pale tissue",
}

#: Quadrant index -> name; index = 2 * (lower half) + (right half).
QUADRANTS: tuple[str, ...] = ("upper left", "upper right", "lower left", "lower right")

AMOUNTS: tuple[str, ...] = ("small", "medium", "large")

#: P(region count, tissue amount): both marginals uniform (1/4 per count, 1/3 per amount). One region
#: can only give a small amount and only 3-4 regions reach a large one on the default grid.
_JOINT: tuple[tuple[int, str, float], ...] = (
    (1, "small", 3 / 12), (2, "small", 1 / 12), (2, "medium", 2 / 12),
    (3, "medium", 1 / 12), (4, "medium", 1 / 12), (3, "large", 2 / 12), (4, "large", 2 / 12),
)


@dataclass(frozen=True)
class Geometry:
    """Slide and tile geometry shared by every slide of a dataset.

    The defaults give 1024 x 1024 px slides at 1 µm/px (10x), tiled into an 8 x 8 grid of 128-px
    tiles at 10x, so each slide has 5-36 tissue tiles and writes in about 0.1 s.
    """

    grid_tiles: int = 8  # tiles per slide side; even, >= 4
    tile_px: int = 128  # tile side in pixels at the slide's level 0 (tiling is done at the slide's mpp)
    mpp: float = 1.0  # level-0 µm per pixel (and the tiling resolution)
    min_tissue: float = 0.25  # the tiler's minimum tissue share of a tile
    uncertain_band: tuple[float, float] = (0.17, 0.35)  # predicted shares in this band are rejected
    edge_margin_tiles: float = 0.1  # regions keep this far from the slide edge and the centre cross
    amount_bins: tuple[int, int] = (9, 18)  # tiles: <= 9 small, <= 18 medium, more large
    amount_targets: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"small": (2, 8), "medium": (11, 17), "large": (20, 36)}
    )  # predicted tile counts drawn for each amount, away from the bin edges
    dominant_margin: int = 2  # the dominant class must have this many more tiles than the next
    min_region_um2: float = 30_000.0  # µm²; above the tissue detector's 20,000 µm² dust limit, with margin

    def __post_init__(self) -> None:
        if self.grid_tiles < 4 or self.grid_tiles % 2:
            raise ValueError(f"grid_tiles must be even and >= 4, got {self.grid_tiles}")
        if self.tile_px < 16 or self.tile_px % 16:
            raise ValueError(f"tile_px must be a positive multiple of 16, got {self.tile_px}")
        lo, hi = self.uncertain_band
        if not 0 <= lo < self.min_tissue < hi <= 1:
            raise ValueError(f"uncertain_band {self.uncertain_band} must bracket min_tissue {self.min_tissue}")

    @property
    def slide_px(self) -> int:
        return self.grid_tiles * self.tile_px

    @property
    def tile_um(self) -> float:
        return self.tile_px * self.mpp

    def amount_of(self, n_tiles: int) -> str:
        """Tissue amount named by a tile count."""
        small, medium = self.amount_bins
        return "small" if n_tiles <= small else "medium" if n_tiles <= medium else "large"

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid_tiles": self.grid_tiles, "tile_px": self.tile_px, "mpp": self.mpp,
            "slide_px": self.slide_px, "min_tissue": self.min_tissue,
            "uncertain_band": list(self.uncertain_band), "edge_margin_tiles": self.edge_margin_tiles,
            "amount_bins": list(self.amount_bins),
            "amount_targets": {k: list(v) for k, v in self.amount_targets.items()},
            "dominant_margin": self.dominant_margin, "min_region_um2": self.min_region_um2,
        }


@dataclass(frozen=True)
class SlideLayout:
    """One drawn slide: its regions (one per quadrant) and what the generator predicts the tiler keeps."""

    slide_id: str
    regions: tuple[TissueRegion, ...]
    quadrants: tuple[int, ...]  # quadrant of each region
    texture_seed: int
    coverage: np.ndarray  # float32 [k, grid, grid]: share of tile (row, col) covered by region k

    def spec(self, geometry: Geometry) -> SyntheticSlideSpec:
        """The writer's spec: generic TIFF (no label or macro images, so it writes fast), two levels."""
        return SyntheticSlideSpec(
            width_px=geometry.slide_px, height_px=geometry.slide_px, mpp=geometry.mpp, regions=self.regions,
            downsamples=(1, 4), vendor="generic-tiff", tile_px=256, seed=self.texture_seed,
        )

    def predicted_tiles(self, geometry: Geometry) -> np.ndarray:
        """bool [grid, grid]: tiles whose predicted tissue share reaches `min_tissue`."""
        return self.coverage.sum(axis=0) >= geometry.min_tissue


def region_coverage(geometry: Geometry, regions: tuple[TissueRegion, ...], samples_per_tile: int = 16) -> np.ndarray:
    """float32 [k, grid, grid]: the share of each tile covered by each region, from the writer's class map.

    Computed with `pathchat.wsi.synthetic.class_map` (the same geometry the writer paints), sampling
    `samples_per_tile`^2 points per tile.
    """
    g = geometry.grid_tiles
    downsample = geometry.tile_px / samples_per_tile
    n = g * samples_per_tile
    out = np.zeros((len(regions), g, g), np.float32)
    probe = SyntheticSlideSpec(geometry.slide_px, geometry.slide_px, geometry.mpp)
    for k, region in enumerate(regions):
        painted = class_map(replace(probe, regions=(region,)), 0, 0, n, n, downsample) >= 0
        out[k] = painted.reshape(g, samples_per_tile, g, samples_per_tile).mean(axis=(1, 3))
    return out


def _draw_box(rng: np.random.Generator, geometry: Geometry, quadrant: int, side_range: tuple[float, float],
              ellipse_share: float) -> TissueRegion:
    """A region box inside the allowed part of `quadrant`; sides drawn in tiles (class set by the caller)."""
    g, t, m = geometry.grid_tiles, geometry.tile_um, geometry.edge_margin_tiles
    span = g // 2 - 1  # allowed tiles along each axis
    placed = []
    for far in (quadrant % 2, quadrant // 2):  # x: right half?, y: lower half?
        start = (g // 2 + 1) if far else 0
        lo, hi = (start + m) * t, (start + span - m) * t
        size = min(rng.uniform(*side_range) * t, hi - lo)
        placed.append((round(float(rng.uniform(lo, hi - size)), 1), round(float(size), 1)))
    (x, w), (y, h) = placed
    return TissueRegion(RECIPE_CLASSES[0], x, y, w, h, "ellipse" if rng.random() < ellipse_share else "rect")


def sample_layout(slide_id: str, rng: np.random.Generator, geometry: Geometry,
                  texture_seeds: tuple[int, ...] = (0, 1, 2, 3), ellipse_share: float = 0.4,
                  max_tries: int = 2000) -> SlideLayout:
    """Draw a layout that passes every check in the module docstring.

    The region count and the tissue amount are drawn once, from a joint table with uniform marginals,
    and kept: only sizes, positions and classes are redrawn until the checks pass, so rejection does
    not skew those two answers. Regions never share a tile, so each region's box is redrawn on its own
    until none of its tiles is uncertain; then the total must fall in the amount's target range; then
    classes are drawn until the dominant one wins by the margin.

    Raises:
        RuntimeError: no acceptable layout in `max_tries` draws (a geometry too tight for its targets).
    """
    probs = np.array([p for _, _, p in _JOINT])
    k, amount, _ = _JOINT[int(rng.choice(len(_JOINT), p=probs / probs.sum()))]
    quadrants = tuple(int(q) for q in rng.permutation(4)[:k])
    texture_seed = int(rng.choice(texture_seeds))
    lo_n, hi_n = geometry.amount_targets[amount]
    side = float(np.sqrt((lo_n + min(hi_n, k * (geometry.grid_tiles // 2 - 1) ** 2)) / 2 / k))
    side_range = (max(1.1, side - 0.6), side + 0.6)  # region sides in tiles around the target's share
    band_lo, band_hi = geometry.uncertain_band
    tries = 0
    while tries < max_tries:
        boxes, coverage = [], []
        for q in quadrants:
            while tries < max_tries:
                tries += 1
                box = _draw_box(rng, geometry, q, side_range, ellipse_share)
                area = box.width_um * box.height_um * (np.pi / 4 if box.shape == "ellipse" else 1.0)
                if area < geometry.min_region_um2:
                    continue
                cov = region_coverage(geometry, (box,))[0]
                if not np.any((cov > band_lo) & (cov < band_hi)) and (cov >= geometry.min_tissue).sum() >= 2:
                    boxes.append(box)
                    coverage.append(cov)
                    break
        if len(boxes) < k:
            break
        per_region = [int((c >= geometry.min_tissue).sum()) for c in coverage]
        if not lo_n <= sum(per_region) <= hi_n:
            continue
        for _ in range(50):
            n_types = int(rng.integers(1, min(k, 3) + 1))  # <= 3 types: a presence question has 3 absent options
            types = [str(c) for c in rng.choice(RECIPE_CLASSES, n_types, replace=False)]
            classes = types + [str(rng.choice(types)) for _ in range(k - n_types)]
            classes = [classes[i] for i in rng.permutation(k)]
            if _dominant_margin(classes, per_region) >= geometry.dominant_margin:
                regions = tuple(replace(b, tissue_class=c) for b, c in zip(boxes, classes, strict=True))
                return SlideLayout(slide_id, regions, quadrants, texture_seed, np.stack(coverage))
    raise RuntimeError(f"{slide_id}: no acceptable layout in {max_tries} draws "
                       f"({k} regions, {amount} amount) for geometry {geometry}")


def _dominant_margin(classes: list[str], tiles_per_region: list[int]) -> int:
    """Tiles by which the most common class beats the next one (its own count when it is alone)."""
    counts: dict[str, int] = {}
    for c, n in zip(classes, tiles_per_region, strict=True):
        counts[c] = counts.get(c, 0) + n
    ranked = sorted(counts.values(), reverse=True) + [0]
    return ranked[0] - ranked[1]
