"""What a slide shows, read from the tiles that survived tissue detection (not from the drawing).

The generator knows where it painted each region; the model only ever sees the tiles the tiler kept.
So every answer is computed from the kept tiles' coordinates (from the features file): each tile is
assigned to the region covering most of it, a region with no kept tile does not exist, separate
pieces are connected components of the kept tiles on the grid, and the tissue amount is the number
of kept tiles. A slide where these disagree with the drawing (a piece that maps to two regions, a
tile covered by no region) is rejected with the reason, never silently relabelled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from data_recipes.synthetic.layout import QUADRANTS, RECIPE_CLASSES, Geometry, SlideLayout


class TruthMismatchError(ValueError):
    """The kept tiles contradict the drawn layout (names the slide and the problem)."""


@dataclass(frozen=True)
class RegionTruth:
    tissue_class: str
    quadrant: str  # from the centre of the region's kept tiles
    n_tiles: int


@dataclass(frozen=True)
class SlideTruth:
    """The answers of one slide, all computed from its kept tiles."""

    slide_id: str
    n_tiles: int
    regions: tuple[RegionTruth, ...]  # in reading order (upper left first)
    class_tiles: dict[str, int]  # kept tiles per present class, in RECIPE_CLASSES order
    dominant: str  # the class with the most tiles
    amount: str  # "small" | "medium" | "large"
    tile_labels: tuple[str, ...]  # class of each kept tile, in features-file order
    predicted_tiles_agree: bool  # the kept tiles are exactly the ones the layout predicted

    @property
    def region_count(self) -> int:
        return len(self.regions)

    @property
    def present(self) -> tuple[str, ...]:
        return tuple(self.class_tiles)

    def unique_location(self, tissue_class: str) -> str | None:
        """The quadrant of `tissue_class` when exactly one region has it, else None."""
        found = [r.quadrant for r in self.regions if r.tissue_class == tissue_class]
        return found[0] if len(found) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("tile_labels")
        d["regions"] = [asdict(r) for r in self.regions]
        return d


def slide_truth(layout: SlideLayout, geometry: Geometry, l0_coords: np.ndarray) -> SlideTruth:
    """Answers of `layout` from the level-0 (x, y) top-left corners of its kept tiles.

    Args:
        l0_coords: int `[n, 2]`, as stored in the slide's features file.
    Raises:
        TruthMismatchError: off-grid tiles, a tile no region covers, a region split or merged on the
            tile grid, or no tile at all.
    """
    sid, g, t = layout.slide_id, geometry.grid_tiles, geometry.tile_px
    coords = np.asarray(l0_coords, dtype=np.int64).reshape(-1, 2)
    if len(coords) == 0:
        raise TruthMismatchError(f"{sid}: no tile survived tissue detection")
    if np.any(coords % t) or np.any(coords < 0) or np.any(coords >= g * t):
        raise TruthMismatchError(f"{sid}: tile coordinates are not on the {g}x{g} grid of {t}-px tiles")
    cols, rows = coords[:, 0] // t, coords[:, 1] // t
    share = layout.coverage[:, rows, cols]  # [k, n]
    owner = share.argmax(axis=0)
    if np.any(share.max(axis=0) <= 0):
        raise TruthMismatchError(f"{sid}: a kept tile lies outside every region (tissue detection found "
                                 "something the generator did not paint)")
    occupied = np.zeros((g, g), np.uint8)
    occupied[rows, cols] = 1
    n_pieces, piece_map = cv2.connectedComponents(occupied, connectivity=8)
    pieces = piece_map[rows, cols]
    regions = []
    for k, region in enumerate(layout.regions):
        mine = owner == k
        if not mine.any():
            continue
        if len(set(pieces[mine].tolist())) != 1:
            raise TruthMismatchError(f"{sid}: region {k} ({region.tissue_class}) is split into several pieces")
        centre = (coords[mine] + t / 2).mean(axis=0) / (g * t)  # in [0, 1] of the slide side
        quadrant = QUADRANTS[2 * int(centre[1] >= 0.5) + int(centre[0] >= 0.5)]
        if quadrant != QUADRANTS[layout.quadrants[k]]:
            raise TruthMismatchError(f"{sid}: region {k} lies in the {quadrant}, drawn in another quadrant")
        regions.append((int(np.nonzero(owner == k)[0][0]), RegionTruth(region.tissue_class, quadrant, int(mine.sum()))))
    if len(regions) != n_pieces - 1:
        raise TruthMismatchError(f"{sid}: {n_pieces - 1} separate pieces on the tile grid but {len(regions)} regions")
    labels = tuple(layout.regions[int(k)].tissue_class for k in owner)
    counts = {c: labels.count(c) for c in RECIPE_CLASSES if c in labels}
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        raise TruthMismatchError(f"{sid}: no single dominant class ({ranked[0][0]} and {ranked[1][0]} tie)")
    predicted = layout.predicted_tiles(geometry)
    return SlideTruth(
        slide_id=sid,
        n_tiles=len(coords),
        regions=tuple(r for _, r in sorted(regions, key=lambda fr: fr[0])),
        class_tiles=counts,
        dominant=ranked[0][0],
        amount=geometry.amount_of(len(coords)),
        tile_labels=labels,
        predicted_tiles_agree=bool(np.array_equal(predicted, occupied.astype(bool))),
    )
