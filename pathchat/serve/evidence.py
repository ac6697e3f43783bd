"""The last answer's evidence in the viewer's frame: a heatmap image to lay over the slide and the top tiles.

Relevance is per tile in level-0 pixels; the viewer works in deep-zoom image pixels, which start at
the scanned area's corner (`l0_offset`). The heatmap is rasterised small (longest side at most
`max_side` px, one colour per tile footprint, transparent where no tile lies) and stretched by the
viewer over the slide, so a 50,000-tile slide costs a few kilobytes, not a full-size overlay.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import cv2
import numpy as np

from pathchat.inference.report_outputs import evidence_tiles

__all__ = ["heatmap_overlay", "viewer_evidence"]


def heatmap_overlay(l0_coords: np.ndarray, l0_tile_px: float, scores: np.ndarray,
                    max_side: int = 512) -> tuple[bytes, dict[str, float]]:
    """RGBA PNG of the tiles' relevance (viridis, alpha 0 outside tiles) and its level-0 placement.

    Args:
        l0_coords: `[n, 2]` level-0 (x, y) of each tile's top-left corner.
        l0_tile_px: tile side in level-0 pixels.
        scores: `[n]` relevance (>= 0).
        max_side: longest side of the PNG in pixels.
    Returns:
        (png bytes, {"l0_x", "l0_y", "l0_width", "l0_height"} of the image on the slide).
    """
    coords = np.asarray(l0_coords, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(coords) != len(scores) or len(coords) == 0:
        raise ValueError(f"heatmap_overlay: {len(scores)} scores for {len(coords)} tiles")
    x0, y0 = coords.min(axis=0)
    x1, y1 = coords.max(axis=0) + l0_tile_px
    ds = max((x1 - x0), (y1 - y0)) / max_side  # level-0 px per overlay px
    ds = max(ds, l0_tile_px / 8)  # no more than 8 px per tile side: small PNGs for small slides
    w, h = max(1, math.ceil((x1 - x0) / ds)), max(1, math.ceil((y1 - y0) / ds))
    value = np.zeros((h, w), np.float64)
    covered = np.zeros((h, w), bool)
    top = float(scores.max())
    level = scores / top if top > 0 else scores
    for (x, y), s in zip(coords, level, strict=True):
        c0, r0 = int((x - x0) / ds), int((y - y0) / ds)
        c1, r1 = max(c0 + 1, math.ceil((x - x0 + l0_tile_px) / ds)), max(r0 + 1, math.ceil((y - y0 + l0_tile_px) / ds))
        np.maximum(value[r0:r1, c0:c1], s, out=value[r0:r1, c0:c1])
        covered[r0:r1, c0:c1] = True
    bgr = cv2.applyColorMap((np.clip(value, 0, 1) * 255).round().astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    alpha = np.where(covered, 255, 0).astype(np.uint8)
    ok, buf = cv2.imencode(".png", np.dstack([bgr, alpha]))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGRA image
        raise RuntimeError("heatmap_overlay: PNG encoding failed")
    return buf.tobytes(), {"l0_x": float(x0), "l0_y": float(y0), "l0_width": w * ds, "l0_height": h * ds}


def viewer_evidence(l0_coords: np.ndarray, l0_tile_px: float, scores: np.ndarray, l0_offset: tuple[int, int],
                    top_k: int = 5, region: tuple[int, int, int, int] | None = None,
                    answer: str = "") -> dict[str, Any]:
    """JSON for the page's viewer script: heatmap data URL and placement, top tiles, region, answer.

    Every rectangle is in deep-zoom image pixels (level-0 minus `l0_offset`), as OpenSeadragon's
    `imageToViewportRectangle` expects.
    """
    ox, oy = l0_offset
    png, place = heatmap_overlay(l0_coords, l0_tile_px, scores)
    top = evidence_tiles(np.asarray(l0_coords).round().astype(np.int64), int(round(l0_tile_px)), scores, top_k)
    return {
        "heatmap": "data:image/png;base64," + base64.b64encode(png).decode(),
        "heatmap_rect": [place["l0_x"] - ox, place["l0_y"] - oy, place["l0_width"], place["l0_height"]],
        "top_tiles": [{"rank": t["rank"], "score": t["score"],
                       "rect": [t["l0_x"] - ox, t["l0_y"] - oy, t["l0_width"], t["l0_height"]]} for t in top],
        "region": None if region is None else [region[0] - ox, region[1] - oy, region[2], region[3]],
        "answer": answer,
    }
