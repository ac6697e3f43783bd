"""`make demo` runs end to end: slides -> tiles -> features -> (cached) trained model -> reports."""

from __future__ import annotations

import json

import pytest

from pathchat.demo import demo_model_dir, main


@pytest.mark.timeout(1800)  # trains the demo model when this test runs first
def test_demo_chats_with_three_new_slides(demo_model, tmp_path, capsys):
    cache, ckpt, summary = demo_model
    job = tmp_path / "job"
    assert main(["--out", str(job), "--cache", str(cache), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "no cached demo model" not in out  # the session's trained model was reused
    assert f"{summary['heldout_accuracy']:.1%}" in out
    reports = sorted((job / "reports").glob("*.json"))
    assert [p.stem for p in reports] == ["demo-00", "demo-01", "demo-02"]
    correct = total = 0
    for path in reports:
        report = json.loads(path.read_text())
        assert (job / "reports" / f"{path.stem}.md").read_text().startswith(f"# {path.stem}")
        assert report["tiles"] > 0 and len(report["turns"]) == 4
        assert report["turns"][0]["question"] == "Write a short report of this slide."
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


@pytest.mark.timeout(1800)
def test_demo_model_cache_key_follows_the_recipe_config(demo_model):
    from data_recipes.synthetic.learn import LearnConfig

    cache, ckpt, _ = demo_model
    assert demo_model_dir(cache, LearnConfig()) == ckpt.parent
    assert demo_model_dir(cache, LearnConfig(instruct_epochs=1.0)) != ckpt.parent
