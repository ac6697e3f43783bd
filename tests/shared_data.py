"""Test data shared by the test modules: the real slides in ../shared/data/slides and generated images.

A plain module (not conftest.py), so `from shared_data import ...` is unambiguous beside the
conftest.py files of sub-folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_slides() -> Path:
    env = os.environ.get("PATHCHAT_SHARED_SLIDES")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "slides"
    if not path.is_dir():
        raise RuntimeError(
            f"real test slides not found at {path}; set PATHCHAT_SHARED_SLIDES to the shared/data/slides folder"
        )
    return path


SLIDES = _shared_slides()
CMU = SLIDES / "aperio" / "CMU-1-Small-Region.svs"
TCGA = SLIDES / "aperio" / "tcga-cr-7395-01a-01-ts1.svs"
ZEROED = SLIDES / "bad" / "CMU-1-Small-Region.zeroed-600000-700000.svs"
TEXT = SLIDES.parent / "text"  # real question/answer files (no slides behind them)
ODD = SLIDES.parent / "odd_slides"  # seven unusual real files from other projects' test suites (README there)


def blob_image(width: int, height: int, boxes: list[tuple[int, int, int, int, tuple[int, int, int]]],
               background: tuple[int, int, int] = (243, 243, 241)) -> np.ndarray:
    """RGB image with solid coloured boxes (x, y, w, h, rgb) on glass, plus mild deterministic noise."""
    rng = np.random.default_rng(0)
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = background
    for x, y, w, h, rgb in boxes:
        img[y : y + h, x : x + w] = rgb
    noise = rng.integers(-2, 3, size=img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
