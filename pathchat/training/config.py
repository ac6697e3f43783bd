"""Typed stage configs, read from YAML with dotted command-line overrides.

``pathchat train train/instruct.yaml --training.learning_rate 1e-4 --lora.r 8`` loads the YAML into
these dataclasses, applies the overrides (values parsed as YAML scalars, then checked against the
field's type), and refuses unknown keys with the list of valid ones, so a typo never trains with a
silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "LoraConfigSpec",
    "ModelConfig",
    "StageConfig",
    "TrainingConfig",
    "apply_overrides",
    "load_stage_config",
    "stage_config_from_dict",
]


class ConfigError(ValueError):
    """A config file or override that cannot be used; names the file or key."""


@dataclass
class ModelConfig:
    """What to build. ``language_model`` is a source: hub id, folder, ``smollm2`` or ``tiny:qwen2``."""

    language_model: str = "tiny:qwen2"
    tiny: dict[str, Any] = field(default_factory=dict)  # config fields of a tiny: language model
    connector: dict[str, Any] = field(default_factory=lambda: {"type": "scale_invariant"})
    feature_dim: int | None = None  # None: read from the first feature file
    init_from: str | None = None  # instruct: the stage-1 checkpoint whose connector is loaded
    attn_implementation: str | None = None  # None: flash-attention 2 when possible, else sdpa
    seed: int = 0  # initialisation seed of the connector (and of tiny language models)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # conversation JSON/JSONL files
    features: str = ""  # features folder (<slide>.h5)
    eval: list[str] = field(default_factory=list)  # held-out conversations, loss only
    max_length: int = 2048
    max_tiles: int | None = 4096  # tile cap per slide; the seeded sampler is shared with inference
    tile_sample_seed: int = 0
    prompt_format: Literal["auto", "chat", "plain"] = "auto"  # auto: plain for align, chat for instruct
    pack_by_slide: bool = True  # all questions about one slide in one sequence
    # With packing: every merged record sees the slide but not the others' turns (independent questions).
    isolate_records: bool = False
    # Split a slide's records into packs of at most this many (None: one pack per slide). Shorter
    # sequences train faster: attention grows with the square of the length.
    pack_max_records: int | None = None
    system_prompt: str | None = None
    skip_invalid: bool = False  # count and leave out bad records instead of failing
    standardize_features: bool = True  # fresh connectors learn per-dimension feature statistics first


@dataclass
class LoraConfigSpec:
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
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4  # per device
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    deepspeed: str | None = None  # a DeepSpeed JSON (train/deepspeed/*.json)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    resume: str = "auto"  # auto (latest checkpoint in output_dir), never, or a checkpoint folder
    dataloader_workers: int = 0
    group_by_length: bool = True
    use_cpu: bool = False  # force the CPU even where a GPU is visible
    progress: bool = True


@dataclass
class StageConfig:
    """One training stage. ``stage`` decides what trains (see ``trainable.select_trainable``)."""

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


# ------------------------------------------------------------------------------------ conversion


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check/coerce a YAML value to a dataclass field type; raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(hint, value, key)
    if origin is list:
        if isinstance(value, (str, os.PathLike)) and args and args[0] is str:
            return [str(value)]  # one file given where a list is accepted
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads "1e-3" as a string
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"in {prefix!r} " if prefix else ""
        raise ConfigError(f"unknown key(s) {unknown} {where}(valid: {names})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def stage_config_from_dict(data: dict[str, Any]) -> StageConfig:
    cfg = _from_dict(StageConfig, data)
    assert isinstance(cfg, StageConfig)
    return cfg


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``training.learning_rate=1e-4`` or ``["--training.learning_rate", "1e-4"]``)."""
    pairs: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        items = list(overrides)
        i = 0
        while i < len(items):
            tok = items[i]
            if not tok.startswith("--") and "=" not in tok:
                raise ConfigError(f"override {tok!r}: expected --dotted.key VALUE or dotted.key=VALUE")
            key = tok[2:] if tok.startswith("--") else tok
            if "=" in key:
                key, raw = key.split("=", 1)
                i += 1
            else:
                if i + 1 >= len(items):
                    raise ConfigError(f"override {tok!r} has no value")
                raw = items[i + 1]
                i += 2
            pairs.append((key, yaml.safe_load(raw) if raw != "" else ""))
    out = _deepcopy(data)
    for key, value in pairs:
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(d)) if d else {}


def load_stage_config(path: str | os.PathLike[str] | None, overrides: list[str] | dict[str, Any] | None = None
                      ) -> StageConfig:
    """YAML file (None: all defaults) + overrides → a checked ``StageConfig``.

    Relative paths inside the YAML (data files, features, DeepSpeed JSON, init_from, output_dir)
    stay relative to the working directory, as with every other command.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    try:
        return stage_config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from e
