"""The built-in model's packaging (pathchat.model.builtin): shipping a LoRA checkpoint, hash checks of
its files and of the base GGUF it was trained on. Tiny adapters stand in for the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import build_tiny

from pathchat.model.builtin import (
    BASE_HASH_KEY,
    MAX_SHIPPED_BYTES,
    BaseModelMismatchError,
    builtin_model_dir,
    check_base_model,
    ship_model,
)
from pathchat.model.checkpoint import (
    MANIFEST_NAME,
    ManifestError,
    file_sha256,
    verify_manifest,
    write_manifest,
)
from pathchat.model.lora import LoraSettings, apply_lora
from pathchat.model.pretrained import load_pathchat
from pathchat.model.smollm import smollm2_gguf_path
from pathchat.training.checkpoints import save_pathchat_checkpoint


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory) -> Path:
    """A LoRA checkpoint (tiny LM standing in) that names SmolLM2 as its base, like the built-in model."""
    model, tokenizer = build_tiny("llama")
    model.config.base_language_model = "smollm2"
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    folder = tmp_path_factory.mktemp("lora") / "ckpt"
    save_pathchat_checkpoint(model, tokenizer, folder, "lora", training_config={"stage": "instruct"})
    return folder


def test_ship_model_records_the_gguf_hash_and_a_manifest(lora_checkpoint, tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"heldout_accuracy": 0.5}))
    dest = ship_model(lora_checkpoint, scores, dest=tmp_path / "default_model")
    assert verify_manifest(dest)  # every shipped file hashed
    config = json.loads((dest / "config.json").read_text())
    assert config[BASE_HASH_KEY] == file_sha256(smollm2_gguf_path())
    assert json.loads((dest / "scores.json").read_text()) == {"heldout_accuracy": 0.5}
    assert (dest / "training_config.yaml").is_file() and (dest / MANIFEST_NAME).is_file()
    assert sum(p.stat().st_size for p in dest.iterdir()) < MAX_SHIPPED_BYTES
    adapter = json.loads((dest / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not (tmp_path / "default_model.tmp").exists()


def test_other_base_gguf_is_a_clear_error(lora_checkpoint, tmp_path):
    dest = ship_model(lora_checkpoint, dest=tmp_path / "m")
    config = json.loads((dest / "config.json").read_text())
    check_base_model(dest, config)  # the installed GGUF is the recorded one
    config[BASE_HASH_KEY] = "0" * 64
    (dest / "config.json").write_text(json.dumps(config))
    write_manifest(dest)  # a consistent folder: only the base differs
    with pytest.raises(BaseModelMismatchError, match=smollm2_gguf_path().name) as e:
        load_pathchat(dest)
    assert "0" * 64 in str(e.value) and "make default-model" in str(e.value)


def test_tampered_file_is_refused_before_anything_loads(lora_checkpoint, tmp_path):
    dest = ship_model(lora_checkpoint, dest=tmp_path / "m")
    data = bytearray((dest / "connector.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (dest / "connector.safetensors").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="connector.safetensors"):
        load_pathchat(dest)


def test_ship_model_refuses_a_folder_without_an_adapter(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ship_model(tmp_path / "src", dest=tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_builtin_model_dir_needs_a_complete_folder(monkeypatch, lora_checkpoint, tmp_path):
    import pathchat.model.builtin as builtin

    monkeypatch.setattr(builtin, "BUILTIN_DIR", tmp_path / "absent")
    assert builtin_model_dir() is None
    dest = ship_model(lora_checkpoint, dest=tmp_path / "shipped")
    monkeypatch.setattr(builtin, "BUILTIN_DIR", dest)
    assert builtin_model_dir() == dest
    (dest / "adapter_model.safetensors").unlink()
    assert builtin_model_dir() is None
