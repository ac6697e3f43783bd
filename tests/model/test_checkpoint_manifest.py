"""The checkpoint manifest covers the model's own files and catches truncation by name."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from pathchat.model.checkpoint import (
    MANIFEST_NAME,
    ManifestError,
    check_safetensors,
    verify_manifest,
    write_manifest,
)


def _safetensors(path, n_floats: int) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4 * n_floats))


def _final_checkpoint(folder):
    """A final checkpoint beside a training run's resume checkpoints and logs, as `pathchat train` leaves it."""
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "pathchat"}')
    _safetensors(folder / "model.safetensors", 16)
    for step in (50, 100):
        (folder / f"checkpoint-{step}").mkdir()
        _safetensors(folder / f"checkpoint-{step}" / "model.safetensors", 16)
        (folder / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"state")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out.tfevents").write_bytes(b"log")
    return folder


def test_manifest_leaves_out_resume_checkpoints_and_logs(tmp_path):
    ckpt = _final_checkpoint(tmp_path / "run")
    write_manifest(ckpt)
    listed = json.loads((ckpt / MANIFEST_NAME).read_text())["sha256"]
    assert sorted(listed) == ["config.json", "model.safetensors"]
    shutil.rmtree(ckpt / "checkpoint-50")  # users delete the resume checkpoints...
    shutil.rmtree(ckpt / "runs")
    assert sorted(verify_manifest(ckpt)) == ["config.json", "model.safetensors"]
    copy = tmp_path / "copy"  # ...or copy only the final files
    copy.mkdir()
    for name in ("config.json", "model.safetensors", MANIFEST_NAME):
        shutil.copy(ckpt / name, copy / name)
    assert sorted(verify_manifest(copy)) == ["config.json", "model.safetensors"]


def test_an_older_manifest_listing_resume_folders_still_verifies_without_them(tmp_path):
    ckpt = _final_checkpoint(tmp_path / "run")
    files = {p.relative_to(ckpt).as_posix(): __import__("hashlib").sha256(p.read_bytes()).hexdigest()
             for p in ckpt.rglob("*") if p.is_file()}
    (ckpt / MANIFEST_NAME).write_text(json.dumps({"format": 1, "sha256": files}))
    assert "checkpoint-50/optimizer.pt" in files
    shutil.rmtree(ckpt / "checkpoint-50")
    assert sorted(verify_manifest(ckpt)) == ["config.json", "model.safetensors"]


def test_a_truncated_safetensors_with_a_rehashed_manifest_is_named(tmp_path):
    ckpt = _final_checkpoint(tmp_path / "run")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    write_manifest(ckpt)  # the hashes now match the damaged file
    with pytest.raises(ManifestError, match=r"model\.safetensors: truncated safetensors file: its tensors need 135 bytes, the file has 125"):
        verify_manifest(ckpt)
    weights.write_bytes(b"\x05")
    with pytest.raises(ManifestError, match="not even a header"):
        check_safetensors(weights)
    weights.write_bytes(struct.pack("<Q", 4) + b"{bad")
    with pytest.raises(ManifestError, match="damaged safetensors header"):
        check_safetensors(weights)
