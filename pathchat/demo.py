"""`make demo`: the main job end to end on built-in data, nothing downloaded.

1. writes three synthetic slides (tissue classes, layout and amount known; never in the training set);
2. tiles them and extracts their features with the library's jobs (`pathchat tile` / `extract`);
3. loads the demo model from the cache, or trains it once (the synthetic recipe: dataset, stage 1,
   stage 2, held-out scores beside the shuffled- and zeroed-features controls);
4. asks each slide for a report and a few questions in one chat session, prints the answers next to
   the truth, and writes `reports/<slide>.json` and `.md`.

The demo's language model is a tiny Qwen2-style model trained from scratch here, not SmolLM2-135M:
one SmolLM2 training step on a batch of 8 sequences of 300 tokens took 18 s on 2 CPU cores
(measured), so even 100 steps would not fit the demo's ~10 minutes; the tiny one goes through the
whole recipe (960 stage-2 steps) in under 8. The synthetic recipe lives in `data_recipes/`, so run
the demo from the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPORT_PROMPT = "Write a short report of this slide."


def _recipe() -> Any:
    try:
        import data_recipes.synthetic.learn as learn
    except ImportError as e:  # pragma: no cover - only outside the repository
        raise SystemExit("the demo needs data_recipes/ (run it from the repository root: make demo)") from e
    return learn


def demo_model_dir(cache: Path, learn_cfg: Any) -> Path:
    """Cache folder of the demo model for this recipe config (another config trains another model)."""
    key = hashlib.sha256(json.dumps(asdict(learn_cfg), sort_keys=True).encode()).hexdigest()[:12]
    return cache / f"demo-model-{key}"


def get_demo_model(cache: Path, learn_cfg: Any, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The trained demo checkpoint and its learnability summary; trains it when not cached."""
    learn = _recipe()
    folder = demo_model_dir(cache, learn_cfg)
    summary_file = folder / "learnability.json"
    if summary_file.is_file() and (folder / "instruct" / "config.json").is_file():
        return folder / "instruct", json.loads(summary_file.read_text())
    print(f"no cached demo model: training one into {folder} (once; about 8 minutes on 2 cores) ...",
          flush=True)
    summary = learn.run_learnability(folder, learn_cfg, progress=progress)
    return folder / "instruct", summary


def demo_slides(job: Path, n: int, seed: int, progress: bool = True) -> list[dict[str, Any]]:
    """Write, tile and encode `n` demo slides; returns per slide its id, file, features and truth."""
    import numpy as np

    from data_recipes.synthetic.build import BuildConfig, extract_features
    from data_recipes.synthetic.layout import sample_layout
    from data_recipes.synthetic.truth import slide_truth
    from pathchat.features.store import read_features_h5
    from pathchat.wsi.synthetic import write_synthetic_slide

    cfg = BuildConfig()
    textures = tuple(cfg.seed * 64 + j for j in range(cfg.texture_variants))  # the training tissue looks
    slide_dir = job / "slides"
    slide_dir.mkdir(parents=True, exist_ok=True)
    layouts, paths = [], []
    for i in range(n):
        # split index 9: the training (0) and held-out (1) splits never draw these layouts
        lay = sample_layout(f"demo-{i:02d}", np.random.default_rng([seed, 9, i]), cfg.geometry, textures)
        path = slide_dir / f"{lay.slide_id}.tiff"
        if not path.exists():
            write_synthetic_slide(path, lay.spec(cfg.geometry))
        layouts.append(lay)
        paths.append(path)
    features_dir = extract_features(cfg, paths, job, workers=2, progress=progress)
    out = []
    for lay, path in zip(layouts, paths, strict=True):
        bag = read_features_h5(features_dir / f"{lay.slide_id}.h5")
        assert bag.coords is not None
        truth = slide_truth(lay, cfg.geometry, bag.coords)
        out.append({"id": lay.slide_id, "file": path, "features": features_dir / f"{lay.slide_id}.h5",
                    "truth": truth})
    return out


def _questions(truth: Any) -> list[tuple[str, str]]:
    """(question, true answer) pairs asked in the demo, worded as in the training data."""
    from data_recipes.synthetic.questions import CLASS_NAMES, QUESTION_TYPES, join_names

    return [(QUESTION_TYPES["dominant_open"].wordings[0], CLASS_NAMES[truth.dominant]),
            (QUESTION_TYPES["presence_open"].wordings[0], join_names([CLASS_NAMES[c] for c in truth.present])),
            (QUESTION_TYPES["tissue_amount_open"].wordings[0], truth.amount)]


def chat_about(model: Any, tokenizer: Any, slide: dict[str, Any]) -> dict[str, Any]:
    """One chat session: a report, then the questions; answers with the truth and the top tiles."""
    import torch

    from data_recipes.synthetic.questions import slide_report
    from pathchat.data.slide_features import tiles_from_bag
    from pathchat.features.store import read_features_h5
    from pathchat.inference.engine import ChatSession

    bag = read_features_h5(slide["features"])
    tiles = tiles_from_bag(bag)
    session = ChatSession(model, tokenizer, tiles.features, tiles.coords_um, slide_size_um=tiles.slide_size_um,
                          max_new_tokens=96)
    turns = []
    for question, truth in [(REPORT_PROMPT, slide_report(slide["truth"], 0)), *_questions(slide["truth"])]:
        t0 = time.perf_counter()
        answer = session.ask(question)
        relevance = session.relevance().flatten()
        top = torch.topk(relevance, k=min(3, relevance.numel())).indices.tolist()
        turns.append({"question": question, "answer": str(answer), "truth": truth,
                      # the raw ids (end-of-turn included) say why an answer reads empty, if one does
                      "answer_token_ids": list(session.answer_ids[-1]) if session.answer_ids else [],
                      "seconds": round(time.perf_counter() - t0, 3),
                      "top_tiles_level0_xy": [bag.coords[i].tolist() for i in top] if bag.coords is not None else []})
    return {"slide": slide["id"], "file": str(slide["file"]), "tiles": len(bag), "turns": turns,
            "prefill_tokens": list(session.prefill_lengths)}


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# {report['slide']}", "", f"Slide: `{report['file']}` ({report['tiles']} tiles)", "",
             "> Research use only; generated by a demo model trained on synthetic slides.", ""]
    for t in report["turns"]:
        lines += [f"**Q:** {t['question']}", "", f"**A:** {t['answer']}", "", f"*Truth:* {t['truth']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pathchat.model.pretrained import load_pathchat
    from pathchat.model.smollm import default_cache_dir
    from pathchat.utils.atomic import atomic_write_json, atomic_write_text

    parser = argparse.ArgumentParser(prog="python -m pathchat.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_job", help="job folder (slides, tiles, features, reports)")
    parser.add_argument("--slides", type=int, default=3, help="demo slides to write and discuss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", help="where the demo model is cached (default: $PATHCHAT_CACHE or "
                                        "~/.cache/pathchat)")
    parser.add_argument("--quick", action="store_true", help="a tiny, barely trained model (for tests)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    learn = _recipe()
    job = Path(args.out)
    progress = not args.no_progress
    started = time.perf_counter()

    print(f"1-2. writing {args.slides} synthetic slides to {job / 'slides'}, tiling and extracting ...", flush=True)
    slides = demo_slides(job, args.slides, args.seed, progress=progress)
    for s in slides:
        print(f"   {s['id']}: {s['file']} -> {s['features']}")

    cfg = learn.LearnConfig(seed=args.seed)
    if args.quick:
        cfg = learn.LearnConfig(seed=args.seed, train_slides=12, heldout_slides=4, align_epochs=1.0,
                                instruct_epochs=1.0, consistency_repeats=0)
    cache = Path(args.cache) if args.cache else default_cache_dir()
    ckpt, summary = get_demo_model(cache, cfg, progress=progress)
    print(f"3. demo model: {ckpt}")
    print(f"   held-out closed questions: {summary['heldout_accuracy']:.1%} (shuffled features "
          f"{summary['shuffled_features_accuracy']:.1%}, zeroed {summary['zeroed_features_accuracy']:.1%}, "
          f"chance {summary['chance']:.1%})")
    model, tokenizer = load_pathchat(ckpt, device="cpu")

    print("4. chat with each slide:")
    reports_dir = job / "reports"
    reports_dir.mkdir(parents=True, exist_ok=True)
    for slide in slides:
        report = chat_about(model, tokenizer, slide)
        atomic_write_json(reports_dir / f"{slide['id']}.json", report)
        atomic_write_text(reports_dir / f"{slide['id']}.md", _markdown(report))
        print(f"\n== {slide['id']} ({report['tiles']} tiles) -> {reports_dir / (slide['id'] + '.md')}")
        for t in report["turns"]:
            print(f"   Q: {t['question']}\n   A: {t['answer']}\n      truth: {t['truth']}")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
