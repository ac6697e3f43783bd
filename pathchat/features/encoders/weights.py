"""Local weights: the YAML weights map, checkpoint files and snapshot folders, and offline availability.

Offline sites point encoder names at local files with a weights map (TRIDENT's `local_ckpts.json`
idea): a YAML `{encoder name: path}` named by PATHCHAT_ENCODER_WEIGHTS or passed explicitly. Paths may
be files (.safetensors, .bin, .pth) or Hugging Face snapshot folders; relative paths are relative
to the YAML file. Checkpoints are read with safetensors or `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from pathchat.features.encoders.errors import WEIGHTS_MAP_ENV, WeightsMapError, WeightsMismatchError
from pathchat.features.encoders.hub import cached_hub_file
from pathchat.features.encoders.registry import is_known_name, unknown_encoder
from pathchat.features.encoders.spec import EncoderSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")


def load_weights_map(path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Read a YAML weights map `{encoder name: local weights path}`.

    Args:
        path: the YAML file; None reads $PATHCHAT_ENCODER_WEIGHTS, and returns {} when that is unset.

    Returns:
        Encoder name -> absolute path (file or snapshot folder), every path checked to exist.

    Raises:
        WeightsMapError: missing or malformed file, unknown encoder name, or a path that does not
            exist; the message names the file and the entry.
    """
    if path is None:
        env = os.environ.get(WEIGHTS_MAP_ENV, "").strip()
        if not env:
            return {}
        path = env
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsMapError(file, None, "file not found")
    import yaml

    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise WeightsMapError(file, None, f"not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WeightsMapError(file, None, f"expected a mapping `encoder_name: /path/to/weights`, got "
                                          f"{type(data).__name__}")
    out: dict[str, str] = {}
    for name, value in data.items():
        if not isinstance(name, str) or not is_known_name(name):
            raise WeightsMapError(file, str(name), str(unknown_encoder(str(name))))
        if not isinstance(value, str) or not value.strip():
            raise WeightsMapError(file, name, f"expected a path string, got {value!r}")
        local = Path(os.path.expandvars(value.strip())).expanduser()
        if not local.is_absolute():
            local = file.parent / local
        if not local.exists():
            raise WeightsMapError(file, name, f"{local} does not exist")
        out[name] = str(local.resolve())
    return out


def read_state_dict(name: str, path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat `{key: tensor}` on the CPU (no pickled code is run).

    Unwraps `{"state_dict": ...}` / `{"model": ...}` containers and a DataParallel `module.` prefix.

    Raises:
        WeightsMismatchError: unreadable, unsafe (needs arbitrary unpickling) or not a state dict.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path), device="cpu")
        else:
            try:
                raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsMismatchError(name, path, f"cannot read it as a weights-only checkpoint ({type(e).__name__}: "
                                               f"{e})") from e
    for _ in range(2):
        if isinstance(raw, dict) and not any(isinstance(v, torch.Tensor) for v in raw.values()):
            inner = next((raw[k] for k in ("state_dict", "model", "module") if isinstance(raw.get(k), dict)), None)
            if inner is None:
                break
            raw = inner
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise WeightsMismatchError(name, path, "not a state dict of tensors")
    state: dict[str, torch.Tensor] = {str(k): v for k, v in raw.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def find_weights_file(spec: EncoderSpec, folder: Path) -> Path:
    """The checkpoint inside a snapshot folder: one of `spec.hub_files`, else the only weights file.

    Raises:
        WeightsMismatchError: nothing suitable, or several candidates and none of the expected names.
    """
    for filename in spec.hub_files:
        if (folder / filename).is_file():
            return folder / filename
    candidates = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    raise WeightsMismatchError(spec.name, folder, f"expected one of {list(spec.hub_files)} (or a single weights "
                                                  f"file), found {[p.name for p in candidates]}")


def file_identity(path: str | os.PathLike[str]) -> str:
    """Cheap identity of local weights: resolved path, size and mtime (folders: of every file inside)."""
    p = Path(path).resolve()
    if p.is_file():
        st = p.stat()
        return f"{p}|{st.st_size}|{st.st_mtime_ns}"
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"{p}|dir|{h.hexdigest()[:16]}"


def weights_available_offline(spec: EncoderSpec, weights_map: dict[str, str] | None = None) -> bool:
    """Whether `load_encoder(spec.name)` would find weights without the network.

    True for random encoders, for a name mapped to an existing path (`weights_map`, or the map named by
    $PATHCHAT_ENCODER_WEIGHTS when None), for an `hf:` local folder, and when the hub cache (HF_HOME /
    HF_HUB_CACHE as set now) already holds the weights. Never touches the network.
    """
    if spec.source == "random":
        return True
    mapping = load_weights_map() if weights_map is None else weights_map
    if spec.name in mapping:
        return Path(mapping[spec.name]).exists()
    if spec.hub_id is None:
        folder = spec.kwargs.get("folder", "") if spec.builder == "hf_generic" else ""
        return bool(folder) and Path(folder).is_dir()
    if spec.source == "transformers":
        return (cached_hub_file(spec.hub_id, ("config.json",)) is not None
                and cached_hub_file(spec.hub_id, _HF_WEIGHT_FILES) is not None)
    return cached_hub_file(spec.hub_id, spec.hub_files) is not None
