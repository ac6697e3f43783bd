"""Typed stage configs, read from YAML with dotted command-line overrides.

``pathchat train train/instruct.yaml --training.learning_rate 1e-4 --lora.r 8`` loads the YAML into
these dataclasses through jsonargparse (`pathchat.utils.config`): the flags come from the fields, values
are checked against the fields' types, and an unknown key is refused with the file or flag it came from
and the valid keys, so a typo never trains with a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from pathchat.utils.config import ConfigError, build_sectioned, dotted_flags, new_parser, parse_or_raise

__all__ = [
    "ConfigError",
    "DataConfig",
    "LoraConfigSpec",
    "ModelConfig",
    "StageConfig",
    "TrainingConfig",
    "load_stage_config",
    "stage_parser",
]


@dataclass
class ModelConfig:
    """model: what to build.

    Attributes:
        language_model: a source: hub id, folder, ``smollm2`` or ``tiny:qwen2``.
        tiny: config fields of a ``tiny:`` language model (hidden_size, num_hidden_layers, …).
        connector: the connector's config: ``type`` (scale_invariant, mlp, pool, resampler) and its fields.
        feature_dim: tile feature size (null: read from the first feature file).
        init_from: instruct: the stage-1 checkpoint whose connector is loaded; or a LoRA checkpoint
            (a finished stage 2; ``builtin``: the built-in model) whose adapter and connector go on training.
        attn_implementation: null: flash-attention 2 when possible, else sdpa.
        seed: initialisation seed of the connector (and of tiny language models).
        slide_token_labels: text before each slide token, one per token (null: none), e.g. the grid
            cell each one reads: " upper left:", …; kept in the checkpoint's config.
    """

    language_model: str = "tiny:qwen2"
    tiny: dict[str, Any] = field(default_factory=dict)
    connector: dict[str, Any] = field(default_factory=lambda: {"type": "scale_invariant"})
    feature_dim: int | None = None
    init_from: str | None = None
    attn_implementation: str | None = None
    seed: int = 0
    slide_token_labels: list[str] | None = None


@dataclass
class DataConfig:
    """data: conversations, features and how they are packed into sequences.

    Attributes:
        train: conversation JSON/JSONL files.
        features: features folder (<slide>.h5).
        eval: held-out conversations (loss only).
        max_length: tokens per sequence.
        max_tiles: tile cap per slide (null: all); the seeded sampler is shared with inference.
        tile_sample_seed: seed of that tile sampler.
        prompt_format: auto: plain for align, chat for instruct.
        pack_by_slide: all questions about one slide in one sequence.
        isolate_records: with packing, every merged record sees the slide but not the others' turns
            (independent questions).
        pack_max_records: split a slide's records into packs of at most this many (null: one pack per
            slide); shorter sequences train faster, attention grows with the square of the length.
        system_prompt: system message (null: the chat template's).
        skip_invalid: count and leave out bad records instead of failing.
        standardize_features: fresh connectors learn per-dimension feature statistics first.
    """

    train: list[str] = field(default_factory=list)
    features: str = ""
    eval: list[str] = field(default_factory=list)
    max_length: int = 2048
    max_tiles: int | None = 4096
    tile_sample_seed: int = 0
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    pack_by_slide: bool = True
    isolate_records: bool = False
    pack_max_records: int | None = None
    system_prompt: str | None = None
    skip_invalid: bool = False
    standardize_features: bool = True


@dataclass
class LoraConfigSpec:
    """lora: LoRA adapters on the language model (instruct only).

    Attributes:
        enabled: train LoRA adapters instead of the full language model.
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt (null: chosen from the architecture).
    """

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None

    def settings(self) -> Any:
        """The ``pathchat.model.lora.LoraSettings`` these fields describe."""
        from pathchat.model.lora import LoraSettings

        return LoraSettings(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules)


@dataclass
class TrainingConfig:
    """training: the optimisation loop (transformers Trainer settings).

    Attributes:
        epochs: passes over the data (fractions allowed).
        max_steps: stop after this many optimizer steps (-1: run the epochs).
        batch_size: sequences per device per step.
        gradient_accumulation_steps: micro-batches per optimizer step.
        learning_rate: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the steps spent warming up.
        lr_scheduler: transformers scheduler name (cosine, linear, constant, …).
        max_grad_norm: gradient clipping norm.
        seed: data order and dropout seed.
        gradient_checkpointing: trade compute for activation memory in the language model.
        deepspeed: a DeepSpeed JSON (train/deepspeed/*.json).
        precision: auto: bf16 on GPU, fp32 on CPU.
        logging_steps: steps between loss logs.
        save_steps: steps between checkpoints (0: only the final one).
        save_total_limit: complete checkpoints kept (the newest complete one is never deleted).
        report_to: logging integrations (tensorboard, …; [] for none).
        resume: auto (latest checkpoint in output_dir), never, or a checkpoint folder.
        dataloader_workers: data loading processes.
        group_by_length: batch sequences of similar length together.
        use_cpu: force the CPU even where a GPU is visible.
        progress: show a progress bar.
    """

    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    resume: str = "auto"
    dataloader_workers: int = 0
    group_by_length: bool = True
    use_cpu: bool = False
    progress: bool = True


@dataclass
class StageConfig:
    """One training stage: the YAML's top level.

    Attributes:
        stage: what trains (see ``trainable.select_trainable``): align (connector) or instruct.
        output_dir: checkpoints, the resolved config and logs go here.
        model: what to build.
        data: conversations and features.
        lora: LoRA adapters.
        training: the optimisation loop.
    """

    stage: Literal["align", "instruct"] = "align"
    output_dir: str = "runs/pathchat"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfigSpec = field(default_factory=LoraConfigSpec)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        if self.stage not in ("align", "instruct"):
            raise ConfigError(f"stage must be 'align' or 'instruct', got {self.stage!r}")
        if self.stage == "align" and self.lora.enabled:
            raise ConfigError("stage 'align' trains only the connector; lora.enabled must be false")
        if self.data.pack_max_records is not None and self.data.pack_max_records < 1:
            raise ConfigError(f"data.pack_max_records must be >= 1 or null, got {self.data.pack_max_records}")

    @property
    def prompt_format(self) -> str:
        if self.data.prompt_format != "auto":
            return self.data.prompt_format
        return "plain" if self.stage == "align" else "chat"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------ loading


def stage_parser() -> ArgumentParser:
    """`--config FILE.yaml` plus one dotted flag per key (`--training.learning_rate`), typed from the dataclasses."""
    parser = new_parser("pathchat train", "A training stage from a YAML file and dotted overrides.")
    parser.add_argument("--config", action=ActionConfigFile, help="stage YAML (train/*.yaml)")
    parser.add_class_arguments(StageConfig, nested_key=None, fail_untyped=False)
    return parser


def load_stage_config(path: str | os.PathLike[str] | None = None,
                      overrides: Sequence[str] | dict[str, Any] | None = None) -> StageConfig:
    """YAML file (None: all defaults) + overrides -> a checked ``StageConfig``.

    Args:
        path: a stage YAML.
        overrides: flags (``["--training.learning_rate", "1e-4"]``) or a mapping of dotted keys
            (``{"training.learning_rate": 1e-4}``); they override the file.
    Raises:
        ConfigError: unknown key (naming the file or the flag, and the valid keys), a value of the wrong
            type, a missing file, or settings that contradict each other.

    Relative paths inside the YAML (data files, features, DeepSpeed JSON, init_from, output_dir)
    stay relative to the working directory, as with every other command.
    """
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    argv = (["--config", str(path)] if path is not None else []) + dotted_flags(overrides)
    parser = stage_parser()
    values = parse_or_raise(parser, argv)
    config = build_sectioned(StageConfig, values, parser)
    assert isinstance(config, StageConfig)
    return config
