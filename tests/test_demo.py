"""`make demo` runs end to end: slides -> the inference pipeline (tiles, features) -> model -> reports."""

from __future__ import annotations

import json

import pytest

from data_recipes.synthetic.demo import REPORT_PROMPT, main
from pathchat.inference import RESEARCH_NOTICE


@pytest.mark.slow
def test_demo_chats_with_three_new_slides(tmp_path, capsys):
    """`make demo` as a new user runs it: the built-in model (SmolLM2 + the shipped connector and LoRA)."""
    job = tmp_path / "job"
    assert main(["--out", str(job), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(RESEARCH_NOTICE)
    assert "model: default_model@" in out  # pathchat/assets/default_model
    assert "training" not in out  # nothing trains at demo time
    reports = sorted((job / "reports").glob("*.json"))
    assert [p.stem for p in reports] == ["demo-00", "demo-01", "demo-02"]
    # the pipeline's feature cache is the job folder, in `pathchat extract`'s layout
    assert len(list(job.glob("*/features_random-cnn-tiny/demo-0*.h5"))) == 3
    correct = total = 0
    for path in reports:
        report = json.loads(path.read_text())
        assert (job / "reports" / f"{path.stem}.md").read_text().startswith(f"# {path.stem}")
        assert report["tiles"] > 0 and len(report["turns"]) == 4
        assert report["turns"][0]["question"] == REPORT_PROMPT
        # the KV cache is reused: follow-up turns prefill only their own tokens
        assert all(n < report["prefill_tokens"][0] for n in report["prefill_tokens"][1:])
        for turn in report["turns"]:
            assert turn["answer"].strip(), (path.stem, turn["question"], turn["answer_token_ids"])
            assert turn["answer_token_ids"]
            assert len(turn["top_tiles_level0_xy"]) == min(3, report["tiles"])
        for turn in report["turns"][1:3]:  # dominant class, classes present
            total += 1
            correct += turn["answer"].strip().lower() == turn["truth"].lower()
    # 6 open questions about slides the model never saw (6 classes; a random answer is rarely exact)
    assert correct >= 3, out
    assert "summary: 3 slides" in out
