"""bench/bench_training.py runs end to end at a tiny size and reports consistent, finite figures."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_training.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_training", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_make_data_writes_one_question_records(tmp_path):
    bench = _load_bench()
    data = bench.make_data(tmp_path, slides=3, heldout=1, tiles=10, feature_dim=8, questions=(6, 8))
    train = [json.loads(line) for line in data["train"].read_text().splitlines()]
    assert len(train) == data["train_answers"]
    per_slide: dict[str, int] = {}
    for rec in train:
        assert len(rec["conversations"]) == 2 and rec["conversations"][0]["value"].startswith("<slide>\n")
        per_slide[rec["slide"]] = per_slide.get(rec["slide"], 0) + 1
    assert len(per_slide) == 3 and all(6 <= n <= 8 for n in per_slide.values())
    assert len(list(data["features"].glob("*.h5"))) == 4  # train + held-out slides


@pytest.mark.slow
def test_training_bench_small_run(tmp_path):
    bench = _load_bench()
    out = tmp_path / "training.json"
    result = bench.main(["--slides", "3", "--heldout-slides", "1", "--tiles", "40", "--feature-dim", "32",
                         "--lm-layers", "1", "--lm-hidden", "32", "--memory-lm-layers", "1",
                         "--memory-lm-hidden", "32", "--connector", '{"type": "scale_invariant", "grid_size": 2, '
                         '"num_latents": 4, "hidden_dim": 32}', "--epochs", "1", "--step-warmup", "1",
                         "--step-steps", "2", "--step-repeats", "1", "--memory-steps", "1", "--logits-vocab", "30000",
                         "--logits-length", "256", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["model"]["num_slide_tokens"] == 8

    packing = result["packing"]
    packed, single = packing["runs"]["packed"], packing["runs"]["one_question"]
    # Same answers both ways; packing puts each slide's questions in one sample.
    assert packed["answers"] == single["answers"] == result["data"]["train_answers"]
    assert packed["samples"] == 3 and single["samples"] == single["answers"]
    for run in (packed, single):
        for key in ("answers_per_s", "answers_per_cpu_s", "mean_step_s", "train_loss_first",
                    "train_loss_last_quarter"):
            assert _positive(run[key]), (key, run[key])
    assert _positive(packing["answers_per_s_ratio"]) and _positive(packing["answers_per_cpu_s_ratio"])
    for losses in packing["heldout_answer_loss"].values():
        assert _positive(losses["packed_layout"]) and _positive(losses["one_question_layout"])
    tokens = packing["cost_breakdown"]["tokens_per_answer"]
    assert tokens["one_question"] > tokens["packed"] > 0  # the slide tokens are repeated per question

    step = result["trainer_step"]
    assert _positive(step["pathchat_step_ms"]) and _positive(step["plain_step_ms"]) and _positive(step["ratio"])
    assert step["max_param_diff"] < 1e-6  # same model, batch and optimizer: the same updates

    memory = result["memory"]
    for name in ("align", "instruct_full", "instruct_lora"):
        m = memory[name]
        assert _positive(m["peak_rss_mib"]) and m["peak_rss_mib"] >= m["rss_after_imports_mib"] > 0
        assert m["peak_rss_stage_mib"] >= m["peak_rss_training_mib"] > 0 and _positive(m["ru_maxrss_mib"])
        assert m["steps"] == 1 and _positive(m["weights_grads_adam_mib"])
        assert 0 < m["trainable_parameters"] <= m["parameters"]
    full, lora, align = memory["instruct_full"], memory["instruct_lora"], memory["align"]
    assert full["trainable_parameters"] == full["parameters"]  # instruct full trains everything
    assert align["trainable_parameters"] < lora["trainable_parameters"] < full["trainable_parameters"]

    # Logits at the answer tokens only: the same loss, a [labelled, vocab] tensor, a smaller peak.
    logits = result["logits"]
    every, only = logits["all"], logits["labels"]
    assert every["logits_shape"] == [1, 256, 30000]
    assert only["logits_shape"] == [only["labelled_positions"], 30000] and 0 < only["labelled_positions"] < 256
    assert logits["loss_abs_diff"] < 1e-4 and _positive(every["loss"])
    assert only["peak_rss_step_mib"] < every["peak_rss_step_mib"] and logits["peak_rss_saved_mib"] > 0
