"""Tissue detection on a slide thumbnail.

H&E tissue is coloured and glass is grey, so the HSV saturation channel separates them better than
brightness: it ignores uneven illumination and white (unscanned) gaps. Otsu picks the threshold per
slide, clamped to a band so that an empty slide finds nothing and faint tissue is not lost beside
strongly stained tissue. All sizes (closing radius, minimum areas) are in µm and µm², so the same
slide scanned at 20x or 40x gives the same mask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import shapely
import shapely.geometry

from pathchat.utils.checks import check_range
from pathchat.wsi.slide import Slide

_GEOJSON_GRID_PX = 0.1  # level-0 pixels; GeoJSON coordinates are rounded to this grid


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection settings. Defaults work for H&E at any scan magnification."""

    thumbnail_max_side: int = 1536  # px, long side of the thumbnail the mask is computed on
    saturation_threshold: float | None = None  # fixed threshold on 0..255 saturation; None = Otsu
    min_saturation: float = 12.0  # Otsu is clamped to at least this (glass and JPEG noise lie below)
    max_saturation: float = 15.0  # ... and at most this, so faint tissue beside dark tissue survives
    min_value: int = 30  # 0..255 brightness; darker pixels (black scanner borders) are never tissue
    median_blur_px: int = 5  # odd kernel on the thumbnail; removes speckle before thresholding
    closing_um: float = 40.0  # µm, morphological closing diameter (joins fragments of one piece)
    min_tissue_area_um2: float = 20_000.0  # µm², smaller pieces are dust (0.02 mm² ≈ 140x140 µm)
    max_hole_area_um2: float = 20_000.0  # µm², smaller holes inside tissue are filled

    def __post_init__(self) -> None:
        check_range("--tissue-threshold", self.saturation_threshold, 0, 255)
        check_range("min_saturation", self.min_saturation, 0, 255, allow_none=False)
        check_range("max_saturation", self.max_saturation, self.min_saturation, 255, allow_none=False)
        if not isinstance(self.thumbnail_max_side, int) or self.thumbnail_max_side < 16:
            raise ValueError(f"thumbnail_max_side must be an integer >= 16, got {self.thumbnail_max_side!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TissuePolygon:
    """One tissue piece: outer ring and holes, level-0 pixel (x, y) vertices, `[k, 2]` float."""

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)


@dataclass
class TissueMask:
    """Binary tissue mask at thumbnail resolution plus its geometry in level-0 pixels."""

    mask: np.ndarray  # bool [h, w]
    downsample: float  # level-0 pixels per mask pixel
    l0_mpp: float  # level-0 µm per pixel
    threshold: float  # saturation threshold used
    polygons: list[TissuePolygon]
    l0_size: tuple[int, int]  # (width, height) of level 0

    @property
    def tissue_area_um2(self) -> float:
        return float(self.mask.sum()) * (self.downsample * self.l0_mpp) ** 2

    def tissue_fraction(self, l0_boxes: np.ndarray) -> np.ndarray:
        """Share of each box's in-slide area covered by tissue.

        Args:
            l0_boxes: `[n, 4]` (x0, y0, x1, y1) in level-0 pixels.
        Returns:
            `[n]` float in [0, 1]. Box parts outside the slide do not count in the denominator,
            so an edge tile (or a slide smaller than one tile) is judged on what exists.
        """
        if len(l0_boxes) == 0:
            return np.zeros(0, dtype=np.float64)
        h, w = self.mask.shape
        integral = cv2.integral(self.mask.astype(np.uint8), sdepth=cv2.CV_64F)
        l0_w, l0_h = self.l0_size
        boxes = np.asarray(l0_boxes, dtype=np.float64)
        clipped = np.stack(
            [
                np.clip(boxes[:, 0], 0, l0_w),
                np.clip(boxes[:, 1], 0, l0_h),
                np.clip(boxes[:, 2], 0, l0_w),
                np.clip(boxes[:, 3], 0, l0_h),
            ],
            axis=1,
        )
        t = clipped / self.downsample
        x0 = np.clip(np.round(t[:, 0]).astype(np.int64), 0, w - 1)
        y0 = np.clip(np.round(t[:, 1]).astype(np.int64), 0, h - 1)
        x1 = np.clip(np.maximum(np.round(t[:, 2]).astype(np.int64), x0 + 1), 1, w)
        y1 = np.clip(np.maximum(np.round(t[:, 3]).astype(np.int64), y0 + 1), 1, h)
        covered = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        return np.clip(covered / ((x1 - x0) * (y1 - y0)), 0.0, 1.0)

    def to_geojson(self, name: str = "Tissue") -> dict[str, Any]:
        """A FeatureCollection of annotations in level-0 pixels, as QuPath imports them.

        One feature per tissue piece: a Polygon, or a MultiPolygon where the piece's outline touches
        itself (a one-pixel neck, a hole meeting the border), which shapely splits into valid parts.
        Every geometry is valid and oriented as RFC 7946 asks (outer rings counter-clockwise, holes
        clockwise); coordinates are rounded to 0.1 px without breaking validity.
        """
        features = []
        for poly in self.polygons:
            geometry = _valid_geometry(poly)
            if geometry is None:
                continue
            features.append(
                {
                    "type": "Feature",
                    "geometry": geometry,
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": name, "color": [0, 160, 60]},
                    },
                }
            )
        return {"type": "FeatureCollection", "features": features}


def _valid_geometry(poly: TissuePolygon) -> dict[str, Any] | None:
    """A GeoJSON geometry of `poly` that is valid and RFC 7946-oriented; None when nothing is left.

    OpenCV traces a piece that touches itself as one ring through the same vertex twice, which is
    invalid (shapely, QuPath's JTS and GeoPandas all say so); `make_valid` keeps its area and splits it
    there. Snapping to the 0.1-px output grid goes through `set_precision`, which keeps it valid.
    """
    shape = shapely.Polygon(poly.exterior, poly.holes)
    if not shape.is_valid:
        shape = shapely.make_valid(shape, method="structure", keep_collapsed=False)
    shape = shapely.orient_polygons(shapely.set_precision(shape, _GEOJSON_GRID_PX))
    if shape.is_empty or shape.geom_type not in ("Polygon", "MultiPolygon"):
        return None
    geometry = shapely.geometry.mapping(shape)

    def rounded(value: Any) -> Any:  # the grid is 0.1 px; this only drops float noise such as 0.30000000000000004
        if isinstance(value, float):
            return round(value, 1)
        return [rounded(v) for v in value]

    return {"type": geometry["type"], "coordinates": rounded(geometry["coordinates"])}


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 == 1 else k + 1


def segment_tissue(thumbnail: np.ndarray, downsample: float, l0_mpp: float, l0_size: tuple[int, int],
                   params: TissueParams | None = None) -> TissueMask:
    """Tissue mask of an RGB thumbnail.

    Args:
        thumbnail: uint8 RGB `[h, w, 3]`.
        downsample: level-0 pixels per thumbnail pixel.
        l0_mpp: level-0 µm per pixel.
        l0_size: (width, height) of level 0.
    """
    p = params or TissueParams()
    px_um = downsample * l0_mpp  # µm per thumbnail pixel
    px_area_um2 = px_um * px_um
    hsv = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1]
    if p.median_blur_px > 1 and min(sat.shape) >= p.median_blur_px:
        sat = cv2.medianBlur(sat, _odd(p.median_blur_px))
    if p.saturation_threshold is not None:
        threshold = float(p.saturation_threshold)
    else:
        otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = float(np.clip(otsu, p.min_saturation, p.max_saturation))
    mask = (sat > threshold) & (hsv[..., 2] >= p.min_value)

    closing_px = p.closing_um / px_um
    if closing_px >= 2:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(closing_px),) * 2)
        # OpenCV's default border is neutral for closing, so tissue touching the slide edge is kept.
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)

    # Minimum areas never exceed a tenth of the slide, so a tiny crop keeps its tissue.
    slide_area_um2 = l0_size[0] * l0_size[1] * l0_mpp * l0_mpp
    min_area_px = min(p.min_tissue_area_um2, 0.1 * slide_area_um2) / px_area_um2
    mask = _fill_small_holes(mask, p.max_hole_area_um2 / px_area_um2)
    mask = _remove_small_components(mask, min_area_px)
    return TissueMask(
        mask=mask,
        downsample=downsample,
        l0_mpp=l0_mpp,
        threshold=threshold,
        polygons=_polygons(mask, downsample),
        l0_size=l0_size,
    )


def detect_tissue(slide: Slide, l0_mpp: float, params: TissueParams | None = None) -> tuple[TissueMask, np.ndarray]:
    """Read a thumbnail of `slide` and segment it. Returns (mask, thumbnail)."""
    p = params or TissueParams()
    thumbnail, downsample = slide.thumbnail(p.thumbnail_max_side)
    return segment_tissue(thumbnail, downsample, l0_mpp, slide.dimensions, p), thumbnail


def _remove_small_components(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area_px
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    """Fill background components that do not touch the border and are smaller than max_hole_px."""
    background = (~mask).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    h, w = mask.shape
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    bw, bh = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
    touches_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = (~touches_border) & (stats[:, cv2.CC_STAT_AREA] < max_hole_px)
    fill[0] = False  # label 0 is the tissue itself in `background`'s labelling
    return mask | fill[labels]


def _polygons(mask: np.ndarray, downsample: float) -> list[TissuePolygon]:
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]

    def to_l0(contour: np.ndarray) -> np.ndarray:
        return (contour.reshape(-1, 2).astype(np.float64) + 0.5) * downsample

    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1 or len(contour) < 3:
            continue  # holes are attached to their parent below; degenerate slivers are skipped
        holes = []
        child = hierarchy[i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(to_l0(contours[child]))
            child = hierarchy[child][0]
        polygons.append(TissuePolygon(exterior=to_l0(contour), holes=holes))
    return polygons
