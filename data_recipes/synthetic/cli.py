"""Command line of the synthetic recipe: `build` writes the dataset and prints one JSON summary line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from data_recipes.synthetic.build import BuildConfig, build_dataset


def _parser() -> argparse.ArgumentParser:
    defaults = BuildConfig()
    p = argparse.ArgumentParser(prog="python -m data_recipes.synthetic",
                                description="Synthetic slides with known content -> features, reports, questions.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the dataset (resumable: a rerun reuses finished slides)")
    b.add_argument("--out", required=True, type=Path, help="output folder")
    b.add_argument("--train", type=int, default=defaults.train, help="training slides")
    b.add_argument("--heldout", type=int, default=defaults.heldout, help="held-out slides")
    b.add_argument("--seed", type=int, default=defaults.seed, help="seed of every random choice")
    b.add_argument("--encoder", default=defaults.encoder, help="registry encoder (must need no download)")
    b.add_argument("--texture-variants", type=int, default=defaults.texture_variants,
                   help="texture seeds shared by the slides")
    b.add_argument("--workers", type=int, default=2, help="processes for writing slides and extracting")
    b.add_argument("--no-probe", action="store_true", help="skip the linear-probe learnability check")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (0 built, 1 usage or build error)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = replace(BuildConfig(), train=args.train, heldout=args.heldout, seed=args.seed, encoder=args.encoder,
                  texture_variants=args.texture_variants)
    try:
        result = build_dataset(args.out, cfg, workers=args.workers, progress=not args.no_progress,
                               probe=not args.no_probe)
    except (FileExistsError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    s = result.summary
    line = {"out": str(result.out), **{k: s["counts"][k] for k in ("train_slides", "heldout_slides",
                                                                   "rejected_slides")},
            "encoder": s["encoder"], "feature_dim": s["feature_dim"], "chance": s["chance"],
            "probe_heldout_tile_accuracy": s.get("probe", {}).get("heldout_tile_accuracy"),
            "build_seconds": s["timings"]["total_s"]}
    print(json.dumps(line))
    return 0
