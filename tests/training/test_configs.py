"""Every shipped stage YAML loads into typed configs; every DeepSpeed JSON passes DeepSpeed's own checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pathchat.training.config import ConfigError, load_stage_config

ROOT = Path(__file__).resolve().parents[2]
YAMLS = sorted((ROOT / "train").glob("*.yaml"))
DS_JSONS = sorted((ROOT / "train" / "deepspeed").glob("*.json"))


def test_files_are_shipped():
    assert {p.name for p in YAMLS} >= {"align.yaml", "instruct.yaml", "instruct_lora.yaml",
                                        "tiny_align.yaml", "tiny_instruct.yaml"}
    assert {p.name for p in DS_JSONS} == {"zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_stage_yaml_loads(path):
    cfg = load_stage_config(path)
    assert cfg.stage in ("align", "instruct")
    assert cfg.data.train and cfg.data.features
    if cfg.stage == "instruct":
        assert cfg.model.init_from, "stage 2 must start from stage 1's connector"
    if cfg.training.deepspeed:
        assert (ROOT / cfg.training.deepspeed).is_file()
    assert cfg.prompt_format == ("plain" if cfg.stage == "align" else "chat")


def test_dotted_overrides_are_typed_and_checked():
    cfg = load_stage_config(ROOT / "train" / "instruct_lora.yaml",
                            ["--training.learning_rate", "1e-4", "--lora.r", "8", "--data.max_tiles=null"])
    assert cfg.training.learning_rate == 1e-4 and cfg.lora.r == 8 and cfg.data.max_tiles is None
    assert cfg.lora.enabled is True and cfg.stage == "instruct"  # the rest still comes from the file
    mapping = load_stage_config(None, {"training.learning_rate": 2e-4, "data.train": ["a.jsonl"],
                                       "model.connector": {"type": "mlp"}, "data.max_tiles": None})
    assert (mapping.training.learning_rate, mapping.data.train, mapping.model.connector, mapping.data.max_tiles) == \
        (2e-4, ["a.jsonl"], {"type": "mlp"}, None)
    with pytest.raises(ConfigError, match=r"flag --training.lr: unknown key 'training.lr' \(valid in 'training': "):
        load_stage_config(ROOT / "train" / "align.yaml", ["--training.lr", "1"])
    with pytest.raises(ConfigError, match="invalid value for training.batch_size: expected int, got 'many'"):
        load_stage_config(ROOT / "train" / "align.yaml", ["--training.batch_size", "many"])
    with pytest.raises(ConfigError, match="lora.enabled must be false"):
        load_stage_config(ROOT / "train" / "align.yaml", ["--lora.enabled", "true"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_stage_config(ROOT / "train" / "missing.yaml")


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_deepspeed_json_is_valid(path):
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    raw = json.loads(path.read_text())
    assert raw["optimizer"]["params"]["torch_adam"] is True  # no 50 s CPU-Adam compile
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=1e-4, use_cpu=True, report_to=[])
    hf = HfTrainerDeepSpeedConfig(str(path))
    hf.trainer_config_process(args)
    filled = json.loads(json.dumps(hf.config))
    assert "auto" not in json.dumps({k: v for k, v in filled.items() if k != "zero_optimization"})
    ds = DeepSpeedConfig(filled)
    assert ds.zero_optimization_stage == raw["zero_optimization"]["stage"]
    assert ds.train_micro_batch_size_per_gpu == 4 and ds.gradient_accumulation_steps == 2
    if "offload" in path.name:
        assert ds.zero_config.offload_optimizer.device == "cpu"
