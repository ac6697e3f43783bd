"""`pathchat tile` end to end: real slides, bad files, resume, kills, isolation and privacy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from batch_fns import misbehave
from shared_data import SLIDES, TCGA

from pathchat.cli import main
from pathchat.utils.atomic import read_jsonl, sha256_file
from pathchat.utils.batch import BatchRunner
from pathchat.wsi.coords import read_coords_h5
from pathchat.wsi.discovery import discover_slides
from pathchat.wsi.grid import TilingParams
from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide
from pathchat.wsi.tile_job import TileJobConfig, tile_slides

FOLDER = "20x_256px_0px_overlap"

# Tile counts at 20x, 256 px, min tissue 0.25, and why each is plausible:
EXPECTED_TILES = {
    # 0.66 mm² of tissue / 0.0163 mm² per 127.7 µm tile = 40.5 full tiles, plus partly covered border tiles
    "CMU-1-Small-Region": 50,
    # 16x16 px crop, faint tissue over all of it: one padded tile
    "small": 1,
    "boxes__boxes": 1,  # the DICOM copy of small.svs: same answer
    # native 29 µm/px (no upsampling): 1152x700 px = 5x3 grid, 30% tissue
    "camelyon": 6,
    # native 16.8 µm/px: 957x715 px = 4x3 grid, 82% tissue
    "wsi2dcm": 12,
    # 300x250 px of coloured boxes at a meaningless 353 µm/px: 2x1 grid, one tile half covered
    "generic-tiff__boxes": 1,
}
BAD = {
    "broken": "unsupported_format",
    "CMU-1-Small-Region.truncated-1000000": "corrupt",  # an interrupted download: damaged
    "unopenable": "unsupported_format",
    "Mirax2-Fluorescence-1": "corrupt",
    "unreadable": "corrupt",
    "CMU-1-Small-Region.zeroed-600000-700000": "corrupt",
    "tcga-cr-7395-01a-01-ts1": "missing_resolution",  # no mpp and no magnification in the file
}


@pytest.mark.slow
def test_cli_tiles_every_readable_slide_and_reports_every_bad_one(tmp_path, capsys):
    job = tmp_path / "job"
    code = main(["tile", str(SLIDES), "--out", str(job), "--no-progress"])
    out = capsys.readouterr()
    assert code == 2
    assert "done 6 / no_tissue 0 / skipped 0 / failed 7" in out.out
    failures = read_jsonl(job / "failures.jsonl")
    assert sorted(r["slide_id"] for r in failures) == sorted(BAD)  # exactly one row each
    for row in failures:
        assert row["error_type"] == BAD[row["slide_id"]]
        assert row["path"] in row["message"]
        assert f"FAILED {row['slide_id']}" in out.err
    for slide_id, n in EXPECTED_TILES.items():
        coords = read_coords_h5(job / FOLDER / "patches" / f"{slide_id}_patches.h5")
        assert len(coords.l0_coords) == n, slide_id
        assert (job / FOLDER / "visualization" / f"{slide_id}.png").is_file()
        gj = json.loads((job / FOLDER / "contours_geojson" / f"{slide_id}.geojson").read_text())
        assert gj["type"] == "FeatureCollection"
    attrs = read_coords_h5(job / FOLDER / "patches" / "CMU-1-Small-Region_patches.h5").attrs
    assert attrs["patch_size"] == 256 and attrs["patch_size_level0"] == 256
    mask = cv2.imread(str(job / FOLDER / "tissue_masks" / "CMU-1-Small-Region.png"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape[0] * attrs["mask_downsample"] == pytest.approx(2967, abs=2)
    assert set(np.unique(mask)) == {0, 255} and (mask == 255).mean() == pytest.approx(0.402, abs=0.01)
    assert attrs["mpp"] == pytest.approx(0.499) and attrs["mpp_source"] == "metadata"
    assert attrs["level0_width"] == 2220 and attrs["level0_height"] == 2967
    assert json.loads(attrs["slide_info"])["vendor"] == "aperio"

    # the rerun skips what is done and retries only the failures, still one row each
    assert main(["tile", str(SLIDES), "--out", str(job), "--no-progress"]) == 2
    assert "done 0 / no_tissue 0 / skipped 6 / failed 7" in capsys.readouterr().out
    assert len(read_jsonl(job / "failures.jsonl")) == 7


@pytest.mark.slow
def test_tcga_tiles_with_a_resolution_given_and_its_failure_row_clears(tmp_path):
    job = tmp_path / "job"
    assert tile_slides([TCGA], job, progress=False).failed == 1
    summary = tile_slides([TCGA], job, TileJobConfig(default_slide_mpp=0.5), progress=False)
    assert (summary.done, summary.failed) == (1, 0)
    assert read_jsonl(job / "failures.jsonl") == []
    coords = read_coords_h5(job / FOLDER / "patches" / "tcga-cr-7395-01a-01-ts1_patches.h5")
    # 2.53 mm² of tissue / 0.0164 mm² per tile = 155 full tiles plus border tiles
    assert len(coords.l0_coords) == 170 and coords.attrs["mpp_source"] == "fallback"


def test_a_fixed_tissue_threshold_replaces_otsu(tmp_path, capsys):
    cmu = SLIDES / "aperio" / "CMU-1-Small-Region.svs"
    assert main(["tile", str(cmu), "--out", str(tmp_path / "strict"), "--tissue-threshold", "120", "--no-progress"]) == 0
    strict = read_coords_h5(tmp_path / "strict" / FOLDER / "patches" / "CMU-1-Small-Region_patches.h5")
    assert strict.attrs["tissue_threshold"] == 120
    assert len(strict.l0_coords) < EXPECTED_TILES["CMU-1-Small-Region"]  # only the darkest tissue is kept


def test_usage_errors_exit_1(tmp_path, capsys):
    assert main(["tile", str(SLIDES), "--out", str(tmp_path), "--mag", "20", "--mpp", "0.5"]) == 1
    assert "give --mag or --mpp, not both" in capsys.readouterr().err
    assert main(["tile", str(tmp_path / "missing"), "--out", str(tmp_path / "job")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def _synthetic_slides(folder: Path, n: int, **kw) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        regions = (TissueRegion("tumor", 64 + 32 * i, 64, 512, 384), TissueRegion("stroma", 640, 512, 256, 384))
        spec = SyntheticSlideSpec(2048, 2048, mpp=0.5, regions=regions, seed=i, **kw)
        paths.append(write_synthetic_slide(folder / f"slide_{i:02d}.svs", spec))
    return paths


@pytest.mark.slow
def test_resume_checks_checksums_and_fingerprints_not_existence(tmp_path):
    slides = _synthetic_slides(tmp_path / "slides", 3)
    job = tmp_path / "job"
    first = tile_slides([tmp_path / "slides"], job, progress=False)
    assert (first.done, first.skipped) == (3, 0)
    coords_file = job / FOLDER / "patches" / "slide_01_patches.h5"
    before = read_coords_h5(coords_file).l0_coords

    assert tile_slides([tmp_path / "slides"], job, progress=False).skipped == 3
    # a damaged output is noticed by its checksum and redone
    coords_file.write_bytes(b"garbage")
    again = tile_slides([tmp_path / "slides"], job, progress=False)
    assert (again.done, again.skipped) == (1, 2)
    np.testing.assert_array_equal(read_coords_h5(coords_file).l0_coords, before)
    # a changed slide (same name, new content) is redone
    spec = SyntheticSlideSpec(2048, 2048, mpp=0.5, regions=(TissueRegion("tumor", 0, 0, 256, 256),), seed=9)
    write_synthetic_slide(slides[2], spec)
    changed = tile_slides([tmp_path / "slides"], job, progress=False)
    assert (changed.done, changed.skipped) == (1, 2)
    assert len(read_coords_h5(job / FOLDER / "patches" / "slide_02_patches.h5").l0_coords) == 4
    # other settings go to their own folder and do not count as done
    other = tile_slides([tmp_path / "slides"], job, TileJobConfig(tiling=TilingParams(magnification=10)),
                        progress=False)
    assert other.done == 3 and (job / "10x_256px_0px_overlap" / "patches" / "slide_00_patches.h5").is_file()
    states = [(r["slide_id"], r["state"]) for r in read_jsonl(job / "manifest.jsonl")]
    assert states.count(("slide_00", "done")) == 2 and states.count(("slide_00", "skipped")) == 3


def _final_files_are_whole(job: Path) -> None:
    for path in job.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix == ".h5":
            with h5py.File(path, "r") as f:
                assert f["coords"].shape[1] == 2
        elif path.suffix == ".png":
            assert cv2.imread(str(path)) is not None, path
        elif path.suffix == ".geojson":
            json.loads(path.read_text())


@pytest.mark.slow
def test_a_job_killed_at_any_moment_loses_and_duplicates_nothing(tmp_path):
    _synthetic_slides(tmp_path / "slides", 8)
    job = tmp_path / "job"
    cmd = [sys.executable, "-m", "pathchat.cli", "tile", str(tmp_path / "slides"), "--out", str(job),
           "--no-progress"]
    kills = 0
    for delay in (0.4, 1.0, 1.7, 2.5):  # measured here: killed after 0, 0, 2 and 6 of 8 slides were done
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        _final_files_are_whole(job)
    assert kills >= 2  # the job really was interrupted mid-way
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    done, skipped = (int(v) for v in
                     [result.stdout.split("done ")[1].split(" ")[0], result.stdout.split("skipped ")[1].split(" ")[0]])
    assert done + skipped == 8
    rows = read_jsonl(job / "manifest.jsonl")
    last = {}
    for r in rows:
        last[r["slide_id"]] = r
    assert sorted(last) == [f"slide_{i:02d}" for i in range(8)]
    assert {r["state"] for r in last.values()} <= {"done", "skipped"}
    for kind, suffix in (("patches", "_patches.h5"), ("visualization", ".png"), ("contours_geojson", ".geojson"),
                         ("tissue_masks", ".png")):
        names = sorted(p.name for p in (job / FOLDER / kind).iterdir())
        assert names == [f"slide_{i:02d}{suffix}" for i in range(8)]  # no temporaries, no duplicates
    done_rows = {r["slide_id"]: r for r in rows if r["state"] == "done"}
    for slide_id, row in done_rows.items():
        for rel, digest in row["outputs"].items():
            if slide_id in last and last[slide_id]["state"] == "done":
                assert sha256_file(job / rel) == digest


@pytest.mark.slow
def test_a_hanging_crashing_or_raising_slide_fails_alone(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a_ok", "b_hang", "c_segfault", "d_raise", "e_ok"):
        (folder / f"{name}.svs").write_bytes(name.encode())
    runner = BatchRunner(tmp_path / "job", "test", misbehave, {}, workers=2, timeout_s=3, progress=False)
    summary = runner.run(discover_slides([folder]))
    assert (summary.done, summary.failed) == (2, 3)
    kinds = {r["slide_id"]: r["error_type"] for r in read_jsonl(tmp_path / "job" / "failures.jsonl")}
    assert kinds == {"b_hang": "timeout", "c_segfault": "crashed", "d_raise": "RuntimeError"}
    rows = {r["slide_id"]: r for r in summary.failures}
    assert "signal 11" in rows["c_segfault"]["message"] and "deliberate failure" in rows["d_raise"]["message"]
    assert sorted(p.name for p in (tmp_path / "job" / "out").iterdir()) == ["a_ok.txt", "e_ok.txt"]


@pytest.mark.slow
def test_planted_identifiers_never_reach_outputs_or_logs(tmp_path):
    marker = "PHI-7f3a-DOE-JANE"
    spec = SyntheticSlideSpec(2048, 2048, mpp=0.5, regions=(TissueRegion("tumor", 128, 128, 512, 512),),
                              private_marker=marker, label_text=marker)
    slide = write_synthetic_slide(tmp_path / "case.svs", spec)
    assert marker.encode() in slide.read_bytes()  # the test is meaningful: the slide carries it
    shutil.copy(slide, tmp_path / "case_copy.svs")
    job = tmp_path / "job"
    result = subprocess.run(
        [sys.executable, "-m", "pathchat.cli", "-v", "tile", str(tmp_path / "case.svs"), str(tmp_path / "case_copy.svs"),
         "--out", str(job)],
        capture_output=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert marker.encode() not in result.stdout + result.stderr
    files = [p for p in job.rglob("*") if p.is_file()]
    assert len(files) >= 8
    for path in files:
        assert marker.encode() not in path.read_bytes(), path


def test_persistent_workers_keep_their_setup_and_are_replaced_after_a_crash(tmp_path):
    from batch_fns import pid_of_worker, setup_counter

    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b", "c_segfault", "d", "e"):
        (folder / f"{name}.svs").write_bytes(name.encode())
    runner = BatchRunner(tmp_path / "job", "test", pid_of_worker, {}, setup=setup_counter, slides_per_worker=None,
                         progress=False)
    summary = runner.run(discover_slides([folder]))
    assert (summary.done, summary.failed) == (4, 1)
    info = {r["slide_id"]: r["info"] for r in read_jsonl(tmp_path / "job" / "manifest.jsonl") if r["state"] == "done"}
    assert info["a"]["pid"] == info["b"]["pid"]  # one worker, set up once, for both slides
    assert info["a"]["state"] == f"loaded-by-{info['a']['pid']}"
    assert info["d"]["pid"] == info["e"]["pid"] != info["a"]["pid"]  # a new worker after the crash


def test_a_worker_that_cannot_start_stops_the_job_with_a_tool_error(tmp_path):
    from batch_fns import pid_of_worker, setup_counter

    from pathchat.utils.batch import BatchSetupError

    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "a.svs").write_bytes(b"a")
    runner = BatchRunner(tmp_path / "job", "test", pid_of_worker, {"fail_setup": True}, setup=setup_counter,
                         slides_per_worker=None, progress=False)
    with pytest.raises(BatchSetupError, match="weights not found"):
        runner.run(discover_slides([folder]))
    assert read_jsonl(tmp_path / "job" / "failures.jsonl") == []  # not a slide failure


@pytest.mark.slow
def test_a_slide_another_live_process_holds_is_waited_for_never_skipped(tmp_path):
    """The lock's owner is alive (the right start time): the runner waits, then takes the slide over
    when the owner dies without finishing it; the slide is done, not counted as skipped."""
    from pathchat.utils.batch import params_key, process_start_time

    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a_ok", "b_ok"):
        (folder / f"{name}.svs").write_bytes(name.encode())
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    lock_dir = tmp_path / "job" / ".locks" / f"test-{params_key('test', {})}"
    lock_dir.mkdir(parents=True)
    (lock_dir / "b_ok.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": owner.pid,
                                                    "start_time": process_start_time(owner.pid)}))
    start = time.monotonic()
    runner = BatchRunner(tmp_path / "job", "test", misbehave, {}, timeout_s=30, progress=False)
    summary = runner.run(discover_slides([folder]))
    owner.wait()
    assert (summary.done, summary.skipped, summary.failed) == (2, 0, 0)
    assert time.monotonic() - start >= 2.0  # it waited for the live owner
    assert sorted(p.name for p in (tmp_path / "job" / "out").iterdir()) == ["a_ok.txt", "b_ok.txt"]
    assert summary.exit_code == 0


def test_a_torn_manifest_line_never_swallows_the_next_row(tmp_path, caplog, monkeypatch):
    import logging

    from pathchat.utils.atomic import append_jsonl

    # a library configured logging earlier in the session may have disabled existing loggers
    monkeypatch.setattr(logging.getLogger("pathchat.utils.atomic"), "disabled", False)

    manifest = tmp_path / "manifest.jsonl"
    append_jsonl(manifest, {"slide_id": "a", "state": "done"})
    with open(manifest, "ab") as f:
        f.write(b'{"slide_id": "b", "sta')  # a writer killed mid-append
    append_jsonl(manifest, {"slide_id": "c", "state": "done"})
    assert manifest.read_bytes().endswith(b'"sta\n{"slide_id": "c", "state": "done"}\n')
    with caplog.at_level("WARNING", logger="pathchat.utils.atomic"):
        rows = read_jsonl(manifest)
    assert [r["slide_id"] for r in rows] == ["a", "c"]
    assert "line 2" in caplog.text and str(manifest) in caplog.text
