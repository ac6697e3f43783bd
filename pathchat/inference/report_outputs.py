"""The files of one slide's report: the evidence tiles, a relevance heatmap PNG, QuPath GeoJSON, Markdown.

Pure functions over arrays and the report dict, so the batch verb, the web UI's one-click report and
the tests render the same files. Coordinates are level-0 pixels throughout (`l0_`); the heatmap is
drawn on a thumbnail whose `downsample` (level-0 pixels per thumbnail pixel) maps them. OpenCV draws
the colour bar, so no plotting library is needed.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

__all__ = ["evidence_geojson", "evidence_tiles", "heatmap_png", "report_markdown"]

#: Thumbnails smaller than this (longest side, px) are enlarged so the heatmap stays readable.
_MIN_SIDE = 384
_BAR_WIDTH = 96


def evidence_tiles(l0_coords: np.ndarray, l0_tile_px: int, scores: np.ndarray, top_k: int = 10) -> list[dict[str, Any]]:
    """The `top_k` highest-scoring tiles, best first, as JSON-ready dicts.

    Args:
        l0_coords: int `[n, 2]` level-0 (x, y) of each tile's top-left corner.
        l0_tile_px: tile side in level-0 pixels.
        scores: float `[n]` relevance (>= 0, summing to 1 over the slide's tiles).
    Returns:
        `[{"rank", "l0_x", "l0_y", "l0_width", "l0_height", "score"}]`; ties keep tile order.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    coords = np.asarray(l0_coords).reshape(-1, 2)
    if len(scores) != len(coords):
        raise ValueError(f"evidence_tiles: {len(scores)} scores for {len(coords)} tiles")
    order = np.argsort(-scores, kind="stable")[: max(0, top_k)]
    return [{"rank": r + 1, "tile_index": int(i), "l0_x": int(coords[i, 0]), "l0_y": int(coords[i, 1]),
             "l0_width": int(l0_tile_px), "l0_height": int(l0_tile_px), "score": round(float(scores[i]), 6)}
            for r, i in enumerate(order)]


def evidence_geojson(evidence: list[dict[str, Any]]) -> dict[str, Any]:
    """A FeatureCollection of the evidence tiles as QuPath annotations (level-0 pixels), scores as measurements."""
    features = []
    for t in evidence:
        x, y, w, h = t["l0_x"], t["l0_y"], t["l0_width"], t["l0_height"]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
            "properties": {
                "objectType": "annotation",
                "name": f"evidence {t['rank']}",
                "classification": {"name": "Evidence", "color": [230, 60, 20]},
                "measurements": {"relevance": t["score"], "rank": t["rank"]},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def _relevance_canvas(shape: tuple[int, int], downsample: float, l0_coords: np.ndarray, l0_tile_px: int,
                      scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`[h, w]` relevance per thumbnail pixel (the max over the tiles covering it) and the covered mask."""
    h, w = shape
    canvas = np.zeros((h, w), np.float64)
    covered = np.zeros((h, w), bool)
    for (x, y), s in zip(np.asarray(l0_coords).reshape(-1, 2), np.asarray(scores, np.float64).reshape(-1), strict=True):
        x0, y0 = int(math.floor(x / downsample)), int(math.floor(y / downsample))
        x1 = max(x0 + 1, int(math.ceil((x + l0_tile_px) / downsample)))
        y1 = max(y0 + 1, int(math.ceil((y + l0_tile_px) / downsample)))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x0 >= x1 or y0 >= y1:
            continue
        np.maximum(canvas[y0:y1, x0:x1], s, out=canvas[y0:y1, x0:x1])
        covered[y0:y1, x0:x1] = True
    return canvas, covered


def _colour_bar(height: int, top_label: str) -> np.ndarray:
    """A BGR panel: a vertical viridis gradient (high at the top) with its scale written beside it."""
    panel = np.full((height, _BAR_WIDTH, 3), 255, np.uint8)
    margin = max(18, height // 12)
    bar_h = max(2, height - 2 * margin)
    ramp = np.linspace(255, 0, bar_h).astype(np.uint8)[:, None].repeat(18, axis=1)
    panel[margin:margin + bar_h, 8:26] = cv2.applyColorMap(ramp, cv2.COLORMAP_VIRIDIS)
    font, scale, ink = cv2.FONT_HERSHEY_SIMPLEX, 0.4, (20, 20, 20)
    cv2.putText(panel, top_label, (30, margin + 10), font, scale, ink, 1, cv2.LINE_AA)
    cv2.putText(panel, "0", (30, margin + bar_h), font, scale, ink, 1, cv2.LINE_AA)
    cv2.putText(panel, "relevance", (4, max(12, margin - 5)), font, scale, ink, 1, cv2.LINE_AA)
    return panel


def heatmap_png(thumbnail: np.ndarray, downsample: float, l0_coords: np.ndarray, l0_tile_px: int,
                scores: np.ndarray, alpha: float = 0.55) -> bytes:
    """PNG bytes: the tiles' relevance (viridis) over the slide thumbnail, with a colour bar.

    Args:
        thumbnail: uint8 RGB `[h, w, 3]` of the whole slide.
        downsample: level-0 pixels per thumbnail pixel.
        l0_coords, l0_tile_px, scores: the tiles and their relevance (`[n, 2]`, side, `[n]`).
        alpha: opacity of the colours over tissue.
    Returns:
        The PNG file's bytes (`[h, w + bar]`, the thumbnail enlarged when its longest side is small).
    """
    rgb: np.ndarray = np.ascontiguousarray(thumbnail[..., :3], dtype=np.uint8)
    factor = max(1, math.ceil(_MIN_SIDE / max(1, max(rgb.shape[:2]))))
    if factor > 1:
        rgb = cv2.resize(rgb, (rgb.shape[1] * factor, rgb.shape[0] * factor), interpolation=cv2.INTER_NEAREST)
        downsample = downsample / factor
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    scores = np.asarray(scores, np.float64).reshape(-1)
    top = float(scores.max()) if scores.size else 0.0
    if scores.size:
        canvas, covered = _relevance_canvas(bgr.shape[:2], downsample, l0_coords, l0_tile_px, scores)
        level = np.clip(canvas / top, 0, 1) if top > 0 else canvas
        colours = cv2.applyColorMap((level * 255).round().astype(np.uint8), cv2.COLORMAP_VIRIDIS)
        blended = cv2.addWeighted(bgr, 1 - alpha, colours, alpha, 0)
        bgr = np.where(covered[..., None], blended, bgr)
    image = np.concatenate([bgr, _colour_bar(bgr.shape[0], f"{top:.3g}")], axis=1)
    ok, buf = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise RuntimeError("heatmap_png: PNG encoding failed")
    return buf.tobytes()


def report_markdown(report: dict[str, Any]) -> str:
    """The readable form of a report dict (as `write_report` builds it)."""
    lines = [f"# Slide report: {report['slide']}", "", f"> **{report['notice']}**", ""]
    if report.get("status") == "insufficient_tissue":
        lines += [f"**Insufficient tissue.** {report['status_reason']}", ""]
    elif report.get("status") == "insufficient_resolution":
        lines += [f"**Insufficient resolution.** {report['status_reason']}", ""]
    for section in report["sections"]:
        lines += [f"## {section['title']}", "", section["answer"].strip() or "*(no answer)*", ""]
    model = report["model"]
    recipe = report["feature_recipe"]
    lines += ["## How this report was made", "",
              f"- Model: `{model['id']}`",
              f"- Features: {recipe.get('description') or recipe.get('encoder')}",
              f"- Tiles: {report['tiling']['n_tiles']}"
              + (f" of {report['tiling']['l0_tile_px']} level-0 px" if report["tiling"].get("l0_tile_px") else ""),
              f"- Prompt set: `{report['prompts']['name']}` ({report['prompts']['sha256'][:12]})", ""]
    if report["evidence"]:
        lines += ["## Most relevant tiles (level-0 pixels)", "", "| rank | x | y | size | relevance |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {t['rank']} | {t['l0_x']} | {t['l0_y']} | {t['l0_width']} | {t['score']:.4f} |"
                  for t in report["evidence"]]
        lines.append("")
    lines += [f"*{report['notice']}*", ""]
    return "\n".join(lines)
