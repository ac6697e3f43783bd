"""Which attention kernel a language model loads with (`attn_implementation`).

FlashAttention-2 when the ``flash_attn`` package imports, the device is CUDA and the dtype is
bf16/fp16; otherwise PyTorch SDPA. An explicit request wins after validation. Each distinct
choice is logged once per process (``logging``, never print).
"""

from __future__ import annotations

import importlib
import logging
from functools import lru_cache

import torch

__all__ = ["ATTN_IMPLEMENTATIONS", "choose_attn_implementation", "default_dtype", "flash_attn_available"]

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = frozenset({"eager", "sdpa", "flash_attention_2"})
_FLASH_DTYPES = (torch.bfloat16, torch.float16)
_logged: set[tuple[str, str, str | None, str]] = set()


@lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package can be imported (checked once)."""
    try:
        importlib.import_module("flash_attn")
    except Exception:  # ImportError, or a broken CUDA build failing at import
        return False
    return True


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The compute dtype a model loads with when none is given: bf16 on CUDA, fp32 elsewhere.

    CPUs lack fast bf16 matmuls on most machines and fp16 is unsafe for training, so fp32 there.
    """
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _flash_blockers(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Reasons FlashAttention-2 cannot be used (empty when it can)."""
    reasons = []
    if not flash_attn_available():
        reasons.append("the flash_attn package is not importable (pip install flash-attn on a CUDA machine)")
    if device.type != "cuda":
        reasons.append(f"the device is {device.type!r}, not CUDA")
    if dtype not in _FLASH_DTYPES:
        reasons.append(f"the dtype is {dtype}, not torch.bfloat16 or torch.float16")
    return reasons


def choose_attn_implementation(
    device: torch.device | str, dtype: torch.dtype, requested: str | None = None,
) -> str:
    """The `attn_implementation` to load the language model with.

    Args:
        device: where the model runs.
        dtype: the model's compute dtype.
        requested: "eager", "sdpa" or "flash_attention_2" to force one; None chooses.

    Returns:
        "flash_attention_2" when possible (flash_attn importable, CUDA, bf16/fp16), else "sdpa";
        or `requested` when given.

    Raises:
        ValueError: `requested` is not a known implementation, or is "flash_attention_2" where it
            cannot run (the reasons are listed).
    """
    device = torch.device(device)
    if requested is not None:
        if requested not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {requested!r}; "
                             f"choose one of {sorted(ATTN_IMPLEMENTATIONS)}")
        if requested == "flash_attention_2":
            reasons = _flash_blockers(device, dtype)
            if reasons:
                raise ValueError("flash_attention_2 was requested but cannot be used: " + "; ".join(reasons)
                                 + ". Request 'sdpa' or leave it unset.")
        chosen = requested
    else:
        chosen = "sdpa" if _flash_blockers(device, dtype) else "flash_attention_2"
    key = (str(device), str(dtype), requested, chosen)
    if key not in _logged:
        _logged.add(key)
        how = "requested" if requested is not None else "chosen"
        logger.info("attention implementation %s: %s (device %s, dtype %s)", how, chosen, device, dtype)
    return chosen
