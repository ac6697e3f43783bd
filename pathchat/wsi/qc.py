"""QC picture of a tiling: the thumbnail, the tissue mask tinted green, its outline, and the kept tiles."""

from __future__ import annotations

import os

import cv2
import numpy as np

from pathchat.utils.atomic import atomic_write_bytes
from pathchat.wsi.grid import TileGrid
from pathchat.wsi.tissue import TissueMask


def render_qc(thumbnail: np.ndarray, tissue: TissueMask, grid: TileGrid) -> np.ndarray:
    """RGB uint8 image the size of the thumbnail."""
    out = thumbnail.astype(np.float32)
    green = np.array([40, 200, 80], dtype=np.float32)
    out[tissue.mask] = 0.85 * out[tissue.mask] + 0.15 * green
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(tissue.mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 150, 40), 1)
    ds = tissue.downsample
    side = grid.l0_tile_px / ds
    for x, y in grid.l0_coords:
        x0, y0 = int(round(x / ds)), int(round(y / ds))
        x1, y1 = int(round(x / ds + side)) - 1, int(round(y / ds + side)) - 1
        cv2.rectangle(out, (x0, y0), (max(x0, x1), max(y0, y1)), (30, 60, 220), 1)
    return out


def write_mask_png(path: str | os.PathLike[str], tissue: TissueMask) -> None:
    """The binary tissue mask (255 = tissue) at thumbnail resolution."""
    ok, buf = cv2.imencode(".png", tissue.mask.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes())


def write_qc_png(path: str | os.PathLike[str], thumbnail: np.ndarray, tissue: TissueMask, grid: TileGrid) -> None:
    image = render_qc(thumbnail, tissue, grid)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, buf.tobytes())
