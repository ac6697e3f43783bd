"""Training checkpoints in the DESIGN.md layout, complete-or-absent, with safe retention.

A checkpoint folder is complete once ``pathchat_complete.json`` exists; it is written last, after
the weights, optimizer, scheduler, RNG and trainer state. Resuming and retention only ever look at
complete folders, so a job killed while saving leaves a folder that is ignored (and removed on the
next save) instead of a checkpoint that crashes the resume or a retention pass that deletes the
last good one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from pathchat.model.checkpoint import write_manifest
from pathchat.model.modeling import PathChatForConditionalGeneration
from pathchat.model.pretrained import CONNECTOR_WEIGHTS_NAME
from pathchat.utils.atomic import atomic_write_text

__all__ = [
    "COMPLETE_MARKER",
    "TRAINING_CONFIG_NAME",
    "complete_checkpoints",
    "full_model_from_state",
    "latest_complete_checkpoint",
    "mark_complete",
    "remove_incomplete",
    "retain",
    "save_pathchat_checkpoint",
]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "pathchat_complete.json"
TRAINING_CONFIG_NAME = "training_config.yaml"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def _step(p: Path) -> int:
    m = _STEP.match(p.name)
    return int(m.group(1)) if m else -1


def _all_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    run = Path(run_dir)
    if not run.is_dir():
        return []
    return sorted((p for p in run.iterdir() if p.is_dir() and _STEP.match(p.name)), key=_step)


def complete_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete ``checkpoint-N`` folders, oldest step first."""
    return [p for p in _all_checkpoints(run_dir) if (p / COMPLETE_MARKER).is_file()]


def latest_complete_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def mark_complete(folder: str | os.PathLike[str], step: int) -> None:
    atomic_write_text(Path(folder) / COMPLETE_MARKER, json.dumps({"step": step}) + "\n")


def remove_incomplete(run_dir: str | os.PathLike[str], keep: Path | None = None) -> list[Path]:
    """Delete checkpoint folders without the completion marker (a save that was killed)."""
    removed = []
    for p in _all_checkpoints(run_dir):
        if p != keep and not (p / COMPLETE_MARKER).is_file():
            logger.warning("removing incomplete checkpoint %s (its save did not finish)", p)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def retain(run_dir: str | os.PathLike[str], limit: int | None) -> list[Path]:
    """Keep the newest ``limit`` complete checkpoints; the newest complete one is never deleted."""
    if limit is None or limit <= 0:
        return []
    done = complete_checkpoints(run_dir)
    doomed = done[: max(0, len(done) - max(limit, 1))]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def full_model_from_state(config: Any, state_dict: Mapping[str, torch.Tensor],
                          lora: Any | None = None) -> PathChatForConditionalGeneration:
    """A whole model from a full state dict, with the LoRA update folded in when ``lora`` is given.

    Built outside any live DeepSpeed ZeRO-3 context (whose ``zero.Init`` would partition it), so it
    serves both the end of a ZeRO-3 run and the conversion of its shards.

    Args:
        config: the checkpoint's ``PathChatConfig``.
        state_dict: every weight, named as in a model carrying the adapter when ``lora`` is given.
        lora: the run's ``LoraSettings``, or None for a model without adapters.
    """
    from transformers.integrations import deepspeed as hf_ds

    saved_ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        model = PathChatForConditionalGeneration(config)
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved_ref
    if lora is None:
        model.load_state_dict(state_dict, strict=True)
        return model
    from pathchat.model.lora import apply_lora, merge_lora

    apply_lora(model, lora)
    model.load_state_dict(state_dict, strict=True)
    return merge_lora(model)


def _base_language_model(model: PathChatForConditionalGeneration) -> str | None:
    src = getattr(model.config, "base_language_model", None)
    return str(src) if src else None


def save_pathchat_checkpoint(
    model: PathChatForConditionalGeneration, tokenizer: PreTrainedTokenizerBase | None,
    folder: str | os.PathLike[str], kind: str, state_dict: Mapping[str, torch.Tensor] | None = None,
    training_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a loadable PathChat checkpoint (``pathchat.model.pretrained.load_pathchat`` reads it).

    Args:
        kind: "full" (every weight), "connector" (connector only, over a named base LM) or
            "lora" (peft adapter + connector, over a named base LM).
        state_dict: the weights to write, e.g. gathered from DeepSpeed ZeRO-3 (None: the model's).
        training_config: the resolved stage config, saved as ``training_config.yaml``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = dict(state_dict) if state_dict is not None else model.state_dict()
    if kind == "full":
        model.save_pretrained(folder, state_dict=state)
    elif kind in ("connector", "lora"):
        if _base_language_model(model) is None:
            raise ValueError(f"a {kind} checkpoint needs config.base_language_model to name the base LM")
        connector = {k[len("connector."):]: v.detach().cpu().contiguous() for k, v in state.items()
                     if k.startswith("connector.")}
        if not connector:
            raise ValueError("the state dict holds no connector weights")
        save_file(connector, str(folder / CONNECTOR_WEIGHTS_NAME), metadata={"format": "pt"})
        model.config.save_pretrained(folder)
        if kind == "lora":
            from peft import PeftModel, get_peft_model_state_dict

            from pathchat.model.lora import save_portable_adapter

            lm = model.language_model
            if not isinstance(lm, PeftModel):
                raise ValueError("kind 'lora' needs a model whose language model carries a LoRA adapter")
            lm_state = {k[len("language_model."):]: v for k, v in state.items() if k.startswith("language_model.")}
            adapter = get_peft_model_state_dict(lm, state_dict=lm_state, save_embedding_layers=False)
            save_portable_adapter(lm, folder, _base_language_model(model), state_dict=adapter)
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected 'full', 'connector' or 'lora'")
    if model.generation_config is not None and kind != "full":
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if training_config is not None:
        atomic_write_text(folder / TRAINING_CONFIG_NAME, yaml.safe_dump(dict(training_config), sort_keys=False))
    write_manifest(folder)
    return folder
