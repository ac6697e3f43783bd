"""Report throughput: `pathchat report` (cross-slide batches, preparation overlapped) vs a plain loop.

Run with `python bench/bench_reports.py [--model CKPT]` (default: the built-in model). Both arms
start from an empty feature cache, so each tiles, encodes and reports the same generated slides
with the same model and prompt set:

- `plain`: one slide at a time in this process: `pipe.prepare` (tile + encode), then each section
  asked on its own (`write_report` with a one-question generation step);
- `per_slide_batched`: the same loop, but a slide's sections in one batch (`write_report`'s default);
- `pipelined`: `run_reports` (worker processes prepare the next slides and write the files while
  this process generates the sections of every waiting slide in one left-padded batch).

Reports per hour = slides / wall seconds x 3600; the answers of the arms are compared (greedy, so
they must be identical). Also the time to first token of a chat follow-up against the first turn
of a `SlideSession` (median over `--chat-repeats` fresh sessions). Prints one JSON object and
writes bench/results/reports.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pathchat.inference import Pipeline
from pathchat.inference.report import PipelineGenerator, run_reports, write_report
from pathchat.inference.report_prompts import load_prompt_set
from pathchat.utils.atomic import atomic_write_json
from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide

RESULTS = Path(__file__).resolve().parent / "results"
FIRST_QUESTION = "Which tissue types are present?"
FOLLOW_UP = "How much tissue is on the slide?"


def make_slides(folder: Path, n: int, size_px: int) -> list[Path]:
    """`n` generated slides with two tissue regions each (different layouts, seeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        a = size_px // 2
        regions = (TissueRegion("tumor", (i * 97) % (size_px // 4), 0, a, a),
                   TissueRegion("stroma", a, (i * 61) % (size_px // 4), a // 2, a))
        spec = SyntheticSlideSpec(size_px, size_px, mpp=0.5, regions=regions, seed=i)
        paths.append(write_synthetic_slide(folder / f"bench_{i:02d}.svs", spec))
    return paths


def _answers(folder: Path, names: list[str]) -> dict[str, list[str]]:
    return {n: [s["answer"] for s in json.loads((folder / f"{n}.json").read_text())["sections"]] for n in names}


def _differences(answers: dict[str, dict[str, list[str]]]) -> list[dict[str, Any]]:
    """Sections whose answer differs between the arms (greedy decoding: there should be none)."""
    out = []
    for name, plain in answers["plain"].items():
        for i, text in enumerate(plain):
            others = {arm: answers[arm][name][i] for arm in answers if arm != "plain"}
            if any(t != text for t in others.values()):
                out.append({"slide": name, "section": i, "plain": text, **others})
    return out


def plain_loop(pipe: Pipeline, slides: list[Path], out: Path, prompts: Any, batch_sections: bool) -> float:
    """Seconds to report every slide one at a time in this process (sections one by one, or batched)."""
    t0 = time.perf_counter()
    for path in slides:
        slide = pipe.prepare(path)
        gen = PipelineGenerator(pipe, max_items=len(prompts.sections) if batch_sections else 1)
        write_report(pipe, slide, out, prompts=prompts, generator=gen)
    return time.perf_counter() - t0


def chat_ttft(pipe: Pipeline, slide_path: Path, repeats: int, max_new_tokens: int) -> dict[str, Any]:
    """Median ms to the first streamed piece: first turn (slide + question) vs the follow-up."""
    slide = pipe.prepare(slide_path)
    first, follow = [], []
    for _ in range(repeats):
        session = pipe.session(slide, max_new_tokens=max_new_tokens)
        for question, times in ((FIRST_QUESTION, first), (FOLLOW_UP, follow)):
            t0 = time.perf_counter()
            stream = session.ask(question, stream=True)
            next(stream)
            times.append((time.perf_counter() - t0) * 1000)
            for _ in stream:  # finish the answer so the follow-up builds on it
                pass
    chat = session._chat
    return {"first_turn_ms": round(statistics.median(first), 1), "follow_up_ms": round(statistics.median(follow), 1),
            "ratio_first_to_follow_up": round(statistics.median(first) / statistics.median(follow), 2),
            "prefill_tokens": list(chat.prefill_lengths) if chat is not None else [],
            "connector_runs_per_session": chat.connector_runs if chat is not None else 0, "repeats": repeats}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: the built-in model)")
    # 16: the report workers' start-up (a torch import each) is paid once per job; a lab's job has thousands
    parser.add_argument("--slides", type=int, default=16, help="generated slides per arm")
    parser.add_argument("--size-px", type=int, default=3072, help="level-0 side of each generated slide")
    parser.add_argument("--batch-size", type=int, default=4, help="slides per generation round (pipelined)")
    parser.add_argument("--prompts", help="prompt set YAML (default: the shipped one)")
    parser.add_argument("--max-new-tokens", type=int, help="override every section's answer budget")
    parser.add_argument("--chat-repeats", type=int, default=5)
    parser.add_argument("--chat-new-tokens", type=int, default=32, help="answer budget of each chat turn")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of this process")
    parser.add_argument("--out", default=str(RESULTS / "reports.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = load_prompt_set(args.prompts)
    work = Path(tempfile.mkdtemp(prefix="bench-reports-"))
    try:
        prompts_file = work / "prompts.yaml"
        if args.max_new_tokens:
            import yaml

            data = prompts.to_dict()
            sections = [{"name": s["name"], "title": s["title"], "question": s["question"]} for s in data["sections"]]
            prompts_file.write_text(yaml.safe_dump({"name": prompts.name, "max_new_tokens": args.max_new_tokens,
                                                    "sections": sections}))
            prompts = load_prompt_set(prompts_file)
        slides = make_slides(work / "slides", args.slides, args.size_px)
        names = [p.stem for p in slides]
        results: dict[str, Any] = {}
        arms: dict[str, float] = {}
        for arm in ("plain", "per_slide_batched", "pipelined"):
            pipe = Pipeline.from_pretrained(args.model, device="cpu", feature_job=work / f"features_{arm}",
                                            progress=False)
            out = work / arm
            if arm == "pipelined":
                t0 = time.perf_counter()
                run = run_reports([work / "slides"], out, pipe, prompts=str(prompts_file) if args.max_new_tokens
                                  else args.prompts, batch_size=args.batch_size, progress=False)
                arms[arm] = time.perf_counter() - t0
                assert run.summary.done == len(slides), run.summary.failures
                results["pipelined_rounds"] = {"rounds": len(run.batch_sizes), "model_calls": run.model_calls,
                                               "slides_per_round": run.batch_sizes}
            else:
                arms[arm] = plain_loop(pipe, slides, out, prompts, batch_sections=arm == "per_slide_batched")
            print(f"{arm}: {arms[arm]:.1f} s", flush=True)
            results.setdefault("answers", {})[arm] = _answers(out, names)
        answers = results.pop("answers")
        per_hour = {arm: round(len(slides) / s * 3600, 1) for arm, s in arms.items()}
        pipe = Pipeline.from_pretrained(args.model, device="cpu", feature_job=work / "features_pipelined",
                                        progress=False)
        result = {
            "model": pipe.model_id, "slides": len(slides), "slide_px": args.size_px,
            "sections": [s.name for s in prompts.sections], "batch_size": args.batch_size,
            "cpu_count": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
            "seconds": {k: round(v, 2) for k, v in arms.items()}, "reports_per_hour": per_hour,
            "speedup_pipelined_vs_plain": round(arms["plain"] / arms["pipelined"], 2),
            "speedup_pipelined_vs_per_slide_batched": round(arms["per_slide_batched"] / arms["pipelined"], 2),
            "identical_answers": answers["plain"] == answers["pipelined"] == answers["per_slide_batched"],
            "differing_sections": _differences(answers),
            **results,
            "chat_ttft": chat_ttft(pipe, slides[0], args.chat_repeats, args.chat_new_tokens),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
