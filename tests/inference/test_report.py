"""`pathchat report` with a real (tiny, random) PathChat checkpoint through the inference pipeline.

Batched reports must say exactly what one-question-at-a-time generation says (greedy, left padding),
`write_report` (the web UI's one-click report) writes the same four files, and the verb runs from the
command line with its exit code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_models import SLIDE_FRAME_CONNECTOR, build_tiny

from pathchat.inference import RESEARCH_NOTICE, FeatureRecipe, Pipeline
from pathchat.inference.report import PipelineGenerator, run_reports, write_report
from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide

RECIPE = FeatureRecipe(encoder="random-cnn-tiny", feature_dim=64, target_mpp=0.5, tile_px=256, overlap_px=0)
PROMPTS = """name: short
max_new_tokens: 6
sections:
  - {name: tissue, title: Tissue, question: 'Which tissue types are present?'}
  - {name: amount, title: Amount, question: 'How much tissue is on the slide?'}
  - {name: summary, title: Summary, question: 'Summarize what is visible on this slide.', max_new_tokens: 9}
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    model, tokenizer = build_tiny("qwen2", connector=SLIDE_FRAME_CONNECTOR, feature_dim=64)
    model.config.feature_recipe = RECIPE.to_dict()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    for i in range(3):
        regions = (TissueRegion("tumor", 128 * i, 0, 1024, 1024), TissueRegion("stroma", 1024, 512, 512, 1024))
        write_synthetic_slide(folder / f"case_{i}.svs", SyntheticSlideSpec(2048, 1536, mpp=0.5, regions=regions,
                                                                           seed=i))
    return folder


@pytest.mark.slow
def test_batched_reports_equal_one_at_a_time_and_write_report(checkpoint, slides, tmp_path):
    prompts = tmp_path / "short.yaml"
    prompts.write_text(PROMPTS)
    pipe = Pipeline.from_pretrained(checkpoint, feature_job=tmp_path / "features")
    run = run_reports([slides], tmp_path / "batched", pipe, prompts=str(prompts), batch_size=3, progress=False)
    assert (run.summary.done, run.summary.failed) == (3, 0)
    assert run.model_calls >= 2  # the 6-token and the 9-token sections decode in separate batches

    for i in range(3):
        batched = json.loads((tmp_path / "batched" / f"case_{i}.json").read_text())
        slide = pipe.prepare(slides / f"case_{i}.svs")  # the cache the workers filled: no recomputation
        one_by_one = PipelineGenerator(pipe, max_items=1)
        single = write_report(pipe, slide, tmp_path / "single", prompts=str(prompts), generator=one_by_one)
        assert one_by_one.calls == 3  # one generation per section
        report = single["report"]
        assert [s["answer"] for s in report["sections"]] == [s["answer"] for s in batched["sections"]]
        assert report["notice"] == batched["notice"] == RESEARCH_NOTICE
        assert report["model"]["id"] == batched["model"]["id"] == pipe.model_id
        assert report["feature_recipe"]["encoder"] == "random-cnn-tiny"
        assert report["tiling"]["n_tiles"] == slide.num_tiles > 0
        # the evidence is the same tiles, with scores equal up to float rounding of batched attention
        assert [t["tile_index"] for t in report["evidence"][:3]] == [t["tile_index"] for t in batched["evidence"][:3]]
        np.testing.assert_allclose([t["score"] for t in report["evidence"]], [t["score"] for t in batched["evidence"]],
                                   atol=1e-4)
        assert sorted(p.name for p in single["paths"].values()) == sorted(
            f"case_{i}{s}" for s in (".json", ".md", ".heatmap.png", ".evidence.geojson"))


@pytest.mark.slow
def test_the_cli_reports_good_slides_fails_a_bad_file_and_exits_2(checkpoint, slides, tmp_path, capsys):
    from shared_data import SLIDES

    from pathchat.cli import main
    from pathchat.utils.atomic import read_jsonl

    prompts = tmp_path / "short.yaml"
    prompts.write_text(PROMPTS)
    out = tmp_path / "out"
    args = ["report", str(slides / "case_0.svs"), str(SLIDES / "bad" / "broken.svs"), "--model", str(checkpoint),
            "--out", str(out), "--prompts", str(prompts), "--features", str(tmp_path / "features"),
            "--batch-size", "2", "--no-progress"]
    assert main(args) == 2
    printed = capsys.readouterr()
    assert "FAILED broken: [unsupported_format]" in printed.err
    assert "done 1 / no_tissue 0 / skipped 0 / failed 1" in printed.out
    assert [r["slide_id"] for r in read_jsonl(out / "failures.jsonl")] == ["broken"]
    assert json.loads((out / "case_0.json").read_text())["notice"] == RESEARCH_NOTICE
    assert main(args) == 2  # the rerun: nothing to generate, the bad file still fails
    printed = capsys.readouterr()
    assert "model calls: 0" in printed.out and "done 0 / no_tissue 0 / skipped 1 / failed 1" in printed.out
    assert main([*args[:-3], "--batch-size", "0", "--no-progress"]) == 1  # a usage error, named
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
