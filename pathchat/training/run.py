"""``train_stage(config)``: build the model and data for a stage, train, save. ``pathchat train`` calls it."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainingArguments, set_seed

from pathchat.data.collator import PathChatCollator
from pathchat.data.dataset import ConversationDataset
from pathchat.data.records import ConversationRecord, load_records, pack_by_slide
from pathchat.data.slide_features import SlideFeatureStore
from pathchat.model.configuration import PathChatConfig
from pathchat.model.modeling import PathChatForConditionalGeneration, build_pathchat
from pathchat.model.pretrained import checkpoint_kind, load_language_model, load_pathchat
from pathchat.training.checkpoints import (
    full_model_from_state,
    latest_complete_checkpoint,
    remove_incomplete,
    save_pathchat_checkpoint,
)
from pathchat.training.config import StageConfig
from pathchat.training.trainable import select_trainable
from pathchat.training.trainer import PathChatTrainer
from pathchat.utils.checks import check_out_folder

__all__ = ["RunAlreadyCompleteError", "TrainResult", "build_stage_model", "train_stage"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    trainable: list[str]
    global_step: int
    losses: list[float]  # logged training losses, in step order
    log_history: list[dict[str, Any]] = field(default_factory=list)
    num_samples: int = 0
    num_answers: int = 0
    skipped_records: int = 0
    resumed_from: str | None = None
    checkpoint_kind: str = "full"


def _first_feature_dim(features: str) -> int:
    from pathchat.features.store import read_features_h5

    folder = Path(features)
    first = next(iter(sorted(folder.glob("*.h5"))), None)
    if first is None:
        raise FileNotFoundError(f"no feature files (*.h5) in {folder}")
    return read_features_h5(first).dim


def build_stage_model(cfg: StageConfig) -> tuple[PathChatForConditionalGeneration, PreTrainedTokenizerBase]:
    """The model a stage starts from: a fresh connector on the LLM, or (instruct) stage 1's checkpoint, or a
    LoRA checkpoint whose adapter goes on training."""
    m = cfg.model
    if cfg.stage == "instruct" and m.init_from:
        init_from = init_from_folder(m.init_from)
        # A LoRA checkpoint (a finished stage 2, the built-in model) goes on training its own adapter
        # with LoRA on; a full fine-tune starts from its merged weights.
        kind = checkpoint_kind(init_from)
        lora_init = kind == "lora"
        model, tokenizer = load_pathchat(init_from, attn_implementation=m.attn_implementation,
                                         merge_adapter=lora_init and not cfg.lora.enabled,
                                         adapter_trainable=lora_init and cfg.lora.enabled)
        base = getattr(model.config, "base_language_model", None)
        if base and base != m.language_model:
            raise ValueError(f"model.init_from {m.init_from} was trained on {base!r} but model.language_model "
                             f"is {m.language_model!r}; they must match")
        labels = model.config.slide_token_labels
        if (labels or None) != (m.slide_token_labels or None):
            raise ValueError(f"model.init_from {m.init_from} names its slide tokens {labels!r} but "
                             f"model.slide_token_labels is {m.slide_token_labels!r}; they must match")
        if lora_init and cfg.lora.enabled:
            _check_adapter_settings(model, cfg)
        logger.info("loaded %s from %s (%s checkpoint)", "its adapter and connector" if lora_init else "stage-1 connector",
                    init_from, kind)
        model.train()
        return model, tokenizer
    if cfg.stage == "instruct":
        logger.warning("stage instruct without model.init_from: the connector starts untrained")
    feature_dim = m.feature_dim if m.feature_dim is not None else _first_feature_dim(cfg.data.features)
    lm, tokenizer = load_language_model(m.language_model, tiny=m.tiny, attn_implementation=m.attn_implementation,
                                        seed=m.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.seed)
        model = build_pathchat(lm, tokenizer, feature_dim, m.connector, slide_token_labels=m.slide_token_labels)
    model.config.base_language_model = m.language_model
    model.train()
    return model, tokenizer


def init_from_folder(init_from: str) -> Path:
    """`model.init_from` as a folder; "builtin" is the shipped built-in model, so a LoRA fine-tune of it
    needs no path into the installed package."""
    from pathchat.inference.builtin import BUILTIN_NAME
    from pathchat.model.builtin import builtin_model_dir

    if init_from != BUILTIN_NAME:
        return Path(init_from)
    folder = builtin_model_dir()
    if folder is None:
        raise FileNotFoundError("model.init_from builtin: the built-in model is not installed "
                                "(pathchat/assets/default_model/ is missing or incomplete; make default-model SHIP=1)")
    return folder


def _has_adapter(model: PathChatForConditionalGeneration) -> bool:
    from peft import PeftModel

    return isinstance(model.language_model, PeftModel)


def _check_adapter_settings(model: PathChatForConditionalGeneration, cfg: StageConfig) -> None:
    """The adapter a stage continues must be the one its `lora` settings describe: a silently kept
    rank or target list would make the config lie about what was trained."""
    from peft import LoraConfig

    from pathchat.model.lora import find_lora_targets

    peft_config = model.language_model.peft_config["default"]  # type: ignore[union-attr]
    assert isinstance(peft_config, LoraConfig)
    want = cfg.lora.settings()
    targets = set(want.target_modules or find_lora_targets(model.language_model))
    have = {"r": peft_config.r, "alpha": peft_config.lora_alpha, "target_modules": sorted(peft_config.target_modules or ())}
    asked = {"r": want.r, "alpha": want.alpha, "target_modules": sorted(targets)}
    if have != asked:
        raise ValueError(f"model.init_from {cfg.model.init_from} holds a LoRA adapter with {have}, but the lora "
                         f"settings ask for {asked}; set lora to match to go on training it")


class RunAlreadyCompleteError(RuntimeError):
    """Resuming a run whose last checkpoint is already at the final step."""


def _checkpoint_step(folder: str) -> int | None:
    import json

    state = Path(folder) / "trainer_state.json"
    if not state.is_file():
        return None
    return int(json.loads(state.read_text())["global_step"])


def _total_steps(cfg: StageConfig, num_samples: int) -> int:
    import math

    t = cfg.training
    if t.max_steps > 0:
        return t.max_steps
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = max(1, math.ceil(num_samples / (t.batch_size * world)) // t.gradient_accumulation_steps)
    return math.ceil(per_epoch * t.epochs)


def _final_kind(cfg: StageConfig) -> str:
    tiny = cfg.model.language_model.startswith("tiny:")
    if cfg.stage == "align":
        return "full" if tiny else "connector"
    if cfg.lora.enabled:
        return "full" if tiny else "lora"
    return "full"


def _checkpoint_kind(cfg: StageConfig) -> str:
    if cfg.stage == "align":
        return "connector"
    return "lora" if cfg.lora.enabled else "full"


def _precision(cfg: StageConfig, use_cpu: bool) -> dict[str, bool]:
    """bf16 on a GPU that has it, fp32 on the CPU, unless the config names one."""
    p = cfg.training.precision
    if p == "auto":
        p = "bf16" if (not use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()) else "fp32"
    if p == "fp16" and use_cpu:
        raise ValueError("fp16 training needs a GPU; use precision bf16 or fp32 on the CPU")
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_distributed_env() -> None:
    """DeepSpeed needs the rank variables even for one process; set them when no launcher did."""
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def load_stage_records(cfg: StageConfig, files: Sequence[str]) -> tuple[list[ConversationRecord], int]:
    """Records of these files as the stage trains on them (packed per slide in stage 2), and how many
    invalid ones were skipped."""
    from pathchat.data.records import SkippedRecords

    skipped = SkippedRecords()
    records = load_records(list(files), skip_invalid=cfg.data.skip_invalid, skipped=skipped)
    if cfg.stage == "instruct" and cfg.data.pack_by_slide:
        records = pack_by_slide(records, max_records=cfg.data.pack_max_records)
    return records, skipped.count


def _check_stage_inputs(cfg: StageConfig) -> None:
    """Fail before building anything when the config names no data, an output folder that is a file, a
    model.init_from that is no checkpoint, or a missing DeepSpeed JSON."""
    if not cfg.data.train:
        raise ValueError("data.train names no conversation file")
    if not cfg.data.features:
        raise ValueError("data.features names no features folder")
    check_out_folder(cfg.output_dir, "output_dir")
    if cfg.model.init_from:  # a damaged stage-1 checkpoint is named now, not after the data are loaded
        checkpoint_kind(init_from_folder(cfg.model.init_from))
    if cfg.training.deepspeed:
        if not Path(cfg.training.deepspeed).is_file():
            raise FileNotFoundError(f"DeepSpeed config not found: {cfg.training.deepspeed}")
        ensure_distributed_env()


def _datasets(cfg: StageConfig, records: list[ConversationRecord], store: SlideFeatureStore,
              tokenizer: PreTrainedTokenizerBase, model_config: PathChatConfig
              ) -> tuple[ConversationDataset, ConversationDataset | None]:
    """The training dataset and the held-out one (``data.eval``; None without it), rendered alike."""

    def render(rows: list[ConversationRecord], progress: bool) -> ConversationDataset:
        return ConversationDataset(rows, store, tokenizer, int(model_config.num_slide_tokens or 0),
                                   max_length=cfg.data.max_length, slide_token_labels=model_config.slide_token_labels,
                                   prompt_format=cfg.prompt_format,  # type: ignore[arg-type]
                                   system_prompt=cfg.data.system_prompt, skip_invalid=cfg.data.skip_invalid,
                                   progress=progress, isolate_records=cfg.data.isolate_records)

    dataset = render(records, cfg.training.progress)
    return dataset, (render(load_stage_records(cfg, cfg.data.eval)[0], False) if cfg.data.eval else None)


def _standardize_features(cfg: StageConfig, model: PathChatForConditionalGeneration, store: SlideFeatureStore,
                          dataset: ConversationDataset) -> None:
    """A fresh connector's standardiser gets the training slides' statistics (stage 2 keeps stage 1's,
    which are part of the loaded weights)."""
    if not cfg.data.standardize_features or (cfg.stage == "instruct" and cfg.model.init_from):
        return
    from pathchat.model.connectors.base import set_feature_statistics

    slides = [s.slide for s in dataset.samples if s.slide is not None]
    mean, std = store.statistics(slides, seed=cfg.data.tile_sample_seed)
    set_feature_statistics(model.connector, mean, std)
    logger.info("feature statistics from %d slides: mean |x| %.4g, mean std %.4g", len(set(slides)),
                float(mean.abs().mean()), float(std.mean()))


def _resume_point(cfg: StageConfig, out: Path, num_samples: int) -> str | None:
    """The checkpoint to resume from (``training.resume``), after removing incomplete ones.

    Raises:
        RunAlreadyCompleteError: the newest checkpoint is already at the run's last step.
    """
    t = cfg.training
    resume: str | None = None
    if t.resume == "auto":
        remove_incomplete(out)
        last = latest_complete_checkpoint(out)
        resume = str(last) if last is not None else None
    elif t.resume not in ("never", ""):
        resume = t.resume
    if resume:
        logger.info("resuming from %s", resume)
        done_step = _checkpoint_step(resume)
        total = _total_steps(cfg, num_samples)
        if done_step is not None and done_step >= total:
            raise RunAlreadyCompleteError(
                f"{resume} is at step {done_step} of {total}: this run has finished. Raise "
                "training.max_steps / training.epochs to train on, or set training.resume never "
                "with a new output_dir to start over")
    return resume


def _training_arguments(cfg: StageConfig, out: Path, use_cpu: bool, with_eval: bool) -> TrainingArguments:
    """The transformers ``TrainingArguments`` of ``cfg.training``."""
    t = cfg.training
    precision = _precision(cfg, use_cpu)
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        activation_checkpointing=t.gradient_checkpointing,
        deepspeed=t.deepspeed,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=max(t.save_steps, 1),
        save_total_limit=t.save_total_limit,
        report_to=t.report_to or "none",
        dataloader_num_workers=t.dataloader_workers,
        remove_unused_columns=False,
        use_cpu=use_cpu,
        disable_tqdm=not t.progress,
        eval_strategy="epoch" if with_eval else "no",
        prediction_loss_only=True,  # the held-out pass needs the loss only: logits at the answers alone
        # Named, or transformers takes every forward argument with "label" in its name as a label, and
        # `logits_only_at_labels` (absent from the batch) would make it skip the held-out loss.
        label_names=["labels"],
        bf16=precision["bf16"],
        fp16=precision["fp16"],
    )


def _save_final(trainer: PathChatTrainer, cfg: StageConfig, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Write the final checkpoint (the process that saves only); a LoRA run on a random-weight base is
    folded into a full model, since such a base cannot be rebuilt from a name."""
    final = trainer.accelerator.unwrap_model(trainer.model)
    state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed) if trainer.is_deepspeed_enabled else None
    if not trainer.args.should_save:
        return
    kind = _final_kind(cfg)
    if kind == "full" and cfg.lora.enabled:
        state = state_dict if state_dict is not None else final.state_dict()
        final = full_model_from_state(final.config, state, cfg.lora.settings())
        state_dict = None
    save_pathchat_checkpoint(final, tokenizer, out, kind, state_dict=state_dict, training_config=cfg.to_dict())


def train_stage(cfg: StageConfig, callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Train one stage as configured and save the final checkpoint into ``cfg.output_dir``.

    ``callbacks`` are transformers ``TrainerCallback`` objects (early stopping, custom logging).

    Resume: with ``training.resume: auto`` a run restarts from the newest complete
    ``checkpoint-N`` in the output folder (same data order, same later losses).
    """
    _check_stage_inputs(cfg)
    t = cfg.training
    use_cpu = t.use_cpu or not torch.cuda.is_available()
    set_seed(t.seed)

    model, tokenizer = build_stage_model(cfg)
    if cfg.lora.enabled and not _has_adapter(model):
        from pathchat.model.lora import apply_lora

        apply_lora(model, cfg.lora.settings())
    trainable = select_trainable(model, cfg.stage, lora=cfg.lora.enabled)

    records, skipped = load_stage_records(cfg, cfg.data.train)
    store = SlideFeatureStore(cfg.data.features, max_tiles=cfg.data.max_tiles, sample_seed=cfg.data.tile_sample_seed)
    model.config.feature_recipe = training_feature_recipe(store, records)
    dataset, eval_dataset = _datasets(cfg, records, store, tokenizer, model.config)
    _standardize_features(cfg, model, store, dataset)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = _resume_point(cfg, out, len(dataset))
    trainer = PathChatTrainer(
        model=model, args=_training_arguments(cfg, out, use_cpu, eval_dataset is not None), train_dataset=dataset,
        eval_dataset=eval_dataset, data_collator=PathChatCollator(pad_token_id=int(pad)), processing_class=tokenizer,
        lengths=dataset.lengths, checkpoint_kind=_checkpoint_kind(cfg), training_config=cfg.to_dict(),
        group_by_length=t.group_by_length, callbacks=list(callbacks),
    )
    try:
        trainer.train(resume_from_checkpoint=resume)
        _save_final(trainer, cfg, tokenizer, out)
    finally:
        if t.deepspeed and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return TrainResult(
        output_dir=out, trainable=trainable, global_step=trainer.state.global_step, losses=losses,
        log_history=list(trainer.state.log_history), num_samples=len(dataset),
        num_answers=sum(s.num_answers for s in dataset.samples), skipped_records=skipped + dataset.skipped.count,
        resumed_from=resume, checkpoint_kind=_final_kind(cfg),
    )


def training_feature_recipe(store: SlideFeatureStore, records: Sequence[Any]) -> dict[str, Any] | None:
    """The feature recipe of the training slides, saved in every checkpoint's config (None: no files)."""
    from pathchat.inference.recipe import recipe_of_feature_files

    paths = sorted({store.path(r.slide) for r in records if r.slide is not None and store.has(r.slide)})
    return recipe_of_feature_files(paths).to_dict() if paths else None
