"""DeepSpeed ZeRO checkpoint shards → one safetensors PathChat checkpoint.

With ``stage3_gather_16bit_weights_on_model_save: false`` (the memory-lean setting for very large
models) a ZeRO-3 ``checkpoint-N`` holds only the engine's shards. DeepSpeed's own
``zero_to_fp32`` consolidates them; this puts the result back into the PathChat layout (LoRA folded
in when the run used it), loadable by ``load_pathchat`` and ``from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from pathchat.training.checkpoints import (
    TRAINING_CONFIG_NAME,
    full_model_from_state,
    save_pathchat_checkpoint,
)
from pathchat.training.config import LoraConfigSpec

__all__ = ["convert_zero_checkpoint"]


def convert_zero_checkpoint(checkpoint_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]) -> Path:
    """Consolidate ``checkpoint_dir``'s ZeRO shards into a full safetensors checkpoint in ``output_dir``.

    Raises:
        FileNotFoundError: the folder has no ZeRO shards (no ``latest`` tag) or no config.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    src = Path(checkpoint_dir)
    if not (src / "latest").is_file():
        raise FileNotFoundError(f"{src}: no DeepSpeed ZeRO checkpoint here (no 'latest' tag file)")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json beside the ZeRO shards")
    state = get_fp32_state_dict_from_zero_checkpoint(str(src))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src)
    training: dict = {}
    if (src / TRAINING_CONFIG_NAME).is_file():
        training = yaml.safe_load((src / TRAINING_CONFIG_NAME).read_text()) or {}
    lora = LoraConfigSpec(**(training.get("lora") or {})) if isinstance(training, dict) else LoraConfigSpec()
    model = full_model_from_state(config, state, lora.settings() if lora.enabled else None)
    tokenizer = AutoTokenizer.from_pretrained(src)
    return save_pathchat_checkpoint(model, tokenizer, output_dir, "full",
                                    training_config=training if training else None)
