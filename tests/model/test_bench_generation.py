"""bench/bench_generation.py runs end to end on a very small model and reports consistent figures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_generation.py"


@pytest.mark.slow
def test_generation_bench_small_run(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_generation", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "generation.json"
    result = bench.main(["--layers", "1", "--hidden", "64", "--vocab", "1024", "--tiles", "40",
                         "--new-tokens", "24", "--repeats", "3", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["greedy_outputs_identical"] is True  # all three paths decode the same tokens
    assert result["model"]["attn_implementation"] == "sdpa"
    for name in ("plain", "pathchat_generate", "chat_session"):
        assert result["decode"]["wall"][name]["ms_24_tokens"] > 0
    # A decode rate is (N - 1) / (t_N - t_1): with 4 tokens and one repeat, timer noise made it negative
    # (-0.012 ms a token); 24 tokens, the median of 3, leave it positive.
    assert result["decode"]["cpu"]["chat_session"]["ratio_vs_plain"] > 0
    ttft = result["ttft"]
    assert ttft["first_turn_prefill_tokens"] == result["prompt_tokens"]
    assert ttft["full_recomputes"] == 0 and ttft["connector_runs"] == 1
    # The follow-up prefilled exactly what the first turn had not: the new tokens only.
    assert ttft["follow_up_prefill_tokens"] == ttft["follow_up_conversation_tokens"] - ttft["first_turn_prefill_tokens"]
    assert 0 < ttft["follow_up_prefill_tokens"] < 40 < ttft["first_turn_prefill_tokens"]
