"""`pathchat report`'s batch machinery: real, generated and bad slides, resume, kills, two processes, privacy.

The generation step is `report_fns.StandInPipeline` (deterministic answers from the real cached
features, calls counted), so these tests exercise the workers, the generation server, the manifest
and the files without a language model; test_report.py runs the built-in model through the same path.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from report_fns import StandInPipeline
from shared_data import SLIDES

from pathchat.inference import RESEARCH_NOTICE
from pathchat.inference.report import output_name, run_reports
from pathchat.utils.atomic import read_jsonl, sha256_file
from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide

FNS = Path(__file__).with_name("report_fns.py")
SUFFIXES = (".json", ".md", ".heatmap.png", ".evidence.geojson")
READABLE_SHARED = {"CMU-1-Small-Region", "small", "boxes__boxes"}
#: Scanned coarser than the model's 0.5 µm/px (mpp in the slide's README), or with no mpp recorded (the TCGA
#: slide): an "insufficient resolution" report each, found before tiling, no model call, not a failure.
LOW_RES_SHARED = {"camelyon": "28.97 µm/px", "wsi2dcm": "16.78 µm/px", "generic-tiff__boxes": "352.8 µm/px",
                  "tcga-cr-7395-01a-01-ts1": "no mpp recorded"}
BAD_SHARED = {  # every file under bad/ of the shared folder, with the failure it must be recorded as
    "broken": "unsupported_format", "CMU-1-Small-Region.truncated-1000000": "corrupt",
    "unopenable": "unsupported_format", "Mirax2-Fluorescence-1": "corrupt", "unreadable": "corrupt",
    "CMU-1-Small-Region.zeroed-600000-700000": "corrupt",
}


def _generated(folder: Path, n: int, blank: bool = False, **kw) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        regions = (TissueRegion("tumor", 64 + 32 * i, 64, 512, 384), TissueRegion("stroma", 640, 512, 256, 384))
        spec = SyntheticSlideSpec(2048, 2048, mpp=0.5, regions=regions, seed=i, **kw)
        paths.append(write_synthetic_slide(folder / f"gen_{i:02d}.svs", spec))
    if blank:
        paths.append(write_synthetic_slide(folder / "blank.svs", SyntheticSlideSpec(1024, 1024, mpp=0.5)))
    return paths


def _check_report_files(out: Path, name: str, n_sections: int = 4) -> dict:
    report = json.loads((out / f"{name}.json").read_text())
    assert report["notice"] == RESEARCH_NOTICE
    assert RESEARCH_NOTICE in (out / f"{name}.md").read_text()
    assert len(report["sections"]) == n_sections
    png = cv2.imread(str(out / f"{name}.heatmap.png"))
    assert png is not None and png.shape[0] > 0
    geo = json.loads((out / f"{name}.evidence.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(report["evidence"])
    return report


@pytest.mark.slow
def test_a_mixed_folder_reports_every_readable_slide_and_fails_every_bad_file_alone(tmp_path):
    gen = tmp_path / "generated"
    _generated(gen, 2, blank=True)
    dup = tmp_path / "copied_export"
    shutil.copytree(SLIDES / "dicom" / "camelyon", dup)  # the same DICOM instance as the shared one
    out = tmp_path / "reports"
    pipe = StandInPipeline()
    run = run_reports([SLIDES, gen, dup], out, pipe, batch_size=2, progress=False)
    s = run.summary
    assert s.exit_code == 2
    failures = {r["slide_id"]: r for r in read_jsonl(out / "failures.jsonl")}
    assert {k: r["error_type"] for k, r in failures.items()} == {
        **BAD_SHARED, "multiframe_camelyon_challenge_image": "duplicate_instance"}
    assert all("/bad/" in failures[k]["path"] for k in BAD_SHARED)
    assert len(failures["Mirax2-Fluorescence-1"]["files"]) == 6  # .mrxs and every file of its data folder
    assert (s.done, s.no_tissue, s.insufficient_resolution, s.failed) == (
        len(READABLE_SHARED) + 2, 1, len(LOW_RES_SHARED), len(BAD_SHARED) + 1)
    assert sorted(s.insufficient_resolution_slides) == sorted(LOW_RES_SHARED)
    for name, slide_mpp in LOW_RES_SHARED.items():
        low = _check_report_files(out, name)
        assert low["status"] == "insufficient_resolution" and low["evidence"] == []
        assert slide_mpp in low["status_reason"] and "0.5 µm/px" in low["status_reason"]
        assert {x["answer"] for x in low["sections"]} == {"Resolution too low for this model: not assessed."}
        assert "Insufficient resolution." in (out / f"{name}.md").read_text()
    tiled = {f.name.split(".")[0].removesuffix("_patches") for f in (out / "features").rglob("*.h5")}
    assert "CMU-1-Small-Region" in tiled and not tiled & set(LOW_RES_SHARED)  # the low-res ones were never tiled
    for name in READABLE_SHARED | {"gen_00", "gen_01"}:
        report = _check_report_files(out, name)
        assert report["status"] == "ok" and report["model"]["id"] == "stand-in-1"
        assert report["feature_recipe"]["encoder"] == "random-cnn-tiny"
        ev = report["evidence"]
        assert ev and ev[0]["rank"] == 1 and ev[0]["score"] >= ev[-1]["score"]
        assert report["sections"][0]["answer"].startswith("Describe ")  # the stand-in's answer came back
    cmu = json.loads((out / "CMU-1-Small-Region.json").read_text())
    assert cmu["tiling"]["n_tiles"] == 50 and cmu["tiling"]["l0_tile_px"] == 256  # as `pathchat tile` finds
    x, y = cmu["evidence"][0]["l0_x"], cmu["evidence"][0]["l0_y"]
    assert 0 <= x < 2220 and 0 <= y < 2967  # level-0 pixels of the 2220 x 2967 slide
    blank = _check_report_files(out, "blank")
    assert blank["status"] == "insufficient_tissue" and blank["evidence"] == []
    # one model call per generation round; rounds hold up to 2 slides x 4 sections
    assert run.model_calls == pipe.calls == len(run.batch_sizes) and max(pipe.items_seen) <= 8
    assert sum(run.batch_sizes) == len(READABLE_SHARED) + 2  # each slide's sections were asked once (no low-res one)

    again = StandInPipeline()
    rerun = run_reports([SLIDES, gen, dup], out, again, batch_size=2, progress=False)
    assert again.calls == 0 and rerun.model_calls == 0  # an unchanged folder makes zero model calls
    assert (rerun.summary.done, rerun.summary.skipped, rerun.summary.no_tissue) == (0, 5, 1)
    assert rerun.summary.insufficient_resolution == len(LOW_RES_SHARED)  # resumed, still counted on their own
    assert rerun.summary.exit_code == 2  # the bad files still fail

    prompts = tmp_path / "two.yaml"
    prompts.write_text("name: two\nsections:\n- {name: a, question: 'What tissue?'}\n- {name: b, question: 'Where?'}\n")
    changed = StandInPipeline()
    redo = run_reports([gen], out, changed, prompts=str(prompts), batch_size=4, progress=False)
    assert (redo.summary.done, redo.summary.skipped) == (2, 0) and changed.calls >= 1
    assert len(json.loads((out / "gen_00.json").read_text())["sections"]) == 2
    new_model = StandInPipeline(model_id="stand-in-2")
    redo = run_reports([gen], out, new_model, prompts=str(prompts), batch_size=4, progress=False)
    assert (redo.summary.done, redo.summary.skipped) == (2, 0)  # a new checkpoint redoes the reports


def _final_state_is_whole(out: Path, names: list[str]) -> None:
    produced = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    expected = sorted([f"{n}{s}" for n in names for s in SUFFIXES] + ["failures.jsonl", "manifest.jsonl"])
    assert produced == expected  # nothing missing, nothing duplicated, no temporaries
    last: dict[str, dict] = {}
    for row in read_jsonl(out / "manifest.jsonl"):
        last[row["slide_id"]] = row
    done = {r["slide_id"]: r for r in read_jsonl(out / "manifest.jsonl") if r["state"] == "done"}
    for name in names:
        assert last[name]["state"] in ("done", "skipped")
        for rel, digest in done[name]["outputs"].items():
            assert sha256_file(out / rel) == digest, rel
        _check_report_files(out, name)


def _rows(out: Path, state: str) -> int:
    return sum(1 for r in read_jsonl(out / "manifest.jsonl") if r["state"] == state) if out.is_dir() else 0


@pytest.mark.slow
@pytest.mark.timeout(1500)  # several start-ups of a process that imports torch: slow on a loaded machine
def test_reports_killed_at_random_moments_resume_to_a_whole_folder(tmp_path):
    _generated(tmp_path / "slides", 4)
    out = tmp_path / "out"
    cmd = [sys.executable, str(FNS), str(out), str(tmp_path / "slides"), "--delay", "1.0"]
    rng = random.Random(13)
    kills = 0
    for _ in range(3):
        # kill at a random moment after this run has started real work (a slide claimed), so the kill
        # lands in extraction, generation or file writing rather than in the interpreter's start-up
        started = _rows(out, "started")
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while proc.poll() is None and _rows(out, "started") == started and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.3, 2.0))  # within the run even on a quiet machine
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["done"] + counts["skipped"] == 4 and counts["failed"] == 0
    _final_state_is_whole(out, [f"gen_{i:02d}" for i in range(4)])
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {
        "done": 0, "no_tissue": 0, "skipped": 4, "failed": 0, "model_calls": 0}


@pytest.mark.slow
@pytest.mark.timeout(1500)  # several start-ups of a process that imports torch: slow on a loaded machine
def test_two_processes_on_one_folder_report_each_slide_exactly_once(tmp_path):
    _generated(tmp_path / "slides", 6)
    out = tmp_path / "out"
    cmd = [sys.executable, str(FNS), str(out), str(tmp_path / "slides"), "--delay", "0.3"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    counts = [json.loads(r[0].strip().splitlines()[-1]) for r in results]
    assert sum(c["done"] for c in counts) == 6  # between them, every slide once
    done_rows = [r for r in read_jsonl(out / "manifest.jsonl") if r["state"] == "done"]
    assert sorted(r["slide_id"] for r in done_rows) == [f"gen_{i:02d}" for i in range(6)]
    _final_state_is_whole(out, [f"gen_{i:02d}" for i in range(6)])


class _RecordingStandIn(StandInPipeline):
    """Keeps every question the generation step was given: the prompts, as the model would read them."""

    def __init__(self) -> None:
        super().__init__()
        self.questions: list[str] = []

    def answer_batch(self, items, max_new_tokens=64, batch_size=8):
        self.questions += [q for _, q in items]
        return super().answer_batch(items, max_new_tokens, batch_size)


@pytest.mark.slow
def test_planted_identifiers_never_reach_reports_logs_or_prompts(tmp_path, capfd, caplog):
    import logging

    from pathchat.inference.report_prompts import load_prompt_set

    marker = "PHI-9c2e-DOE-JOHN"
    slides = _generated(tmp_path / "slides", 1, private_marker=marker, label_text=marker)
    assert marker.encode() in slides[0].read_bytes()  # meaningful: the slide file carries it
    out = tmp_path / "out"
    pipe = _RecordingStandIn()
    caplog.set_level(logging.DEBUG)
    run = run_reports([tmp_path / "slides"], out, pipe, progress=True)
    assert run.summary.done == 1
    assert sorted(pipe.questions) == sorted(s.question for s in load_prompt_set().sections)  # nothing else
    captured = capfd.readouterr()  # this process's and the workers' stdout and stderr
    assert marker not in captured.out + captured.err + caplog.text
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 6
    for path in files:
        assert marker.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_anonymised_reports_are_named_by_a_salted_hash_and_the_map_is_separate(tmp_path):
    _generated(tmp_path / "slides", 1)
    out = tmp_path / "out"
    run = run_reports([tmp_path / "slides"], out, StandInPipeline(), anonymise=True, progress=False)
    assert run.summary.done == 1
    salt = (out / ".anonymise_salt").read_text().strip()
    name = output_name("gen_00", salt)
    assert name.startswith("slide-") and "gen_00" not in name
    mapping = json.loads((out / "anonymisation_map.json").read_text())
    assert mapping == {name: {"slide_id": "gen_00", "files": [str((tmp_path / "slides" / "gen_00.svs").resolve())]}}
    for suffix in SUFFIXES:
        assert b"gen_00" not in (out / f"{name}{suffix}").read_bytes()
    assert json.loads((out / f"{name}.json").read_text())["slide"] == name
    assert output_name("gen_00", "another salt") != name
