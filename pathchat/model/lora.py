"""LoRA (and optional QLoRA) on the language model of a `PathChatForConditionalGeneration`.

Only the language model is wrapped with peft: its base weights are frozen and LoRA adapters are
injected into the linear projections of its attention and MLP blocks (found from the module tree
unless named). The connector is not touched by peft and stays fully trainable. Checkpoints follow
peft's conventions (``adapter_config.json`` + ``adapter_model.safetensors``) with the connector
saved beside them as ``connector.safetensors``, and a sha256 manifest over the folder.
`merge_lora` folds the adapters into the base weights for export.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import PreTrainedModel

from pathchat.model.checkpoint import verify_manifest, write_manifest
from pathchat.model.modeling import PathChatForConditionalGeneration

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "CONNECTOR_WEIGHTS_NAME",
    "LoraSettings",
    "apply_lora",
    "find_lora_targets",
    "load_language_model_4bit",
    "load_lora",
    "merge_lora",
    "portable_base_name",
    "save_lora",
    "save_portable_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
CONNECTOR_WEIGHTS_NAME = "connector.safetensors"

_INDEX = re.compile(r"^\d+$")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters.

    Attributes:
        r: rank of the update.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the LoRA branch input (training only).
        target_modules: module name suffixes to adapt; None finds them from the architecture
            (`find_lora_targets`).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is an empty list; use None to find them from the architecture")


def _linear_types() -> tuple[type[nn.Module], ...]:
    types: list[type[nn.Module]] = [nn.Linear]
    try:  # GPT-2 style blocks use transformers' Conv1D, which peft also adapts
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def find_lora_targets(language_model: nn.Module) -> list[str]:
    """The linear projection names of the transformer blocks' attention and MLP, in module order.

    A linear layer counts when it sits inside a repeated block (a path with a numeric index, like
    ``model.layers.3.self_attn.q_proj``); the output head, embeddings and anything outside the
    blocks are never returned. Given a whole PathChat model, only its language model is searched
    (never the connector).

    Returns:
        Unique last name components, e.g. ``["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
        "up_proj", "down_proj"]`` for Llama / Qwen2, ``["qkv_proj", "o_proj", "gate_up_proj",
        "down_proj"]`` for Phi-3.

    Raises:
        ValueError: no linear layer was found inside the blocks.
    """
    if isinstance(language_model, PathChatForConditionalGeneration):
        language_model = language_model.language_model
    excluded: set[int] = set()
    get_out = getattr(language_model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
        if isinstance(head, nn.Module):
            excluded.add(id(head))
    linear_types = _linear_types()
    targets: list[str] = []
    for name, module in language_model.named_modules():
        if not isinstance(module, linear_types) or id(module) in excluded:
            continue
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue  # an adapter's own matrices (a model that already carries one)
        if parts[-1] == "base_layer":
            parts = parts[:-1]  # the projection an adapter wraps is named by its wrapper
        if not any(_INDEX.match(p) for p in parts[:-1]):
            continue  # not inside a repeated transformer block
        if any("embed" in p or p in {"lm_head", "connector"} for p in parts):
            continue
        if parts[-1] not in targets:
            targets.append(parts[-1])
    if not targets:
        raise ValueError(f"no linear projections found inside the blocks of {type(language_model).__name__}; "
                         "pass LoraSettings(target_modules=[...]) explicitly")
    return targets


def _lora_config(settings: LoraSettings, targets: list[str]) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


@contextlib.contextmanager
def _peft_deprecations_silenced() -> Iterator[None]:
    """peft reads `is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning on
    every adapter load; the user can do nothing about it, so it stays out of their console."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_lora(model: PathChatForConditionalGeneration, settings: LoraSettings) -> PathChatForConditionalGeneration:
    """Wrap the language model with peft LoRA, in place; returns the same model.

    After this, the trainable parameters are exactly the ``lora_A`` / ``lora_B`` weights of the
    targets plus every connector parameter; the rest of the language model is frozen.

    Raises:
        ValueError: the language model already carries a peft adapter.
    """
    if isinstance(model.language_model, PeftModel):
        raise ValueError("the language model already has a peft adapter (apply_lora was called twice?)")
    targets = settings.target_modules or find_lora_targets(model.language_model)
    with _peft_deprecations_silenced():
        peft_lm = get_peft_model(model.language_model, _lora_config(settings, targets))  # freezes the base LM
    model.language_model = peft_lm  # type: ignore[assignment]
    for param in model.connector.parameters():
        param.requires_grad_(True)
    return model


def _peft_lm(model: PathChatForConditionalGeneration) -> PeftModel:
    lm = model.language_model
    if not isinstance(lm, PeftModel):
        raise ValueError("the model's language model has no LoRA adapter; call apply_lora or load_lora first")
    return lm


def save_lora(model: PathChatForConditionalGeneration, folder: str | os.PathLike[str]) -> Path:
    """Write the adapter (peft format), the connector weights and a sha256 manifest into `folder`.

    Files: ``adapter_config.json``, ``adapter_model.safetensors``, ``connector.safetensors``,
    ``pathchat_manifest.json`` (plus peft's model card ``README.md``). The base language model is
    not saved, nor are its embeddings (see `save_portable_adapter`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_portable_adapter(_peft_lm(model), folder, getattr(model.config, "base_language_model", None))
    save_model(model.connector, str(folder / CONNECTOR_WEIGHTS_NAME))
    write_manifest(folder)
    return folder


#: Hub ids of the base models PathChat names by a short source name.
HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def portable_base_name(source: str | None, language_model: nn.Module | None = None) -> str | None:
    """How an adapter names its base model: a hub id, never a path on the machine that trained it.

    ``smollm2`` becomes its hub id; a hub id stays; a local folder is replaced by the name its
    config recorded when that is not a path either, else by the folder's own name.
    """
    if source is None:
        return None
    if source in HUB_IDS:
        return HUB_IDS[source]
    if not (os.path.isabs(source) or os.path.exists(source) or source.startswith(".")):
        return source
    recorded = str(getattr(getattr(language_model, "config", None), "_name_or_path", "") or "")
    if recorded and not (os.path.isabs(recorded) or os.path.exists(recorded) or recorded.startswith(".")):
        return recorded
    return Path(source).name


def save_portable_adapter(peft_lm: PeftModel, folder: str | os.PathLike[str], base_source: str | None,
                          state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """peft's ``save_pretrained`` with only the LoRA matrices and a portable base model name.

    peft saves the whole (resized) embedding and output matrices when the vocabulary grew
    (``save_embedding_layers="auto"``): 231 MB over SmolLM2-135M for the two slide tokens, whose rows
    never reach the LM (placeholders are overwritten by connector outputs). Those are left out, so the
    adapter loads onto the stock base model with plain peft, and ``base_model_name_or_path`` names
    the base by `portable_base_name` instead of the trainer's local path.
    """
    configs = peft_lm.peft_config
    saved = {name: cfg.base_model_name_or_path for name, cfg in configs.items()}
    name = portable_base_name(base_source or next(iter(saved.values()), None), peft_lm.get_base_model())
    try:
        for cfg in configs.values():
            cfg.base_model_name_or_path = name
        peft_lm.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True,
                                save_embedding_layers=False)
    finally:
        for key, value in saved.items():
            configs[key].base_model_name_or_path = value


def load_lora(
    base_model: PathChatForConditionalGeneration, folder: str | os.PathLike[str], *,
    is_trainable: bool = False, verify: bool = True,
) -> PathChatForConditionalGeneration:
    """Put a saved adapter and connector onto `base_model` (in place; returns it).

    Args:
        base_model: a PathChat model with the same base language model (same weights, vocabulary
            and config) as the one the adapter was trained on, without an adapter.
        folder: a folder written by `save_lora`.
        is_trainable: keep the LoRA weights (and connector) trainable, to resume training.
        verify: check the folder's sha256 manifest first.

    Raises:
        ManifestError: the manifest is missing or a file's hash differs (with verify).
        ValueError: `base_model` already has an adapter.
    """
    folder = Path(folder)
    if verify:
        verify_manifest(folder)
    if isinstance(base_model.language_model, PeftModel):
        raise ValueError("base_model already has a peft adapter")
    with _peft_deprecations_silenced():
        peft_lm = PeftModel.from_pretrained(base_model.language_model, str(folder), is_trainable=is_trainable)
    base_model.language_model = peft_lm  # type: ignore[assignment]
    load_model(base_model.connector, str(folder / CONNECTOR_WEIGHTS_NAME), strict=True)
    for param in base_model.connector.parameters():
        param.requires_grad_(is_trainable)
    return base_model


def merge_lora(model: PathChatForConditionalGeneration) -> PathChatForConditionalGeneration:
    """Fold the LoRA updates into the base weights (`merge_and_unload`), in place; returns the model.

    The result is a plain `PathChatForConditionalGeneration` again (no peft modules), ready for
    `save_pretrained`. All parameters are left trainable, as in a freshly built model.
    """
    merged = _peft_lm(model).merge_and_unload()
    assert isinstance(merged, PreTrainedModel)
    model.language_model = merged
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def load_language_model_4bit(
    name_or_path: str | os.PathLike[str], compute_dtype: torch.dtype = torch.bfloat16, **kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM in 4-bit NF4 (bitsandbytes) for QLoRA, prepared for k-bit training.

    Pass the result to `build_pathchat`, then `apply_lora`. Needs a CUDA device and the
    ``bitsandbytes`` package; extra kwargs go to `AutoModelForCausalLM.from_pretrained`.

    Raises:
        RuntimeError: CUDA is not available or bitsandbytes is not installed (the message says which).
    """
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA device is available (bitsandbytes 4-bit quantisation runs on CUDA only)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the 'bitsandbytes' package is not installed (pip install bitsandbytes)")
    if missing:
        raise RuntimeError("QLoRA 4-bit loading is not possible here: " + "; ".join(missing)
                           + ". Use apply_lora on a full-precision model instead.")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    kwargs.setdefault("device_map", {"": torch.cuda.current_device()})
    model = AutoModelForCausalLM.from_pretrained(name_or_path, quantization_config=quantization, **kwargs)
    prepared = prepare_model_for_kbit_training(model)
    assert isinstance(prepared, PreTrainedModel)
    return prepared
