"""Odd real files (`../shared/data/odd_slides`): each ends in its own honest outcome, never "done 0".

Fluorescence is refused as such, "not supported" and "damaged" are told apart, a slide without usable
tissue is `no_tissue` (summary line and manifest), a file named directly always gets a row, and
files in a folder that are no slide are listed with the reason.
"""

from __future__ import annotations

import shutil

import h5py
import pytest
from shared_data import ODD, SLIDES

from pathchat.cli import main
from pathchat.utils.atomic import read_jsonl
from pathchat.wsi.discovery import find_slides
from pathchat.wsi.errors import CorruptSlideError, NotBrightfieldError, UnsupportedFormatError
from pathchat.wsi.slide import open_slide
from pathchat.wsi.tile_job import TileJobConfig, tile_slides

FOLDER = "20x_256px_0px_overlap"

#: slide id -> (manifest state, error kind or None, tiles); tiled with --default-slide-mpp 0.5 (file 5 has none)
EXPECTED = {
    "1": ("done", None, 12),  # JPEG 2000 DICOM at a (converter-assigned) 16.8 µm/px: native 4x3 grid
    "2": ("done", None, 12),  # the same image uncompressed: the same grid
    "3": ("failed", "unsupported_format", 0),  # valid DICOM without ImageType: not supported, not damaged
    "small_vectra": ("failed", "not_brightfield", 0),  # 6-channel fluorescence QPTIFF
    "kidney-48-5": ("no_tissue", None, 0),  # nearly blank plain TIFF
    "6": ("failed", "unsupported_format", 0),  # label-only DICOM
    "7": ("no_tissue", None, 0),  # 50 x 50 uniform grey DICOM
}


def test_every_odd_file_gets_its_own_outcome(tmp_path, capsys):
    job = tmp_path / "job"
    code = main(["tile", str(ODD), "--out", str(job), "--default-slide-mpp", "0.5", "--no-progress"])
    out = capsys.readouterr()
    assert code == 2  # three slides failed
    assert "done 2 / no_tissue 2 / skipped 0 / failed 3" in out.out
    last = {r["slide_id"]: r for r in read_jsonl(job / "manifest.jsonl") if r["state"] != "started"}
    assert sorted(last) == sorted(EXPECTED)
    failures = {r["slide_id"]: r for r in read_jsonl(job / "failures.jsonl")}
    for slide_id, (state, kind, tiles) in EXPECTED.items():
        assert last[slide_id]["state"] == state, slide_id
        if kind is not None:
            assert failures[slide_id]["error_type"] == kind
        else:
            assert last[slide_id]["info"]["n_tiles"] == tiles
            assert slide_id not in failures
    assert "not supported: a whole-slide DICOM without ImageType" in failures["3"]["message"]
    assert "only a LABEL image" in failures["6"]["message"]
    assert "fluorescence" in failures["small_vectra"]["message"]
    assert "NO TISSUE kidney-48-5" in out.err and "NO TISSUE 7" in out.err
    with h5py.File(job / FOLDER / "patches" / "7_patches.h5") as f:  # no_tissue still writes its outputs
        assert f["coords"].shape == (0, 2)
    # the rerun counts the no-tissue slides again as no_tissue, not as skipped
    assert main(["tile", str(ODD), "--out", str(job), "--default-slide-mpp", "0.5", "--no-progress"]) == 2
    assert "done 0 / no_tissue 2 / skipped 2 / failed 3" in capsys.readouterr().out
    skipped = [r for r in read_jsonl(job / "manifest.jsonl") if r["state"] == "skipped" and r["slide_id"] == "7"]
    assert skipped[-1]["outcome"] == "no_tissue"


def test_a_fluorescence_qptiff_named_directly_gets_a_row(tmp_path, capsys):
    job = tmp_path / "job"
    assert main(["tile", str(ODD / "4" / "small_vectra.qptiff"), "--out", str(job), "--no-progress"]) == 2
    assert "done 0 / no_tissue 0 / skipped 0 / failed 1" in capsys.readouterr().out
    [row] = read_jsonl(job / "failures.jsonl")
    assert row["error_type"] == "not_brightfield" and "6-channel" in row["message"]
    with pytest.raises(NotBrightfieldError, match="RGB brightfield"):
        open_slide(ODD / "4" / "small_vectra.qptiff")


def test_not_supported_and_damaged_are_different_errors():
    with pytest.raises(UnsupportedFormatError, match="not supported: .*LABEL") as label:
        open_slide(ODD / "6" / "test.dcm")
    assert not isinstance(label.value, CorruptSlideError)
    with pytest.raises(CorruptSlideError, match="damaged: truncated"):
        open_slide(SLIDES / "bad" / "CMU-1-Small-Region.truncated-1000000.svs")
    with pytest.raises(UnsupportedFormatError, match="not supported: .*compression"):
        open_slide(SLIDES / "bad" / "unopenable.tiff")


def test_unknown_files_are_listed_and_a_symlink_loop_is_skipped(tmp_path, capsys, caplog):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(SLIDES / "aperio" / "small.svs", folder / "small.svs")
    (folder / "scan.czi").write_bytes(b"ZISRAWFILE")
    (folder / "notes.txt").write_text("sidecar\n")
    (folder / "self").symlink_to(folder)  # a folder loop
    (folder / "knot.svs").symlink_to(folder / "knot.svs")  # a file loop
    found = find_slides([folder])
    assert [s.slide_id for s in found.sources] == ["small"]
    reasons = dict(found.ignored)
    assert "unknown extension '.czi'" in reasons[str(folder / "scan.czi")]
    assert reasons[str(folder / "knot.svs")] == "symlink loop"
    assert any("symlink loop" in r for p, r in found.ignored if p.endswith("self"))
    assert str(folder / "notes.txt") not in reasons  # sidecars pass silently
    summary = tile_slides([folder], tmp_path / "job", TileJobConfig(), progress=False)
    assert (summary.done, summary.failed) == (1, 0) and len(summary.ignored) == 3
    assert main(["tile", str(folder), "--out", str(tmp_path / "job2"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"IGNORED FILE {folder / 'scan.czi'}" in err and "symlink loop" in err and "Traceback" not in err


def test_an_empty_folder_is_a_usage_error_naming_it_and_the_formats(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["tile", str(tmp_path / "empty"), "--out", str(tmp_path / "job"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and ".svs" in err and "DICOM" in err
    assert not (tmp_path / "job").exists()


def test_no_tissue_slides_get_empty_features_and_their_own_outcome(tmp_path):
    from pathchat.features.encoders import load_encoder
    from pathchat.features.extract import ExtractJobConfig, RuntimeOptions, extract_slide

    [source] = find_slides([ODD / "7"]).sources
    encoder = load_encoder("random-vit-tiny", pretrained=False)
    result = extract_slide(source, tmp_path / "job", ExtractJobConfig(pretrained=False), encoder,
                           RuntimeOptions(loader_workers=0, device="cpu"))
    assert result["state"] == "no_tissue"
    assert result["info"]["features"]["n_grid_tiles"] == 0
    feature_file = next(p for p in result["outputs"] if "features_random-vit-tiny" in p)
    with h5py.File(feature_file) as f:
        assert f["features"].shape == (0, encoder.spec.dim)
