"""Training benchmark: per-slide packing vs one question per sample, Trainer overhead, peak memory.

Run with `python bench/bench_training.py`. Builds its own data in a temporary folder: slides of
`--tiles` random 512-d tile features (4 tissue prototypes plus noise, on a 128 µm grid) with
6-8 questions each (closed questions with options, short open answers, all following from the
features), written in the SlideChat layout (one question per record, each showing the slide).
The model is the real training stack (`train_stage`, `PathChatTrainer`, the default
`scale_invariant` connector, k = 128 slide tokens) around a random `tiny:qwen2` LM of the size
the synthetic recipe trains (4 layers, hidden 128), fp32 on CPU, 1 thread. Three measurements:

1. `packing`: the same answers trained once with `data.pack_by_slide: true` (all questions about a
   slide in one sequence, one slide encoding) and once with it off (SlideChat: the slide encoded
   again for every question); the split run's batch holds the same number of answers as the
   packed one (batch x mean questions per slide), so both take the same number of optimizer steps.
   Answers/s = answers per step / mean step time, the first `--skip-steps` steps excluded; step time
   runs from one `on_step_end` to the next (data loading, collation, forward, backward, optimizer),
   on the wall clock and in process CPU time (steadier when other jobs share the CPU). "Equal
   loss": the answer-token loss of both trained models (and of the untrained one) on the same
   held-out slides, in both layouts, and each run's training loss over its last steps. A cost
   breakdown (connector forward+backward per slide vs the whole packed step) says why the ratio is
   what it is: the connector runs once per question without packing, the LM sees k slide tokens
   again per question.
2. `trainer_step`: `PathChatTrainer` vs a plain `transformers.Trainer` on the same model (same
   seed), the same batch (every sample is the same packed slide, so every batch is identical), the
   same optimizer and schedule; no saving, logging or progress bar; warm-up steps excluded; median
   over interleaved repeats. Both must end with the same weights (`max_param_diff`).
3. `memory`: `align` (connector only), `instruct` (full) and `instruct` + LoRA, each trained for a
   few steps in a fresh subprocess (a bigger LM, 8 layers x 512, so that what each stage keeps
   shows); peak RSS from VmHWM (through the training loop, and through the whole stage with the
   model build and final save), RSS after imports, `ru_maxrss` (which on Linux starts from the
   parent's RSS, so the probes run before this process grows), and the analytic size of
   weights + gradients + AdamW state. A CPU peak of torch allocations is not reported:
   torch keeps no allocator statistics on the CPU, and the profiler that could count them costs
   more than the run.
4. `logits`: one forward + backward of a PathChat around a language model with a real LLM's
   vocabulary (`--logits-vocab`, Qwen2.5's 151,936 by default; 2 layers x 128, so the LM head and
   the logits are what weigh), `--logits-batch` sequences of `--logits-length` tokens with a
   label on `--logits-labelled` of them (the answers), computed with logits at every position and
   with `logits_only_at_labels` (what `PathChatTrainer` uses); each in a fresh subprocess: peak RSS
   (VmHWM) over the step, the step's time, and the loss (equal in both).

One torch thread by default: on this shared 2-core machine, with another job running, every
parallel elementwise op at 2 threads waited about 8 ms for the second thread (a 10k-element
`sqrt` took 8 ms instead of 5 µs, an AdamW step on 0.6M parameters 0.46 s), which swamped
everything measured here. `--threads 2` is there for a quiet machine.

Prints one JSON object and writes bench/results/training.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = ["tumour", "stroma", "lymphocytes", "necrosis"]
AMOUNTS = ["small", "medium", "large"]


# ------------------------------------------------------------------------------------------ data


def _slide_questions(rng: np.random.Generator, dominant: str, present: list[str], tumour_bin: str
                     ) -> list[tuple[str, str]]:
    """Every question the bench can ask about one slide, with its answer."""
    from pathchat.evaluation.prompts import closed_answer_text, format_closed_question

    def closed(question: str, options: list[str], answer: str) -> tuple[str, str]:
        opts = list(options)
        rng.shuffle(opts)
        return format_closed_question(question, opts), closed_answer_text(opts, opts.index(answer))

    absent = [c for c in CLASSES if c not in present]
    probe_yes, probe_no = str(rng.choice(present)), str(rng.choice(absent)) if absent else None
    qs = [
        closed("Which tissue type dominates this slide?", CLASSES, dominant),
        ("What is the main tissue on the slide?", dominant),
        closed("How much tumour is on the slide?", AMOUNTS, tumour_bin),
        ("Which tissue types can be seen?", ", ".join(sorted(present))),
        (f"Is there {probe_yes} in this slide?", "Yes."),
        closed("How many tissue types does the slide show?", ["1", "2", "3", "4"], str(len(present))),
        ("Describe the slide in one sentence.",
         f"Mostly {dominant}, with {tumour_bin} tumour content."),
        ("Is the tumour burden small, medium or large?", tumour_bin),
    ]
    if probe_no is not None:
        qs.append((f"Is there {probe_no} in this slide?", "No."))
    return qs


def make_data(folder: Path, slides: int, heldout: int, tiles: int, feature_dim: int, questions: tuple[int, int],
              seed: int = 0) -> dict[str, Any]:
    """Feature files and SlideChat-layout records (one question each) for train and held-out slides."""
    from pathchat.features.store import FeatureBag, write_features_h5

    rng = np.random.default_rng(seed)
    proto = np.random.default_rng(1234).normal(size=(len(CLASSES), feature_dim)).astype(np.float32)
    feats = folder / "features"
    feats.mkdir(parents=True, exist_ok=True)
    side = math.ceil(math.sqrt(tiles))
    grid = np.stack([np.arange(tiles) % side, np.arange(tiles) // side], axis=1).astype(np.int64) * 256
    split: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    align: list[dict[str, Any]] = []
    for i in range(slides + heldout):
        part = "train" if i < slides else "heldout"
        sid = f"bench-{part}-{i:04d}"
        n_present = int(rng.integers(1, len(CLASSES) + 1))
        present = [CLASSES[j] for j in sorted(rng.choice(len(CLASSES), n_present, replace=False))]
        weights = rng.dirichlet(np.ones(n_present)) + 0.05
        weights /= weights.sum()
        labels = rng.choice(n_present, size=tiles, p=weights)
        counts = np.bincount(labels, minlength=n_present)
        dominant = present[int(counts.argmax())]
        frac = counts[present.index("tumour")] / tiles if "tumour" in present else 0.0
        tumour_bin = AMOUNTS[0 if frac < 0.2 else 1 if frac < 0.5 else 2]
        cls = np.array([CLASSES.index(present[j]) for j in labels])
        features = proto[cls] + 0.5 * rng.normal(size=(tiles, feature_dim)).astype(np.float32)
        bag = FeatureBag(features=features, coords=grid.copy(), slide_id=sid, encoder="bench", mpp=0.5,
                         patch_size_level0=256, magnification=20.0, source_format="pathchat")
        write_features_h5(feats / f"{sid}.h5", bag)
        pool = _slide_questions(rng, dominant, present, tumour_bin)
        n_q = int(rng.integers(questions[0], questions[1] + 1))
        for j in rng.permutation(len(pool))[:n_q]:
            q, a = pool[int(j)]
            split[part].append({"id": f"{sid}/q{int(j)}", "slide": sid, "conversations": [
                {"from": "human", "value": f"<slide>\n{q}"}, {"from": "gpt", "value": a}]})
        if part == "train":
            align.append({"id": f"{sid}/report", "slide": sid, "conversations": [
                {"from": "human", "value": "<slide>\nDescribe the slide."},
                {"from": "gpt", "value": f"Mostly {dominant}; present: {', '.join(present)}; "
                                         f"{tumour_bin} tumour content."}]})
    paths: dict[str, Any] = {"features": feats}
    for name, rows in (("train", split["train"]), ("heldout", split["heldout"]), ("align", align)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["train_answers"] = len(split["train"])
    paths["train_slides"] = slides
    return paths


# ------------------------------------------------------------------------------------------ model


def tiny_lm(args: argparse.Namespace, memory: bool = False) -> dict[str, Any]:
    hidden, layers = (args.memory_lm_hidden, args.memory_lm_layers) if memory else (args.lm_hidden, args.lm_layers)
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 2 * hidden, "max_position_embeddings": 4096}


def stage_config(args: argparse.Namespace, data: dict[str, Any], stage: str, out: Path, *, pack: bool = True,
                 lora: bool = False, batch_size: int = 2, epochs: float = 1.0, max_steps: int = -1,
                 memory: bool = False) -> Any:
    from pathchat.training.config import (
        DataConfig,
        LoraConfigSpec,
        ModelConfig,
        StageConfig,
        TrainingConfig,
    )

    return StageConfig(
        stage=stage,  # type: ignore[arg-type]
        output_dir=str(out),
        model=ModelConfig(language_model="tiny:qwen2", tiny=tiny_lm(args, memory), connector=dict(args.connector),
                          seed=0),
        data=DataConfig(train=[str(data["align" if stage == "align" else "train"])], features=str(data["features"]),
                        max_length=4096, max_tiles=None, pack_by_slide=pack),
        lora=LoraConfigSpec(enabled=lora, r=8, alpha=16, dropout=0.0),
        training=TrainingConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                                learning_rate=args.lr, warmup_ratio=0.05, seed=0, logging_steps=1, save_steps=0,
                                report_to=[], progress=False, resume="never", use_cpu=True),
    )


def _step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall and CPU time from one optimizer step's end to the next; keeps the trained model."""

        def __init__(self) -> None:
            self.wall: list[float] = []
            self.cpu: list[float] = []
            self.model: Any = None
            self.trainable_params = 0
            self.peak_rss_kib = 0
            self._mark = (0.0, 0.0)

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.model = model
            if model is not None:
                self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self._mark = (time.perf_counter(), time.process_time())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            w, c = time.perf_counter(), time.process_time()
            self.wall.append(w - self._mark[0])
            self.cpu.append(c - self._mark[1])
            self._mark = (w, c)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if Path("/proc/self/status").is_file():
                self.peak_rss_kib = _vm_kib("VmHWM")

    return StepTimer()


def heldout_loss(model: Any, tokenizer: Any, data: dict[str, Any], pack: bool) -> float:
    """Mean loss per answer token over the held-out slides, in the packed or the one-question layout."""
    import torch

    from pathchat.data.collator import PathChatCollator
    from pathchat.data.dataset import ConversationDataset
    from pathchat.data.records import load_records, pack_by_slide
    from pathchat.data.slide_features import SlideFeatureStore

    records = load_records(data["heldout"])
    if pack:
        records = pack_by_slide(records)
    store = SlideFeatureStore(data["features"], max_tiles=None)
    k = int(model.config.num_slide_tokens)
    ds = ConversationDataset(records, store, tokenizer, k, max_length=4096, progress=False)
    collate = PathChatCollator(pad_token_id=int(tokenizer.pad_token_id))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(len(ds)):
            batch = collate([ds[i]])
            batch.pop("sample_ids")
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    model.train(was_training)
    return total / count


def connector_cost(model: Any, tiles: int, feature_dim: int, repeats: int = 3) -> dict[str, float]:
    """Median wall/CPU ms of one slide through the connector, forward + backward (training mode)."""
    import torch

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, tiles, feature_dim, generator=g)
    side = math.ceil(math.sqrt(tiles))
    idx = torch.arange(tiles)
    coords = (torch.stack([idx % side, idx // side], dim=1).float() * 128.0)[None]
    wall, cpu = [], []
    for _ in range(repeats + 1):
        w, c = time.perf_counter(), time.process_time()
        model.connector(feats, coords, None).tokens.sum().backward()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    model.zero_grad(set_to_none=True)
    return {"wall_ms": 1000 * statistics.median(wall[1:]), "cpu_ms": 1000 * statistics.median(cpu[1:])}


def bench_packing(args: argparse.Namespace, data: dict[str, Any], work: Path) -> dict[str, Any]:
    from pathchat.training.run import train_stage

    mean_q = data["train_answers"] / data["train_slides"]
    batches = {"packed": args.batch_slides, "one_question": max(1, round(args.batch_slides * mean_q))}
    runs: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for name, pack in (("packed", True), ("one_question", False)):
        timer = _step_timer()
        cfg = stage_config(args, data, "instruct", work / f"run_{name}", pack=pack, batch_size=batches[name],
                           epochs=args.epochs)
        t0 = time.perf_counter()
        result = train_stage(cfg, callbacks=[timer])
        total_s = time.perf_counter() - t0
        skip = min(args.skip_steps, len(timer.wall) - 1)
        answers = result.num_answers * args.epochs
        per_step = answers / result.global_step
        wall = statistics.mean(timer.wall[skip:])
        cpu = statistics.mean(timer.cpu[skip:])
        tail = max(1, len(result.losses) // 4)
        runs[name] = {
            "samples": result.num_samples, "answers": result.num_answers, "batch_size": batches[name],
            "optimizer_steps": result.global_step, "answers_per_step": round(per_step, 2),
            "mean_step_s": round(wall, 4), "mean_step_cpu_s": round(cpu, 4),
            "answers_per_s": round(per_step / wall, 2), "answers_per_cpu_s": round(per_step / cpu, 2),
            "train_loop_s": round(sum(timer.wall), 2), "train_stage_total_s": round(total_s, 2),
            "train_loss_first": round(result.losses[0], 4),
            "train_loss_last_quarter": round(statistics.mean(result.losses[-tail:]), 4),
        }
        models[name] = timer.model
    from pathchat.training.run import build_stage_model

    init_model, tokenizer = build_stage_model(stage_config(args, data, "instruct", work / "init"))
    loss: dict[str, dict[str, float]] = {}
    for name, model in (("untrained", init_model), *models.items()):
        loss[name] = {f"{layout}_layout": round(heldout_loss(model, tokenizer, data, pack=layout == "packed"), 4)
                      for layout in ("packed", "one_question")}
    cost = connector_cost(init_model, args.tiles, args.feature_dim)
    p, s = runs["packed"], runs["one_question"]
    slides_per_step = p["samples"] / p["optimizer_steps"]
    conn_share_packed = cost["cpu_ms"] / 1000 * slides_per_step / p["mean_step_cpu_s"]
    return {
        "batch": batches, "runs": runs,
        "answers_per_s_ratio": round(p["answers_per_s"] / s["answers_per_s"], 3),
        "answers_per_cpu_s_ratio": round(p["answers_per_cpu_s"] / s["answers_per_cpu_s"], 3),
        "target_ratio": 5.0,
        "heldout_answer_loss": loss,
        "heldout_loss_gap_one_question_layout": round(loss["packed"]["one_question_layout"]
                                                      - loss["one_question"]["one_question_layout"], 4),
        "cost_breakdown": {
            "connector_fwd_bwd_ms_per_slide": {k: round(v, 2) for k, v in cost.items()},
            "connector_share_of_packed_step_cpu": round(conn_share_packed, 3),
            "mean_questions_per_slide": round(mean_q, 2),
            "tokens_per_answer": {"packed": round(_mean_tokens(args, data, True) / mean_q, 1),
                                  "one_question": round(_mean_tokens(args, data, False), 1)},
            "ceiling_if_connector_only": round(mean_q, 2),
        },
    }


def _mean_tokens(args: argparse.Namespace, data: dict[str, Any], pack: bool) -> float:
    """Mean rendered length of a training sample (slide tokens included) in one layout."""
    from pathchat.data.dataset import ConversationDataset
    from pathchat.data.records import load_records, pack_by_slide
    from pathchat.data.slide_features import SlideFeatureStore
    from pathchat.model.pretrained import load_language_model

    tokenizer = load_language_model("tiny:qwen2", tiny=tiny_lm(args))[1]
    from pathchat.model.conversation import add_slide_tokens

    add_slide_tokens(tokenizer)
    records = load_records(data["train"])
    if pack:
        records = pack_by_slide(records)
    k = int(args.num_slide_tokens)
    ds = ConversationDataset(records, SlideFeatureStore(data["features"]), tokenizer, k, max_length=4096,
                             progress=False)
    return statistics.mean(ds.lengths)


# ------------------------------------------------------------------------------------------ trainer overhead


class _Repeat:
    """The same collated-ready item `n` times: every batch either trainer draws is identical."""

    def __init__(self, item: dict[str, Any], n: int):
        self.item, self.n = item, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.item


def bench_trainer_step(args: argparse.Namespace, data: dict[str, Any], work: Path) -> dict[str, Any]:
    import torch
    from transformers import Trainer, TrainingArguments

    from pathchat.data.collator import PathChatCollator
    from pathchat.data.dataset import ConversationDataset
    from pathchat.data.records import load_records, pack_by_slide
    from pathchat.data.slide_features import SlideFeatureStore
    from pathchat.training.run import build_stage_model
    from pathchat.training.trainable import select_trainable
    from pathchat.training.trainer import PathChatTrainer

    cfg = stage_config(args, data, "instruct", work / "step")
    base, tokenizer = build_stage_model(cfg)
    select_trainable(base, "instruct")
    records = pack_by_slide(load_records(data["train"]))[:1]
    k = base.config.num_slide_tokens
    assert k is not None
    ds = ConversationDataset(records, SlideFeatureStore(data["features"]), tokenizer, k, max_length=4096,
                             progress=False)
    steps = args.step_warmup + args.step_steps
    batch = args.batch_slides
    dataset = _Repeat(ds[0], steps * batch)
    collate = PathChatCollator(pad_token_id=int(tokenizer.pad_token_id))

    def plain_collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out = collate(items)
        out.pop("sample_ids")
        return out

    def targs(name: str) -> TrainingArguments:
        return TrainingArguments(
            output_dir=str(work / f"step_{name}"), max_steps=steps, per_device_train_batch_size=batch,
            learning_rate=args.lr, warmup_steps=0.05, lr_scheduler_type="cosine", max_grad_norm=1.0,
            optim="adamw_torch", seed=0, data_seed=0, logging_strategy="no", save_strategy="no",
            report_to="none", disable_tqdm=True, remove_unused_columns=False, use_cpu=True,
            dataloader_num_workers=0)

    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in ("pathchat", "plain")}
    finals: dict[str, Any] = {}
    for _ in range(args.step_repeats):  # interleaved, so load changes hit both alike
        for name in ("pathchat", "plain"):
            model = copy.deepcopy(base)
            timer = _step_timer()
            trainer: Trainer
            if name == "pathchat":
                trainer = PathChatTrainer(model=model, args=targs(name), train_dataset=dataset,  # type: ignore[arg-type]
                                          data_collator=collate, lengths=[len(ds.samples[0])] * len(dataset),
                                          callbacks=[timer])
            else:
                trainer = Trainer(model=model, args=targs(name), train_dataset=dataset,  # type: ignore[arg-type]
                                  data_collator=plain_collate, callbacks=[timer])
            trainer.train()
            times[name]["wall"].extend(timer.wall[args.step_warmup:])
            times[name]["cpu"].extend(timer.cpu[args.step_warmup:])
            finals[name] = model
    diff = max(float((a.detach() - b.detach()).abs().max()) for a, b in
               zip(finals["pathchat"].parameters(), finals["plain"].parameters(), strict=True))
    med = {n: {c: statistics.median(v) for c, v in t.items()} for n, t in times.items()}
    return {
        "batch_size": batch, "tokens_per_sample": len(ds.samples[0]), "tiles_per_sample": args.tiles,
        "warmup_steps": args.step_warmup, "timed_steps_per_repeat": args.step_steps, "repeats": args.step_repeats,
        "pathchat_step_ms": round(1000 * med["pathchat"]["wall"], 2),
        "plain_step_ms": round(1000 * med["plain"]["wall"], 2),
        "pathchat_step_cpu_ms": round(1000 * med["pathchat"]["cpu"], 2),
        "plain_step_cpu_ms": round(1000 * med["plain"]["cpu"], 2),
        "ratio": round(med["pathchat"]["wall"] / med["plain"]["wall"], 3),
        "ratio_cpu": round(med["pathchat"]["cpu"] / med["plain"]["cpu"], 3),
        "target_ratio": 1.1,
        "max_param_diff": diff,
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------ memory


STAGES = {"align": ("align", False), "instruct_full": ("instruct", False), "instruct_lora": ("instruct", True)}


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(args: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: train one stage for a few steps; peak RSS and analytic state sizes.

    ``ru_maxrss`` is reported as asked, but on Linux it also holds the RSS of the process that
    forked this one (kept through exec), so the peaks below come from VmHWM, which exec resets:
    through the imports, then (reset after the imports) through the end of the training loop and
    through the whole stage (model build, training, final save).
    """
    import torch

    import pathchat.training.run  # noqa: F401  (imports counted in the baseline, not the stage)

    torch.set_num_threads(args.threads)
    after_imports = _vm_kib("VmRSS") / 1024
    peak_imports = _vm_kib("VmHWM") / 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: what follows is the stage alone
    from pathchat.training.run import train_stage

    data = json.loads(args.data_json)
    stage, lora = STAGES[args.memory_probe]
    timer = _step_timer()
    cfg = stage_config(args, data, stage, Path(data["work"]) / f"mem_{args.memory_probe}", lora=lora,
                       batch_size=args.batch_slides, max_steps=args.memory_steps, memory=True)
    result = train_stage(cfg, callbacks=[timer])
    peak_stage = _vm_kib("VmHWM") / 1024
    model = timer.model
    params = sum(p.numel() for p in model.parameters())
    trainable = timer.trainable_params
    return {
        "stage": stage, "lora": lora, "steps": result.global_step, "trainable_tensors": len(result.trainable),
        "parameters": params, "trainable_parameters": trainable,
        "peak_rss_mib": round(max(peak_imports, peak_stage), 1),
        "rss_after_imports_mib": round(after_imports, 1),
        "peak_rss_training_mib": round(timer.peak_rss_kib / 1024, 1),
        "peak_rss_stage_mib": round(peak_stage, 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "weights_grads_adam_mib": round((4 * params + 4 * trainable * 3) / 2**20, 2),
    }


def logits_probe(args: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: one training forward + backward, logits everywhere or at labels only."""
    import torch

    from pathchat.model.modeling import build_pathchat
    from pathchat.model.tokenizers import build_test_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = build_test_tokenizer("qwen2")
    text = {"model_type": "qwen2", "vocab_size": args.logits_vocab, "hidden_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
            "max_position_embeddings": max(1024, args.logits_length + 64)}
    connector = {"type": "resampler", "num_latents": 8, "hidden_dim": 64, "num_heads": 4, "num_layers": 1}
    model = build_pathchat(text, tokenizer, 64, connector).train()
    k = model.config.num_slide_tokens
    g = torch.Generator().manual_seed(0)
    b, length = args.logits_batch, args.logits_length
    ids = torch.randint(10, len(tokenizer) - 10, (b, length), generator=g)
    ids[:, 1:1 + k] = model.config.slide_placeholder_id
    labels = torch.full_like(ids, -100)
    answers = torch.rand(b, length, generator=g) < args.logits_labelled
    answers[:, : 1 + k] = False
    labels[answers] = ids[answers]
    tiles = {"tile_features": torch.randn(b, 64, 64, generator=g), "tile_coords": torch.rand(b, 64, 2, generator=g)}
    only = args.logits_probe == "labels"
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the step alone
    before = _vm_kib("VmRSS") / 1024
    t = time.perf_counter()
    out = model(input_ids=ids, labels=labels, logits_only_at_labels=only, **tiles)
    out.loss.backward()
    seconds = time.perf_counter() - t
    return {"logits": args.logits_probe, "logits_shape": list(out.logits.shape), "loss": float(out.loss),
            "step_s": round(seconds, 3), "rss_before_mib": round(before, 1),
            "peak_rss_step_mib": round(_vm_kib("VmHWM") / 1024, 1),
            "labelled_positions": int((labels[:, 1:] != -100).sum())}


def _run_probe(argv: list[str], what: str, extra: list[str]) -> dict[str, Any]:
    """Run this script again in a fresh process with probe arguments; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, __file__, *argv, *extra], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_logits(argv: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {name: _run_probe(argv, f"logits probe {name}", ["--logits-probe", name])
                           for name in ("all", "labels")}
    out["peak_rss_saved_mib"] = round(out["all"]["peak_rss_step_mib"] - out["labels"]["peak_rss_step_mib"], 1)
    out["loss_abs_diff"] = abs(out["all"]["loss"] - out["labels"]["loss"])
    return out


def bench_memory(args: argparse.Namespace, data: dict[str, Any], work: Path, argv: list[str]) -> dict[str, Any]:
    payload = json.dumps({k: str(v) for k, v in data.items() if isinstance(v, Path)} | {"work": str(work)})
    return {name: _run_probe(argv, f"memory probe {name}", ["--memory-probe", name, "--data-json", payload])
            for name in STAGES}


# ------------------------------------------------------------------------------------------ main


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--slides", type=int, default=24, help="training slides")
    parser.add_argument("--heldout-slides", type=int, default=6)
    parser.add_argument("--tiles", type=int, default=2000, help="tiles per slide")
    parser.add_argument("--feature-dim", type=int, default=512)
    parser.add_argument("--questions", type=int, nargs=2, default=(6, 8), metavar=("MIN", "MAX"))
    parser.add_argument("--lm-layers", type=int, default=4)
    parser.add_argument("--lm-hidden", type=int, default=128)
    parser.add_argument("--connector", type=json.loads, default={"type": "scale_invariant"},
                        help="connector config as JSON (default: the default scale_invariant, k=128)")
    parser.add_argument("--batch-slides", type=int, default=2, help="slides per packed batch")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--skip-steps", type=int, default=1, help="warm-up steps left out of answers/s")
    parser.add_argument("--step-warmup", type=int, default=2)
    parser.add_argument("--step-steps", type=int, default=6)
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-lm-layers", type=int, default=8, help="LM of the memory probes")
    parser.add_argument("--memory-lm-hidden", type=int, default=512)
    parser.add_argument("--logits-vocab", type=int, default=151936, help="vocabulary of the logits probe")
    parser.add_argument("--logits-batch", type=int, default=1)
    parser.add_argument("--logits-length", type=int, default=1024)
    parser.add_argument("--logits-labelled", type=float, default=0.15, help="share of positions with a label")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "training.json")
    parser.add_argument("--memory-probe", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--data-json", help=argparse.SUPPRESS)
    parser.add_argument("--logits-probe", choices=("all", "labels"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.memory_probe or args.logits_probe:  # a probe's own fresh process (see _run_probe)
        result = memory_probe(args) if args.memory_probe else logits_probe(args)
        print(json.dumps(result))
        return result
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        data = make_data(work / "data", args.slides, args.heldout_slides, args.tiles, args.feature_dim,
                         tuple(args.questions))
        data_s = time.perf_counter() - t0
        # First, while this process is still small: ru_maxrss of a child starts from its parent's RSS.
        parent_rss = _vm_kib("VmRSS") / 1024
        memory = bench_memory(args, data, work, argv)
        logits = bench_logits(argv)
        import logging

        import torch
        import transformers

        from pathchat.model.connectors import build_connector

        torch.set_num_threads(args.threads)
        transformers.logging.set_verbosity_error()
        logging.getLogger("pathchat").setLevel(logging.ERROR)
        args.num_slide_tokens = build_connector(args.connector, args.feature_dim, 8).num_tokens
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is for the JSON
            packing = bench_packing(args, data, work)
            step = bench_trainer_step(args, data, work)
    result = {
        "model": {"language_model": "tiny:qwen2", **tiny_lm(args), "connector": args.connector,
                  "num_slide_tokens": args.num_slide_tokens, "dtype": "float32", "device": "cpu"},
        "data": {"train_slides": args.slides, "heldout_slides": args.heldout_slides, "tiles_per_slide": args.tiles,
                 "feature_dim": args.feature_dim, "questions_per_slide": list(args.questions),
                 "train_answers": data["train_answers"], "build_s": round(data_s, 2)},
        "packing": packing,
        "trainer_step": step,
        "memory": {"language_model": tiny_lm(args, memory=True), "batch_slides": args.batch_slides,
                   "steps": args.memory_steps, "parent_rss_at_spawn_mib": round(parent_rss, 1), **memory},
        "logits": {"vocab": args.logits_vocab, "batch": args.logits_batch, "length": args.logits_length,
                   "labelled_share": args.logits_labelled, **logits},
        "timing": ("answers/s from mean step time (first steps left out); step = on_step_end to on_step_end; "
                   "'cpu' = process CPU time (steadier under shared load); trainer step: medians of "
                   "interleaved repeats"),
        "wall_s": round(time.perf_counter() - t_start, 1), "threads": args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    from pathchat.utils.atomic import atomic_write_json

    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
