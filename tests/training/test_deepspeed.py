"""DeepSpeed ZeRO-2 / ZeRO-3 really run here: on this CPU, one or two processes, each run a fresh process.

The first DeepSpeed start on a machine compiles a small communication helper (~35 s, cached in
~/.cache/torch_extensions); "torch_adam": true in the shipped JSONs avoids compiling CPU Adam.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_data import stage_overrides

from pathchat.model.pretrained import checkpoint_kind, load_pathchat

pytestmark = pytest.mark.slow  # every test here trains or runs for more than a few seconds

ROOT = Path(__file__).resolve().parents[2]
DS = ROOT / "train" / "deepspeed"
RUNNER = Path(__file__).with_name("ds_run.py")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run(overrides: dict, stop_after: int | None = None, expect: int = 0) -> dict:
    cmd = [sys.executable, str(RUNNER), json.dumps(overrides)] + ([str(stop_after)] if stop_after else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else {}


def test_zero2_both_stages_and_exact_resume(toy, tmp_path):
    ds = {"training.deepspeed": str(DS / "zero2.json"), "training.max_steps": 4}
    full = _run(stage_overrides(toy, "align", tmp_path / "a_full", **ds))
    assert full["steps"] == 4 and full["trainable"] > 0

    killed = tmp_path / "a_killed"
    _run(stage_overrides(toy, "align", killed, **ds), stop_after=2, expect=3)
    assert (killed / "checkpoint-2" / "global_step2").is_dir()
    resumed = _run(stage_overrides(toy, "align", killed, **ds))
    assert resumed["resumed_from"] == str(killed / "checkpoint-2")
    assert sorted(resumed["losses"]) == ["1", "2", "3", "4"]  # 1-2 restored from the checkpoint's state
    for step in ("1", "2", "3", "4"):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], abs=1e-6)

    inst = _run(stage_overrides(toy, "instruct", tmp_path / "i", **ds,
                                **{"model.init_from": str(tmp_path / "a_full")}))
    assert inst["steps"] == 4
    model, _ = load_pathchat(tmp_path / "i")
    assert checkpoint_kind(tmp_path / "i") == "full"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_zero3_align_and_lora_then_convert_shards(toy, tmp_path):
    ds3 = {"training.deepspeed": str(DS / "zero3.json"), "training.max_steps": 4}
    align = _run(stage_overrides(toy, "align", tmp_path / "a", **ds3))
    assert align["steps"] == 4
    lora = _run(stage_overrides(toy, "instruct", tmp_path / "l", **ds3,
                                **{"model.init_from": str(tmp_path / "a"), "lora.enabled": True, "lora.r": 4}))
    assert lora["steps"] == 4
    ckpt = tmp_path / "l" / "checkpoint-4"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "global_step4").is_dir()

    out = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-m", "pathchat.cli", "convert-zero", str(ckpt), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    converted = load_file(str(out / "model.safetensors"))
    final = load_file(str(tmp_path / "l" / "model.safetensors"))  # gathered + merged at step 4
    assert converted.keys() == final.keys()
    assert max(float((converted[k] - final[k]).abs().max()) for k in final) < 1e-6
    load_pathchat(out)


def test_two_processes_with_torchrun(toy, tmp_path):
    cfg = tmp_path / "two.yaml"
    import yaml

    from pathchat.training.config import load_stage_config

    cfg.write_text(yaml.safe_dump(load_stage_config(None, stage_overrides(
        toy, "instruct", tmp_path / "two", **{"training.deepspeed": str(DS / "zero2.json"),
                                               "training.max_steps": 3})).to_dict()))
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "pathchat.cli", "train", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["steps"] == 3
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())
    # 12 packed samples, 2 per process per step, 2 processes: 4 samples per step
    assert state["epoch"] == pytest.approx(3 * 4 / 12)
    load_pathchat(tmp_path / "two")
