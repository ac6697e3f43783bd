"""A stand-in pipeline for the batch-report machinery tests, and a `main` to run reports in a subprocess.

The stand-in reads real cached features (made by the real workers with the random tiny CNN encoder)
and answers from them deterministically, counting its calls; the model-backed path is tested with the
built-in model in test_report.py. Run as a script: `python report_fns.py OUT SLIDES… [--prompts F]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pathchat.features.store import read_features_h5
from pathchat.inference.recipe import FeatureRecipe


@dataclass
class PreparedStandIn:
    slide_id: str
    path: Any
    bag: Any
    no_tissue: bool


class StandInPipeline:
    """`Pipeline`'s report-facing surface: recipe, model_id, prepare(features h5), answer_batch."""

    device = "cpu"
    recipe = FeatureRecipe(encoder="random-cnn-tiny", feature_dim=64, target_mpp=0.5, tile_px=256,
                           overlap_px=0, min_tissue=0.25)

    def __init__(self, model_id: str = "stand-in-1", delay_s: float = 0.0):
        self.model_id = model_id
        self.delay_s = delay_s
        self.calls = 0
        self.items_seen: list[int] = []

    def prepare(self, path: str) -> PreparedStandIn:
        bag = read_features_h5(path)
        self.recipe.check(FeatureRecipe.from_bag(bag), str(path))
        return PreparedStandIn(bag.slide_id, None, bag, len(bag) == 0)

    def answer_batch(self, items: list[tuple[Any, str]], max_new_tokens: int = 64,
                     batch_size: int = 8) -> list[tuple[str, np.ndarray]]:
        self.calls += 1
        self.items_seen.append(len(items))
        time.sleep(self.delay_s)
        out = []
        for slide, question in items:
            feats = slide.bag.features.astype(np.float64)
            score = np.exp(feats[:, 0] - feats[:, 0].max())
            out.append((f"{question.split()[0]} {feats.mean():.5f} over {len(feats)} tiles", score / score.sum()))
        return out


def main(argv: list[str] | None = None) -> int:
    from pathchat.inference.report import run_reports

    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("slides", nargs="+")
    p.add_argument("--prompts")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--model-id", default="stand-in-1")
    args = p.parse_args(argv)
    pipe = StandInPipeline(args.model_id, args.delay)
    result = run_reports(args.slides, args.out, pipe, prompts=args.prompts, batch_size=args.batch_size,
                         progress=False, features=str(Path(args.out) / "features"))
    s = result.summary
    print(json.dumps({"done": s.done, "no_tissue": s.no_tissue, "skipped": s.skipped, "failed": s.failed,
                      "model_calls": result.model_calls}))
    return s.exit_code


if __name__ == "__main__":
    sys.exit(main())
