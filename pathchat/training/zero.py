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

from pathchat.model.modeling import PathChatForConditionalGeneration
from pathchat.training.checkpoints import TRAINING_CONFIG_NAME, save_pathchat_checkpoint

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
    model = PathChatForConditionalGeneration(config)
    training: dict = {}
    if (src / TRAINING_CONFIG_NAME).is_file():
        training = yaml.safe_load((src / TRAINING_CONFIG_NAME).read_text()) or {}
    lora = (training.get("lora") or {}) if isinstance(training, dict) else {}
    if lora.get("enabled"):
        from pathchat.model.lora import LoraSettings, apply_lora, merge_lora

        apply_lora(model, LoraSettings(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                                       target_modules=lora.get("target_modules")))
        model.load_state_dict(state, strict=True)
        model = merge_lora(model)
    else:
        model.load_state_dict(state, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(src)
    return save_pathchat_checkpoint(model, tokenizer, output_dir, "full",
                                    training_config=training if training else None)
