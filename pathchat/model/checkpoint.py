"""The checkpoint manifest: sha256 of every file a PathChat checkpoint folder holds.

`save_pretrained` writes `pathchat_manifest.json` last; `from_pretrained` verifies it first, so a
truncated, swapped or edited file fails loudly with its name instead of loading wrong weights.
Files added to the folder later (a tokenizer, a README) are not covered and are left alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["MANIFEST_NAME", "ManifestError", "file_sha256", "verify_manifest", "write_manifest"]

MANIFEST_NAME = "pathchat_manifest.json"
_FORMAT = 1
_CHUNK = 1 << 20


class ManifestError(OSError):
    """A checkpoint folder whose manifest is missing, malformed, or does not match a file (named)."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """Hash every regular file under `folder` (recursively, the manifest excepted) into the manifest.

    Returns:
        The manifest's path.
    """
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps({"format": _FORMAT, "sha256": files}, indent=2, sort_keys=True) + "\n")
    return path


def verify_manifest(folder: str | Path) -> dict[str, str]:
    """Check every file the manifest lists against its sha256.

    Returns:
        The verified `{relative path: sha256}` map.

    Raises:
        ManifestError: no manifest, a malformed one, a listed file missing, or a hash mismatch;
            the message names the folder and the file.
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
    for name, expected in sorted(files.items()):
        file = folder / name
        if not file.is_file():
            raise ManifestError(f"{file}: listed in {MANIFEST_NAME} but missing")
        actual = file_sha256(file)
        if actual != expected:
            raise ManifestError(f"{file}: sha256 {actual} does not match {expected} in {MANIFEST_NAME} "
                                "(the file was modified or corrupted after saving)")
    return dict(files)
