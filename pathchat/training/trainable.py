"""What trains in each stage: one function decides, sets ``requires_grad`` and returns the names."""

from __future__ import annotations

import logging

from torch import nn

__all__ = ["select_trainable", "trainable_parameter_names"]

logger = logging.getLogger(__name__)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def select_trainable(model: nn.Module, stage: str, lora: bool = False) -> list[str]:
    """Freeze and unfreeze for a stage; returns the trainable parameter names (sorted as in the model).

    - ``align``: the connector only (the language model is frozen, embeddings included).
    - ``instruct``, full: the connector and every language-model parameter.
    - ``instruct`` with LoRA: the connector and the LoRA matrices (the base LM is frozen); call after
      ``apply_lora``.

    Raises:
        ValueError: unknown stage, LoRA in stage align, or LoRA requested on a model without adapters.
    """
    if stage not in ("align", "instruct"):
        raise ValueError(f"unknown stage {stage!r}; expected 'align' or 'instruct'")
    if stage == "align" and lora:
        raise ValueError("stage 'align' trains the connector only; LoRA belongs to stage 'instruct'")
    names = [n for n, _ in model.named_parameters()]
    if lora and not any("lora_" in n for n in names):
        raise ValueError("LoRA requested but the model has no LoRA parameters; apply_lora first")
    for name, param in model.named_parameters():
        if name.startswith("connector."):
            train = True
        elif stage == "align":
            train = False
        elif lora:
            train = "lora_" in name
        else:
            train = True
        param.requires_grad_(train)
    chosen = trainable_parameter_names(model)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("stage %s%s: %d trainable tensors, %s of %s parameters (%.2f%%)", stage,
                " + LoRA" if lora else "", len(chosen), f"{count:,}", f"{total:,}", 100.0 * count / max(total, 1))
    return chosen
