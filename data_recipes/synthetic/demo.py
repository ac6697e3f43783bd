"""`make demo`: the main job end to end on built-in data, nothing downloaded and nothing trained.

1. writes three synthetic slides (tissue classes, layout and amount known; never in the training set);
2. loads the built-in model (SmolLM2-135M-Instruct + the shipped connector and LoRA adapter), or
   `--model CHECKPOINT`;
3. the inference pipeline tiles and encodes each slide into the job's feature cache, with the
   recipe the model records;
4. one chat session per slide: a report, then a few questions (follow-ups reuse the KV cache);
   the answers are printed beside the truth and written to `reports/<slide>.json` and `.md`.

It lives beside the synthetic recipe because the truth of its slides comes from that recipe's layouts;
everything between the slide file and the answer is the library's one pipeline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_recipes.synthetic.build import BuildConfig
from data_recipes.synthetic.layout import sample_layout
from data_recipes.synthetic.questions import CLASS_NAMES, QUESTION_TYPES, join_names, slide_report
from data_recipes.synthetic.truth import slide_truth

__all__ = ["REPORT_PROMPT", "demo_questions", "main", "write_demo_slides"]

REPORT_PROMPT = "Write a short report of this slide."


def write_demo_slides(folder: Path, n: int, seed: int, progress: bool = True) -> list[tuple[str, Path, Any]]:
    """Write `n` demo slides (layouts no training or held-out slide draws); returns (id, file, layout)."""
    from pathchat.wsi.synthetic import write_synthetic_slide

    cfg = BuildConfig()
    textures = tuple(cfg.seed * 64 + j for j in range(cfg.texture_variants))  # the training tissue looks
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in tqdm(range(n), desc="1/3 writing slides", unit="slide", disable=not progress):
        # split index 9: the training (0) and held-out (1) splits never draw these layouts
        lay = sample_layout(f"demo-{i:02d}", np.random.default_rng([seed, 9, i]), cfg.geometry, textures)
        path = folder / f"{lay.slide_id}.tiff"
        if not path.exists():
            write_synthetic_slide(path, lay.spec(cfg.geometry))
        out.append((lay.slide_id, path, lay))
    return out


def demo_questions(truth: Any) -> list[tuple[str, str]]:
    """(question, true answer) pairs asked after the report, worded as in the training data."""
    return [(QUESTION_TYPES["dominant_open"].wordings[0], CLASS_NAMES[truth.dominant]),
            (QUESTION_TYPES["presence_open"].wordings[0], join_names([CLASS_NAMES[c] for c in truth.present])),
            (QUESTION_TYPES["tissue_amount_open"].wordings[0], truth.amount)]


def chat_about(pipe: Any, slide: Any, truth: Any) -> dict[str, Any]:
    """One session: the report, then the questions; each answer with the truth and its top tiles."""
    session = pipe.session(slide, max_new_tokens=96)
    turns = []
    for question, expected in [(REPORT_PROMPT, slide_report(truth, 0)), *demo_questions(truth)]:
        t0 = time.perf_counter()
        answer = session.ask(question)
        chat = session._chat
        turns.append({"question": question, "answer": answer.strip(), "truth": expected,
                      # the raw ids (end-of-turn included) say why an answer reads empty, if one does
                      "answer_token_ids": list(chat.answer_ids[-1]) if chat is not None else [],
                      "seconds": round(time.perf_counter() - t0, 3),
                      "top_tiles_level0_xy": [[t["x"], t["y"]] for t in session.top_tiles(3)]})
    return {"slide": slide.slide_id, "file": str(slide.path), "tiles": slide.num_tiles, "model": pipe.model_id,
            "turns": turns, "prefill_tokens": list(session._chat.prefill_lengths) if session._chat else []}


def _markdown(report: dict[str, Any]) -> str:
    from pathchat.inference.notices import RESEARCH_NOTICE

    lines = [f"# {report['slide']}", "", f"Slide: `{report['file']}` ({report['tiles']} tiles); model "
             f"`{report['model']}`", "", f"> {RESEARCH_NOTICE} Answers of a model trained on synthetic slides.", ""]
    for t in report["turns"]:
        lines += [f"**Q:** {t['question']}", "", f"**A:** {t['answer']}", "", f"*Truth:* {t['truth']}", ""]
    return "\n".join(lines)


def _exact(answer: str, truth: str) -> bool:
    return answer.strip().rstrip(".").lower() == truth.strip().rstrip(".").lower()


def main(argv: list[str] | None = None) -> int:
    from pathchat.inference import RESEARCH_NOTICE, Pipeline
    from pathchat.utils.atomic import atomic_write_json, atomic_write_text

    parser = argparse.ArgumentParser(prog="python -m data_recipes.synthetic.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_job", help="job folder: slides, tiles, features, reports")
    parser.add_argument("--slides", type=int, default=3, help="demo slides to write and discuss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    job, progress, started = Path(args.out), not args.no_progress, time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per demo stage, not one per weight file
    print(RESEARCH_NOTICE)

    written = write_demo_slides(job / "slides", args.slides, args.seed, progress)
    pipe = Pipeline.from_pretrained(args.model, feature_job=job, progress=progress)
    print(f"model: {pipe.model_id}  (features: {pipe.recipe.describe()})")
    prepared = []
    for _, path, layout in tqdm(written, desc="2/3 tiling + encoding", unit="slide", disable=not progress):
        slide = pipe.prepare(path)
        assert slide.bag.coords is not None
        prepared.append((slide, slide_truth(layout, BuildConfig().geometry, slide.bag.coords)))

    reports_dir = job / "reports"
    reports = []
    for slide, truth in tqdm(prepared, desc="3/3 answering", unit="slide", disable=not progress):
        report = chat_about(pipe, slide, truth)
        atomic_write_json(reports_dir / f"{slide.slide_id}.json", report)
        atomic_write_text(reports_dir / f"{slide.slide_id}.md", _markdown(report))
        reports.append(report)

    right = asked = 0
    for report in reports:
        print(f"\n== {report['slide']} ({report['tiles']} tiles) -> {reports_dir / (report['slide'] + '.md')}")
        for t in report["turns"]:
            print(f"   Q: {t['question']}\n   A: {t['answer']}\n      truth: {t['truth']}")
        for t in report["turns"][1:]:
            asked += 1
            right += _exact(t["answer"], t["truth"])
    print(f"\nsummary: {len(reports)} slides, {right}/{asked} short answers exactly right; reports in {reports_dir}; "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
