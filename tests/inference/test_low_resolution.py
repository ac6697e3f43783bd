"""Slides that cannot give the model's resolution: scanned coarser than the feature recipe, or no mpp recorded.

They are readable, so they are not failures: `Pipeline.prepare` raises `SlideResolutionError` (found from
the slide's metadata before any tiling), chat and the web UI answer a fixed text, and `pathchat report`
writes an "insufficient_resolution" report; none of them calls the model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from shared_data import SLIDES, TCGA

from pathchat.inference import RESEARCH_NOTICE, FeatureRecipeError, Pipeline, SlideResolutionError
from pathchat.inference.notices import INSUFFICIENT_RESOLUTION_SECTION, NO_TILES_IN_REGION_ANSWER
from pathchat.inference.pipeline import SlideFeatures
from pathchat.inference.recipe import check_extracted_features
from pathchat.inference.report import PipelineGenerator, write_report
from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide

CAMELYON = SLIDES / "dicom" / "camelyon" / "multiframe_camelyon_challenge_image.dcm"  # 28.97 µm/px
SHORT_PROMPTS = """name: short
max_new_tokens: 4
sections:
  - {name: tissue, title: Tissue, question: 'Which tissue types are present?'}
  - {name: summary, title: Summary, question: 'Summarize the slide.'}
"""


def _coarse(folder: Path, name: str = "coarse.svs", mpp: float = 2.0) -> Path:
    """Tissue over the whole slide, scanned at `mpp` µm/px (the model's recipe wants 0.5)."""
    folder.mkdir(parents=True, exist_ok=True)
    regions = (TissueRegion("tumor", 0, 0, 1024, 1024),)
    return write_synthetic_slide(folder / name, SyntheticSlideSpec(1024, 1024, mpp=mpp, regions=regions))


def _good(folder: Path, name: str = "good.svs") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    regions = (TissueRegion("tumor", 0, 0, 1024, 1024), TissueRegion("stroma", 1024, 0, 512, 1024))
    return write_synthetic_slide(folder / name, SyntheticSlideSpec(1536, 1024, mpp=0.5, regions=regions, seed=1))


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# ------------------------------------------------------------------------------------------ pipeline


def test_prepare_refuses_a_coarse_slide_before_tiling_naming_both_resolutions(pipe: Pipeline, tmp_path: Path):
    cache = tmp_path / "cache"
    pipe = dataclasses.replace(pipe, feature_job=cache)
    coarse = _coarse(tmp_path / "slides")
    stages: list[str] = []
    with pytest.raises(SlideResolutionError) as info:
        pipe.prepare(coarse, progress=lambda stage, done, total: stages.append(stage))
    e = info.value
    assert isinstance(e, FeatureRecipeError)  # callers catching the old error still do
    assert (e.slide_mpp, e.target_mpp, e.slide_id, e.level0_size) == (2.0, 0.5, "coarse", (1024, 1024))
    assert str(e).startswith(f"{coarse}: ") and " 2 µm/px" in str(e) and "0.5 µm/px (20x)" in str(e)
    assert stages == [] and _files(cache) == []  # no tiling, no encoding: nothing was written


@pytest.mark.parametrize(("slide", "slide_mpp", "text"), [
    (CAMELYON, 28.969, "28.97 µm/px"),  # a real DICOM WSI with one level at about 29 µm/px
    (TCGA, None, "no mpp recorded"),  # a real Aperio slide that records neither mpp nor magnification
])
def test_real_slides_too_coarse_or_without_mpp(pipe: Pipeline, tmp_path: Path, slide: Path, slide_mpp, text: str):
    pipe = dataclasses.replace(pipe, feature_job=tmp_path / "cache")
    with pytest.raises(SlideResolutionError, match=text) as info:
        pipe.prepare(slide)
    if slide_mpp is None:
        assert info.value.slide_mpp is None
    else:
        assert info.value.slide_mpp == pytest.approx(slide_mpp, abs=0.01)
    assert "0.5 µm/px (20x)" in str(info.value) and slide.name in str(info.value)
    assert _files(tmp_path / "cache") == []


def test_the_after_extraction_check_is_the_fallback(pipe: Pipeline, tmp_path: Path, monkeypatch):
    # Without the metadata check the slide is tiled at its native 2 µm/px; the features' own attributes
    # then give the same specific error.
    monkeypatch.setattr("pathchat.inference.pipeline.check_slide_resolution", lambda *a, **k: None)
    coarse = _coarse(tmp_path / "slides")
    with pytest.raises(SlideResolutionError, match=r"coarse\.svs: .* 2 µm/px.* 0\.5 µm/px") as info:
        dataclasses.replace(pipe, feature_job=tmp_path / "cache").prepare(coarse)
    assert info.value.slide_mpp == 2.0 and info.value.level0_size == (1024, 1024)
    assert any(p.suffix == ".h5" for p in _files(tmp_path / "cache"))  # it did tile and encode this time


def test_other_recipe_differences_after_extraction_stay_plain_recipe_errors(pipe: Pipeline):
    attrs = {"encoder": "random-cnn-tiny", "dim": 64, "target_mpp": 0.5, "patch_size": 512, "overlap": 0}
    with pytest.raises(FeatureRecipeError, match="tile_px") as info:
        check_extracted_features(pipe.recipe, attrs, "x.svs", "x.svs")
    assert not isinstance(info.value, SlideResolutionError)
    finer = {**attrs, "patch_size": 256, "target_mpp": 0.25, "mpp": 0.25}  # finer than the model: not "too low"
    with pytest.raises(FeatureRecipeError) as info:
        check_extracted_features(pipe.recipe, finer, "x.svs", "x.svs")
    assert not isinstance(info.value, SlideResolutionError)
    check_extracted_features(pipe.recipe, {**attrs, "patch_size": 256}, "x.svs", "x.svs")  # the recipe: fine


def test_session_and_batch_answer_a_fixed_text_without_a_model_call(pipe: Pipeline, tmp_path: Path):
    coarse = _coarse(tmp_path / "slides")
    with pytest.raises(SlideResolutionError) as info:
        dataclasses.replace(pipe, feature_job=tmp_path / "cache").prepare(coarse)
    slide = SlideFeatures.unassessed(info.value, pipe.recipe)
    assert slide.insufficient_resolution and not slide.no_tissue and slide.num_tiles == 0
    session = pipe.session(slide)
    assert not session.calls_model
    answer = session.ask("What tissue is this?")
    assert answer.startswith("Resolution too low for this model:") and " 2 µm/px" in answer and "0.5 µm/px" in answer
    assert session.model_calls == 0 and session.relevance().shape == (0,) and session.top_tiles(3) == []
    region = pipe.session(slide, region=(0, 0, 512, 512))  # the resolution explains more than the region
    assert region.ask("Here?") == answer != NO_TILES_IN_REGION_ANSWER and region.model_calls == 0
    text, rel = pipe.answer_batch([(slide, "What?")])[0]
    assert text == answer and rel.shape == (0,)


def test_write_report_gives_the_insufficient_resolution_report(pipe: Pipeline, tmp_path: Path):
    with pytest.raises(SlideResolutionError) as info:
        dataclasses.replace(pipe, feature_job=tmp_path / "cache").prepare(_coarse(tmp_path / "slides", "case_17.svs"))
    generator = PipelineGenerator(pipe)
    result = write_report(pipe, SlideFeatures.unassessed(info.value, pipe.recipe), tmp_path / "r", generator=generator)
    assert generator.calls == 0  # no model call
    report = result["report"]
    assert report["status"] == "insufficient_resolution" and report["notice"] == RESEARCH_NOTICE
    assert " 2 µm/px" in report["status_reason"] and "0.5 µm/px (20x)" in report["status_reason"]
    assert "case_17" not in report["status_reason"]  # no file name in the reason (reports may be anonymised)
    assert {s["answer"] for s in report["sections"]} == {INSUFFICIENT_RESOLUTION_SECTION}
    assert report["evidence"] == [] and report["tiling"]["n_tiles"] == 0
    assert (report["tiling"]["level0_width"], report["tiling"]["mpp"]) == (1024, 2.0)
    md = result["paths"]["markdown"].read_text()
    assert RESEARCH_NOTICE in md and "**Insufficient resolution.**" in md
    assert sorted(p.name for p in result["paths"].values()) == sorted(
        f"case_17{s}" for s in (".json", ".md", ".heatmap.png", ".evidence.geojson"))
    assert json.loads(result["paths"]["evidence"].read_text())["features"] == []


# ---------------------------------------------------------------------------------------------- chat


def test_chat_answers_the_fixed_text(checkpoint: Path, tmp_path: Path, capsys):
    from pathchat.inference.chat import chat

    coarse = _coarse(tmp_path / "slides")
    code = chat(str(coarse), model=str(checkpoint), ask=["What tissue is this?"], json=True,
                features=str(tmp_path / "f"), progress=False)
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["insufficient_resolution"] is True and out["no_tissue"] is False and out["tiles"] == 0
    answer = out["answers"][0]["answer"]
    assert answer.startswith("Resolution too low for this model:") and " 2 µm/px" in answer
    assert out["answers"][0]["top_tiles"] == []


# -------------------------------------------------------------------------------------------- web UI


def test_the_web_ui_service_opens_the_slide_and_explains(pipe: Pipeline, tmp_path: Path):
    from pathchat.serve.catalog import SlideCatalog
    from pathchat.serve.service import ChatService

    slides = tmp_path / "slides"
    _coarse(slides)
    service = ChatService(dataclasses.replace(pipe, feature_job=tmp_path / "cache"),
                          SlideCatalog(slides, tmp_path / "uploads", 0), reports_dir=tmp_path / "reports")
    (slide,) = service.catalog.list()
    conv = service.open_slide(slide.slide_id)  # no exception: the slide opens
    assert conv.prepared.insufficient_resolution
    pieces = list(service.ask(conv, "What tissue is this?"))
    assert len(pieces) == 1 and pieces[0].kind == "insufficient_resolution" and pieces[0].done
    assert pieces[0].text.startswith("Resolution too low for this model:") and pieces[0].evidence is None
    assert conv.session is None  # no chat session, so no model
    assert list(service.ask(conv, "Here?", region=(0, 0, 100, 100)))[0].kind == "insufficient_resolution"
    paths = service.write_report(conv)
    assert json.loads(paths["json"].read_text())["status"] == "insufficient_resolution"


# ---------------------------------------------------------------------------------------- batch report


@pytest.mark.slow
def test_the_report_verb_writes_insufficient_resolution_reports_and_exits_0(checkpoint: Path, tmp_path: Path,
                                                                           capsys):
    from pathchat.cli import main
    from pathchat.utils.atomic import read_jsonl

    slides = tmp_path / "slides"
    _good(slides)
    _coarse(slides, "coarse_a.svs", 2.0)
    _coarse(slides, "coarse_b.svs", 4.0)
    prompts = tmp_path / "short.yaml"
    prompts.write_text(SHORT_PROMPTS)
    out = tmp_path / "out"
    args = ["report", str(slides), "--model", str(checkpoint), "--out", str(out), "--prompts", str(prompts),
            "--features", str(tmp_path / "features"), "--batch-size", "2", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "done 1 / no_tissue 0 / insufficient_resolution 2 / skipped 0 / failed 0" in printed.out
    assert "model calls: 1 " in printed.out  # the good slide's one round; none for the coarse ones
    assert "INSUFFICIENT RESOLUTION coarse_a" in printed.err and "FAILED" not in printed.err
    assert not (out / "failures.jsonl").exists() or read_jsonl(out / "failures.jsonl") == []
    for name, mpp in (("coarse_a", " 2 µm/px"), ("coarse_b", " 4 µm/px")):
        report = json.loads((out / f"{name}.json").read_text())
        assert report["status"] == "insufficient_resolution" and mpp in report["status_reason"]
        assert "0.5 µm/px" in report["status_reason"] and report["model"]["id"].startswith(checkpoint.name)
        assert all(s["answer"] == INSUFFICIENT_RESOLUTION_SECTION for s in report["sections"])
        for suffix in (".md", ".heatmap.png", ".evidence.geojson"):
            assert (out / f"{name}{suffix}").is_file()
    assert json.loads((out / "good.json").read_text())["status"] == "ok"
    states = {r["slide_id"]: r["state"] for r in read_jsonl(out / "manifest.jsonl") if r["state"] != "started"}
    assert states == {"good": "done", "coarse_a": "insufficient_resolution", "coarse_b": "insufficient_resolution"}

    assert main(args) == 0  # a rerun: nothing to do, the coarse slides still counted on their own
    printed = capsys.readouterr()
    assert "model calls: 0" in printed.out
    assert "done 0 / no_tissue 0 / insufficient_resolution 2 / skipped 1 / failed 0" in printed.out

    bad = tmp_path / "bad.svs"
    bad.write_bytes((SLIDES / "bad" / "broken.svs").read_bytes())
    assert main([*args[:2], str(bad), *args[2:]]) == 2  # a bad file beside them: exit 2, only it fails
    assert [r["slide_id"] for r in read_jsonl(out / "failures.jsonl")] == ["bad"]
