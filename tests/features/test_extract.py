"""`pathchat extract` end to end with the tiny random encoder: real slides, resume, corrupt tiles,
scale-out over two processes, stale locks, a second magnification and encoder errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from shared_data import CMU, SLIDES, ZEROED

from pathchat.cli import main
from pathchat.features.encoders import load_encoder
from pathchat.features.store import read_features_h5
from pathchat.utils.atomic import read_jsonl
from pathchat.utils.batch import fingerprint_slide
from pathchat.wsi.coords import read_coords_h5
from pathchat.wsi.discovery import discover_slides
from pathchat.wsi.slide import open_slide
from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide

ENCODER = "random-vit-tiny"
FOLDER = "20x_256px_0px_overlap"
READABLE = {"CMU-1-Small-Region": 50, "small": 1, "boxes__boxes": 1, "camelyon": 6, "wsi2dcm": 12,
            "generic-tiff__boxes": 1}  # tile counts, as in tests/wsi/test_tile_job.py


def _features(job: Path, slide_id: str, folder: str = FOLDER):
    return read_features_h5(job / folder / f"features_{ENCODER}" / f"{slide_id}.h5")


@pytest.mark.slow
def test_extract_real_slides_writes_features_for_every_readable_one(tmp_path, capsys):
    job = tmp_path / "job"
    code = main(["extract", str(SLIDES), "--out", str(job), "--encoder", ENCODER, "--no-progress",
                 "--workers", "0"])
    out = capsys.readouterr().out
    assert code == 2 and "done 6 / no_tissue 0 / skipped 0 / failed 7" in out
    assert len(read_jsonl(job / "failures.jsonl")) == 7
    encoder = load_encoder(ENCODER)
    for slide_id, n in READABLE.items():
        bag = _features(job, slide_id)
        coords = read_coords_h5(job / FOLDER / "patches" / f"{slide_id}_patches.h5").l0_coords
        assert bag.features.shape == (n, encoder.spec.dim) and bag.features.dtype == np.float32
        np.testing.assert_array_equal(bag.coords, coords)  # shapes match the coordinates, same order
        assert np.isfinite(bag.features).all()
    # the values are the encoder's output on exactly those tiles
    bag = _features(job, "CMU-1-Small-Region")
    with open_slide(CMU) as s:
        tiles = np.stack([s.read_region((int(x), int(y)), 0, (256, 256), "black") for x, y in bag.coords[:4]])
    expected = encoder.encode(torch.from_numpy(tiles)).numpy()
    np.testing.assert_allclose(bag.features[:4], expected, rtol=1e-4, atol=1e-5)
    assert bag.attrs["encoder_fingerprint"] == encoder.fingerprint

    # deterministic: a second job gives bit-identical features; a rerun of the first skips everything
    job2 = tmp_path / "job2"
    main(["extract", str(CMU), "--out", str(job2), "--encoder", ENCODER, "--no-progress", "--workers", "2"])
    np.testing.assert_array_equal(_features(job2, "CMU-1-Small-Region").features, bag.features)
    capsys.readouterr()
    assert main(["extract", str(SLIDES), "--out", str(job), "--encoder", ENCODER, "--no-progress"]) == 2
    assert "done 0 / no_tissue 0 / skipped 6 / failed 7" in capsys.readouterr().out


@pytest.mark.slow
def test_corrupt_tiles_are_recorded_and_skipped(tmp_path):
    # Tile the intact slide, then extract from the damaged copy under the same name: the coordinates
    # are reused (fingerprint rewritten to the damaged file's) and the damaged tiles are skipped.
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    shutil.copy(CMU, tmp_path / "good" / "case.svs")
    shutil.copy(ZEROED, tmp_path / "bad" / "case.svs")
    job = tmp_path / "job"
    assert main(["tile", str(tmp_path / "good" / "case.svs"), "--out", str(job), "--no-progress"]) == 0
    coords_file = job / FOLDER / "patches" / "case_patches.h5"
    with h5py.File(coords_file, "r+") as f:
        f["coords"].attrs["fingerprint"] = fingerprint_slide(discover_slides([tmp_path / "bad"])[0])
    assert main(["extract", str(tmp_path / "bad" / "case.svs"), "--out", str(job), "--encoder", ENCODER,
                 "--no-progress", "--workers", "0"]) == 0
    bag = _features(job, "case")
    with h5py.File(job / FOLDER / f"features_{ENCODER}" / "case.h5", "r") as f:
        failed = f["failed_coords"][()]
    assert len(bag) + len(failed) == 50
    assert len(failed) > 0 and set(failed[:, 1]) <= {1536, 1792, 2048}
    row = [r for r in read_jsonl(job / "manifest.jsonl") if r["state"] == "done" and r["verb"] == "extract"][0]
    assert row["info"]["features"]["n_failed_tiles"] == len(failed)


def _synthetic_slides(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_synthetic_slide(folder / f"s{i}.svs", SyntheticSlideSpec(
            1536, 1536, mpp=0.5, seed=i, regions=(TissueRegion("tumor", 128, 128, 384 + 128 * (i % 2), 384),)))
        for i in range(n)
    ]


@pytest.mark.slow
def test_encoding_a_slide_closes_it(tmp_path):
    """The tile reader's slide is closed when its tiles are encoded (it used to wait for garbage
    collection: an "unclosed file" ResourceWarning per slide in every extraction worker)."""
    import gc
    import warnings

    from pathchat.features.extract import ExtractJobConfig, RuntimeOptions, _coords_for, encode_slide

    _synthetic_slides(tmp_path / "slides", 1)
    source = discover_slides([tmp_path / "slides"])[0]
    _, coords = _coords_for(source, tmp_path / "job", ExtractJobConfig().tile, fingerprint_slide(source))
    encoder = load_encoder(ENCODER, pretrained=False)
    gc.collect()  # earlier tests' garbage is not this test's business
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feats, xy, failed = encode_slide(source, coords, encoder, RuntimeOptions(loader_workers=0, device="cpu"))
        gc.collect()
    assert feats.shape == (9, encoder.spec.dim) and xy.shape == (9, 2) and not failed
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


@pytest.mark.slow
def test_two_processes_share_one_job_and_do_each_slide_once(tmp_path):
    _synthetic_slides(tmp_path / "slides", 6)
    job = tmp_path / "job"
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "--master_port=29533", "-m", "pathchat.cli", "extract",
         str(tmp_path / "slides"), "--out", str(job), "--encoder", ENCODER, "--workers", "0", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    done = [r for r in read_jsonl(job / "manifest.jsonl") if r["state"] == "done"]
    assert sorted(r["slide_id"] for r in done) == [f"s{i}" for i in range(6)]  # each exactly once
    assert {r["rank"] for r in done} == {0, 1}  # both processes did work
    assert not list((job / ".locks").rglob("*.lock"))  # every lock released


@pytest.mark.slow
def test_stale_locks_are_taken_over_dead_and_reused_pids_alike(tmp_path):
    _synthetic_slides(tmp_path / "slides", 2)
    job = tmp_path / "job"
    from pathchat.features.extract import ExtractJobConfig, extract_slides, resolve
    from pathchat.utils.batch import params_key, process_start_time

    cfg = resolve(ExtractJobConfig(encoder=ENCODER))
    lock_dir = job / ".locks" / f"extract-{params_key('extract', {'config': cfg.to_dict()})}"
    lock_dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = os.uname().nodename
    (lock_dir / "s0.lock").write_text(json.dumps({"host": host, "pid": int(dead.stdout)}))
    # a pid that is alive but belongs to another process than the one that took the lock (a reused pid
    # after a container restart): its start time tells them apart
    reused = {"host": host, "pid": os.getpid(), "start_time": process_start_time(os.getpid()) - 1000}
    (lock_dir / "s1.lock").write_text(json.dumps(reused))
    summary = extract_slides([tmp_path / "slides"], job, cfg, progress=False)
    assert (summary.done, summary.skipped, summary.failed) == (2, 0, 0)
    for slide in ("s0", "s1"):
        assert (job / FOLDER / f"features_{ENCODER}" / f"{slide}.h5").is_file()


@pytest.mark.slow
def test_second_magnification_is_stored_beside_the_first(tmp_path):
    _synthetic_slides(tmp_path / "slides", 1)
    job = tmp_path / "job"
    assert main(["extract", str(tmp_path / "slides"), "--out", str(job), "--encoder", ENCODER, "--extra-mag", "5",
                 "--no-progress", "--workers", "0"]) == 0
    at20, at5 = _features(job, "s0"), _features(job, "s0", "5x_256px_0px_overlap")
    assert at20.magnification == pytest.approx(20) and at5.magnification == pytest.approx(5)
    assert len(at20) == 9 and len(at5) == 1  # 384 µm square: 3x3 tiles of 128 µm at 20x, one 512 µm tile at 5x
    assert at5.patch_size_level0 == 4 * at20.patch_size_level0


@pytest.mark.slow
def test_unknown_or_unavailable_encoders_are_usage_errors(tmp_path, capsys, monkeypatch):
    assert main(["extract", str(CMU), "--out", str(tmp_path / "j"), "--encoder", "uni_v3"]) == 1
    assert "uni_v1" in capsys.readouterr().err  # close matches are suggested
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("PATHCHAT_ENCODER_WEIGHTS", raising=False)
    code = main(["extract", str(CMU), "--out", str(tmp_path / "j2"), "--encoder", "uni_v1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "PATHCHAT_ENCODER_WEIGHTS" in err
    assert not (tmp_path / "j2" / FOLDER / "features_uni_v1").exists()
