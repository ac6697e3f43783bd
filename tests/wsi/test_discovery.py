"""Slide discovery: multi-file slides count once, ids are unique, sidecar files are ignored."""

from __future__ import annotations

import shutil

from shared_data import SLIDES

from pathchat.wsi.discovery import discover_slides


def test_shared_slides_folder_gives_thirteen_slides():
    sources = discover_slides([SLIDES])
    ids = sorted(s.slide_id for s in sources)
    assert ids == sorted([
        "CMU-1-Small-Region", "small", "tcga-cr-7395-01a-01-ts1", "generic-tiff__boxes", "boxes__boxes",
        "camelyon", "wsi2dcm", "CMU-1-Small-Region.truncated-1000000", "CMU-1-Small-Region.zeroed-600000-700000",
        "broken", "unopenable", "unreadable", "Mirax2-Fluorescence-1",
    ])
    by_id = {s.slide_id: s for s in sources}
    assert len(by_id["boxes__boxes"].files) == 2  # the two-file DICOM series is one slide
    assert len(by_id["Mirax2-Fluorescence-1"].files) == 6  # .mrxs + its 5 data-folder files
    assert by_id["Mirax2-Fluorescence-1"].path.suffix == ".mrxs"


def test_dicom_series_folder_given_directly_is_one_slide():
    sources = discover_slides([SLIDES / "dicom" / "boxes"])
    assert [s.slide_id for s in sources] == ["boxes"]
    assert [f.name for f in sources[0].files] == ["boxes_0.dcm", "boxes_1.dcm"]


def test_vms_parts_sidecars_and_duplicate_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "scan.vms").write_text("[Virtual Microscope Specimen]\nImageFile=scan.jpg\nMapFile=scan_map.jpg\n")
    (tmp_path / "a" / "scan.jpg").write_bytes(b"x")
    (tmp_path / "a" / "scan_map.jpg").write_bytes(b"x")
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    (tmp_path / "a" / "scan.h5").write_bytes(b"ignored")
    shutil.copy(SLIDES / "aperio" / "small.svs", tmp_path / "a" / "case.svs")
    shutil.copy(SLIDES / "aperio" / "small.svs", tmp_path / "b" / "case.svs")
    sources = discover_slides([tmp_path])
    assert sorted(s.slide_id for s in sources) == ["a__case", "b__case", "scan"]
    scan = next(s for s in sources if s.slide_id == "scan")
    assert sorted(f.name for f in scan.files) == ["scan.jpg", "scan.vms", "scan_map.jpg"]


def test_a_copied_dicom_instance_is_a_duplicate_not_a_third_series_member(tmp_path):
    series = tmp_path / "case"
    shutil.copytree(SLIDES / "dicom" / "boxes", series)
    shutil.copy(series / "boxes_0.dcm", series / "boxes_0_copy.dcm")  # same SOP Instance UID
    export = tmp_path / "export2"
    shutil.copytree(SLIDES / "dicom" / "boxes", export)  # the whole series exported twice
    sources = {s.slide_id: s for s in discover_slides([tmp_path])}
    # the first file in path order holds an instance; later files with its SOP Instance UID are duplicates
    assert sorted(sources) == ["boxes_0", "boxes_0_copy", "boxes_1", "case"]
    case = sources["case"]
    assert [f.name for f in case.files] == ["boxes_0.dcm", "boxes_1.dcm"] and case.duplicate_of is None
    assert sources["boxes_0_copy"].duplicate_of == (series / "boxes_0.dcm").resolve()
    assert sources["boxes_0"].duplicate_of == (series / "boxes_0.dcm").resolve()
    assert sources["boxes_1"].duplicate_of == (series / "boxes_1.dcm").resolve()
    accounted = {f for s in sources.values() for f in s.files}
    assert accounted == {p.resolve() for p in tmp_path.rglob("*.dcm")}  # every input file, once


def test_batch_rows_name_every_member_file_and_duplicates_fail_alone(tmp_path):
    from pathchat.utils.atomic import read_jsonl
    from pathchat.wsi.tile_job import tile_slides

    series = tmp_path / "slides" / "case"
    shutil.copytree(SLIDES / "dicom" / "boxes", series)
    shutil.copy(series / "boxes_1.dcm", series / "boxes_1_copy.dcm")
    summary = tile_slides([tmp_path / "slides"], tmp_path / "job", progress=False)
    assert (summary.done, summary.failed, summary.exit_code) == (1, 1, 2)
    failure, = read_jsonl(tmp_path / "job" / "failures.jsonl")
    assert failure["error_type"] == "duplicate_instance" and failure["slide_id"] == "boxes_1_copy"
    assert failure["files"] == [str((series / "boxes_1_copy.dcm").resolve())]
    assert str((series / "boxes_1.dcm").resolve()) in failure["message"]
    done = [r for r in read_jsonl(tmp_path / "job" / "manifest.jsonl") if r["state"] == "done"]
    assert [r["slide_id"] for r in done] == ["case"]
    assert done[0]["files"] == [str((series / n).resolve()) for n in ("boxes_0.dcm", "boxes_1.dcm")]
    named = {f for r in read_jsonl(tmp_path / "job" / "manifest.jsonl") for f in r["files"]}
    assert named == {str(p.resolve()) for p in series.iterdir()}  # every input file is accounted for
