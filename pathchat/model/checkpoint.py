"""The checkpoint manifest: sha256 of every file a PathChat checkpoint folder holds.

`save_pretrained` writes `pathchat_manifest.json` last; `from_pretrained` verifies it first, so a
truncated, swapped or edited file fails loudly with its name instead of loading wrong weights.
Files added to the folder later (a tokenizer, a README) are not covered and are left alone; nor are
the resume checkpoints and logs a training run keeps beside its final checkpoint (`checkpoint-N/`,
`runs/`), so the final files can be copied alone and the resume folders deleted.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

__all__ = ["MANIFEST_NAME", "ManifestError", "check_safetensors", "file_sha256", "model_files", "verify_manifest",
           "write_manifest"]

MANIFEST_NAME = "pathchat_manifest.json"
_FORMAT = 1
_CHUNK = 1 << 20
_ARTEFACT_DIR = re.compile(r"^(checkpoint-\d+|runs)$")


class ManifestError(OSError):
    """A checkpoint folder whose manifest is missing, malformed, or does not match a file (named)."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_training_artefact(rel: Path) -> bool:
    """Resume checkpoints (`checkpoint-N/`), TensorBoard logs (`runs/`) and hidden folders beside a final
    checkpoint: a training run's by-products, not the model. Users delete or leave them behind."""
    top = rel.parts[0] if len(rel.parts) > 1 else ""
    return bool(top) and (bool(_ARTEFACT_DIR.match(top)) or top.startswith("."))


def model_files(folder: str | Path) -> list[Path]:
    """The files of the model saved in `folder` (relative paths), training by-products left out."""
    folder = Path(folder)
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and p.name != MANIFEST_NAME and not _is_training_artefact(rel):
            files.append(rel)
    return files


def write_manifest(folder: str | Path) -> Path:
    """Hash the model's files under `folder` (recursively; the manifest and training by-products such as
    `checkpoint-N/` and `runs/` excepted) into the manifest, so the final files can be copied alone.

    Returns:
        The manifest's path.
    """
    folder = Path(folder)
    files = {rel.as_posix(): file_sha256(folder / rel) for rel in model_files(folder)}
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps({"format": _FORMAT, "sha256": files}, indent=2, sort_keys=True) + "\n")
    return path


def check_safetensors(path: str | Path) -> None:
    """Check that a safetensors file is whole: its header parses and every tensor lies inside the file.

    A truncated file whose manifest was re-hashed passes the sha256 check; this catches it by name
    before the loader fails deep inside.

    Raises:
        ManifestError: naming the file and what is wrong.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ManifestError(f"{path}: truncated safetensors file ({size} bytes, not even a header)")
        header_len = struct.unpack("<Q", head)[0]
        if header_len > size - 8:
            raise ManifestError(f"{path}: truncated safetensors file: its header claims {header_len:,} bytes, "
                                f"the file has {size:,}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path}: damaged safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ManifestError(f"{path}: damaged safetensors header (not a JSON object)")
    ends = [int(t["data_offsets"][1]) for k, t in header.items()
            if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        raise ManifestError(f"{path}: truncated safetensors file: its tensors need {needed:,} bytes, "
                            f"the file has {size:,}")


def verify_manifest(folder: str | Path) -> dict[str, str]:
    """Check every model file the manifest lists against its sha256, and every safetensors file's structure.

    Files a manifest from an older version lists under `checkpoint-N/` or `runs/` are not the model's:
    their absence is no error.

    Returns:
        The verified `{relative path: sha256}` map.

    Raises:
        ManifestError: no manifest, a malformed one, a listed file missing, a hash mismatch or a
            truncated safetensors file; the message names the folder and the file.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST_NAME}; this is not a checkpoint PathChat saved "
                            "(save it with save_pretrained, or load with verify_manifest=False)")
    try:
        data = json.loads(path.read_text())
        files = data["sha256"]
        if data.get("format") != _FORMAT or not isinstance(files, dict):
            raise ValueError(f"unsupported manifest format {data.get('format')!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{path}: malformed manifest: {e}") from e
    verified: dict[str, str] = {}
    for name, expected in sorted(files.items()):
        file = folder / name
        if _is_training_artefact(Path(name)):
            continue
        if not file.is_file():
            raise ManifestError(f"{file}: listed in {MANIFEST_NAME} but missing")
        actual = file_sha256(file)
        if actual != expected:
            raise ManifestError(f"{file}: sha256 {actual} does not match {expected} in {MANIFEST_NAME} "
                                "(the file was modified or corrupted after saving)")
        if file.suffix == ".safetensors":
            check_safetensors(file)
        verified[name] = expected
    return verified
