"""A small deterministic stand-in for `pathchat.inference.Pipeline`, for UI tests that count model calls.

It computes nothing: features are a grid over the slide, answers are fixed words streamed one at a
time, relevance peaks at the tile nearest the slide's centre. Tests of the real pipeline live in
tests/inference; these check what the UI does with what the pipeline gives.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathchat.features.store import FeatureBag


@dataclass
class FakeSlide:
    slide_id: str
    path: Path
    bag: FeatureBag
    no_tissue: bool = False


class FakeSession:
    def __init__(self, pipe: FakePipeline, slide: FakeSlide, region):
        self.pipe, self.slide, self.region = pipe, slide, region
        coords = slide.bag.coords
        if region is not None:
            x, y, w, h = region
            inside = ((coords[:, 0] + 256 > x) & (coords[:, 0] < x + w) & (coords[:, 1] + 256 > y)
                      & (coords[:, 1] < y + h))
            coords = coords[inside]
        self.tile_coords_l0 = coords
        self.turns = 0

    def ask(self, question: str, stream: bool = False):
        with self.pipe.lock:
            self.pipe.model_calls += 1
        self.turns += 1
        words = [f"Answer {self.turns}", " about", f" {len(self.tile_coords_l0)}", " tiles."]

        def gen():
            with self.pipe.lock:
                self.pipe.active += 1
                self.pipe.max_active = max(self.pipe.max_active, self.pipe.active)
            try:
                for w in words:
                    time.sleep(self.pipe.delay_s)
                    yield w
            finally:
                with self.pipe.lock:
                    self.pipe.active -= 1
        return gen() if stream else "".join(gen())

    def relevance(self) -> np.ndarray:
        c = self.tile_coords_l0.astype(np.float64)
        if len(c) == 0:
            return np.zeros(0)
        centre = c.mean(axis=0)
        r = 1.0 / (1.0 + np.linalg.norm(c - centre, axis=1))
        return r / r.sum()


class FakeRecipe:
    def to_dict(self) -> dict:
        return {"encoder": "fake", "tile_px": 256}

    def describe(self) -> str:
        return "fake features (256-px tiles)"


class FakePipeline:
    model_id = "fake"
    recipe = FakeRecipe()

    def __init__(self, delay_s: float = 0.01):
        self.delay_s = delay_s
        self.model_calls = 0
        self.prepared = 0
        self.active = 0  # answers being generated now
        self.max_active = 0
        self.lock = threading.Lock()

    def prepare(self, path, progress=None) -> FakeSlide:
        from pathchat.wsi.slide import open_slide

        with open_slide(path) as s:
            w, h = s.dimensions
        xs, ys = np.meshgrid(np.arange(0, max(1, w - 255), 256), np.arange(0, max(1, h - 255), 256))
        coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
        for i in range(3):
            if progress:
                progress("features", i + 1, 3)
        self.prepared += 1
        bag = FeatureBag(features=np.zeros((len(coords), 4), np.float32), coords=coords, slide_id=Path(path).stem,
                         encoder="fake", mpp=0.5, patch_size_level0=256, magnification=20.0, source_format="pathchat",
                         attrs={"level0_width": w, "level0_height": h, "patch_size": 256, "overlap": 0})
        return FakeSlide(Path(path).stem, Path(path), bag, no_tissue=len(coords) == 0)

    def session(self, slide: FakeSlide, region=None) -> FakeSession:
        return FakeSession(self, slide, region)


    def answer_batch(self, items, max_new_tokens: int = 64, **generation):
        """Greedy batch answers as `Pipeline.answer_batch` gives them (the report path)."""
        out = []
        for slide, question in items:
            with self.lock:
                self.model_calls += 1
            n = len(slide.bag)
            out.append((f"Report answer to: {question}", np.full(n, 1.0 / max(n, 1))))
        return out
