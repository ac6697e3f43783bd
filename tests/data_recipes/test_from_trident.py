"""from_trident: generated TRIDENT- and CLAM-style job folders, written in each tool's own h5/pt schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data_recipes.from_trident import (
    FromTridentConfig,
    JobFolderError,
    discover_feature_files,
    import_job,
    main,
)
from pathchat.features.store import FeatureBag, read_features_h5, write_features_h5

N, D = 10, 8
TILING = "20x_256px_0px_overlap"


def _features(seed: int, n: int = N) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, D)).astype(np.float32)


def _coords(n: int = N) -> np.ndarray:
    return np.stack([np.arange(n) % 5 * 512, np.arange(n) // 5 * 512], axis=1).astype(np.int64)


def _save_h5(path: Path, assets: dict[str, np.ndarray], attrs: dict[str, dict] | None = None) -> Path:
    """As TRIDENT's `IO.save_h5` / CLAM's `save_hdf5`: resizable one-row chunks, attributes per dataset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, val in assets.items():
            ds = f.create_dataset(key, data=val, maxshape=(None,) + val.shape[1:], chunks=(1,) + val.shape[1:])
            for k, v in ((attrs or {}).get(key) or {}).items():
                ds.attrs[k] = "None" if v is None else v
    return path


def _trident(job: Path, slide: str, seed: int, encoder: str = "uni_v1", tiling: str = TILING) -> Path:
    coords_attrs = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                    "target_magnification": 20, "overlap": 0, "name": slide, "savetodir": str(job / tiling),
                    "level0_width": 4096, "level0_height": 2048}
    path = job / tiling / f"features_{encoder}" / f"{slide}.h5"
    return _save_h5(path, {"features": _features(seed), "coords": _coords()},
                    {"features": {"name": slide, "savetodir": str(path.parent), "encoder": encoder},
                     "coords": coords_attrs})


@pytest.fixture
def trident_job(tmp_path: Path) -> Path:
    job = tmp_path / "trident_job"
    _trident(job, "TCGA-A", 0)
    _trident(job, "TCGA-B", 1)
    (job / TILING / "features_uni_v1" / "TCGA-bad.h5").write_text("not an h5")
    _save_h5(job / TILING / "patches" / "TCGA-A_patches.h5", {"coords": _coords()})  # TRIDENT's coords: not features
    (job / TILING / "slide_features_titan").mkdir()
    return job


def test_trident_job_is_converted_and_a_bad_file_does_not_stop_the_rest(trident_job, tmp_path):
    found = discover_feature_files(trident_job)
    assert found.layout == "trident"
    assert [(s.slide_id, s.encoder, s.tiling) for s in found.sources] == \
        [("TCGA-A", "uni_v1", TILING), ("TCGA-B", "uni_v1", TILING), ("TCGA-bad", "uni_v1", TILING)]
    table = tmp_path / "wsis.csv"
    table.write_text("wsi,mpp\nTCGA-A.svs,0.2527\n")  # TRIDENT's custom_list_of_wsis columns
    out = tmp_path / "features"
    result = import_job(trident_job, out, FromTridentConfig(mpp=0.5, mpp_table=table, progress=False))
    assert (result.found, result.converted, result.linked, result.existing) == (3, 2, 0, 0)
    assert result.by_format == {"trident": 2} and result.encoders == ["uni_v1"]
    assert result.failed == [{"path": str(trident_job / TILING / "features_uni_v1" / "TCGA-bad.h5"),
                              "problem": result.failed[0]["problem"]}]
    assert "not a readable h5 file" in result.failed[0]["problem"]
    assert sorted(p.name for p in out.iterdir()) == ["TCGA-A.h5", "TCGA-B.h5"]
    for slide, seed, mpp in (("TCGA-A", 0, 0.2527), ("TCGA-B", 1, 0.5)):
        bag = read_features_h5(out / f"{slide}.h5")
        np.testing.assert_array_equal(bag.features, _features(seed))
        np.testing.assert_array_equal(bag.coords, _coords())
        assert (bag.encoder, bag.mpp, bag.patch_size_level0, bag.magnification) == ("uni_v1", mpp, 512, 20.0)
        np.testing.assert_allclose(bag.coords_um(), _coords() * mpp)
        assert bag.attrs["imported_from"] == "trident" and bag.attrs["level0_magnification"] == 40

    again = import_job(trident_job, out, FromTridentConfig(progress=False))
    assert (again.converted, again.existing, len(again.failed)) == (0, 2, 1)


def test_several_trident_sets_need_a_choice(trident_job, tmp_path):
    _trident(trident_job, "TCGA-A", 5, encoder="conch_v1")
    _trident(trident_job, "TCGA-A", 6, encoder="uni_v1", tiling="40x_512px_0px_overlap")
    with pytest.raises(JobFolderError, match=r"several TRIDENT feature sets \(20x_256px_0px_overlap/features_conch_v1"):
        discover_feature_files(trident_job)
    with pytest.raises(JobFolderError, match="no TRIDENT feature set matches encoder='virchow'"):
        discover_feature_files(trident_job, encoder="virchow")
    chosen = discover_feature_files(trident_job, encoder="conch_v1")
    assert [(s.slide_id, s.encoder) for s in chosen.sources] == [("TCGA-A", "conch_v1")]
    by_tiling = discover_feature_files(trident_job, encoder="uni_v1", tiling="40x_512px_0px_overlap")
    assert [s.path for s in by_tiling.sources] == [trident_job / "40x_512px_0px_overlap" / "features_uni_v1" / "TCGA-A.h5"]
    # The features folder itself (or its tiling folder) can be given too.
    direct = discover_feature_files(trident_job / TILING / "features_conch_v1")
    assert [(s.encoder, s.tiling) for s in direct.sources] == [("conch_v1", TILING)]


def test_trident_encoder_that_contradicts_its_folder_fails_that_file(tmp_path):
    path = _trident(tmp_path / "job", "s1", 0, encoder="uni_v1")
    wrong = path.parent.with_name("features_conch_v1")
    path.parent.rename(wrong)
    result = import_job(tmp_path / "job", tmp_path / "out", FromTridentConfig(progress=False))
    assert result.converted == 0
    assert result.failed[0]["path"] == str(wrong / "s1.h5")
    assert "file records encoder='uni_v1' but encoder='conch_v1' was passed" in result.failed[0]["problem"]


def test_clam_job_prefers_h5_and_uses_pt_only_when_alone(tmp_path):
    job = tmp_path / "clam"
    for slide, seed in (("s1", 0), ("s2", 1)):
        _save_h5(job / "h5_files" / f"{slide}.h5", {"features": _features(seed), "coords": _coords().astype(np.int32)})
    (job / "pt_files").mkdir()
    torch.save(torch.from_numpy(_features(0)), job / "pt_files" / "s1.pt")
    torch.save(torch.from_numpy(_features(3, 4)), job / "pt_files" / "s3.pt")
    torch.save({"features": torch.zeros(2, 2)}, job / "pt_files" / "s4.pt")
    found = discover_feature_files(job)
    assert found.layout == "clam" and [s.path.name for s in found.sources] == ["s1.h5", "s2.h5", "s3.pt", "s4.pt"]
    assert found.pt_shadowed == [job / "pt_files" / "s1.pt"]

    out = tmp_path / "features"
    result = import_job(job, out, FromTridentConfig(encoder="resnet50_trunc", mpp=0.25, dtype="float16",
                                                    progress=False))
    assert (result.converted, result.by_format) == (3, {"clam": 2, "clam-pt": 1})
    assert result.pt_shadowed == [str(job / "pt_files" / "s1.pt")]
    assert [(Path(f["path"]).name, "expected a bare tensor" in f["problem"]) for f in result.failed] == [("s4.pt", True)]
    s2 = read_features_h5(out / "s2.h5", dtype=None)
    assert s2.features.dtype == np.float16 and (s2.encoder, s2.mpp) == ("resnet50_trunc", 0.25)
    np.testing.assert_array_equal(s2.features, _features(1).astype(np.float16))
    np.testing.assert_array_equal(s2.coords, _coords())
    s3 = read_features_h5(out / "s3.h5")
    assert s3.coords is None and s3.features.shape == (4, D)


def _pathchat_file(path: Path, seed: int) -> Path:
    bag = FeatureBag(_features(seed), _coords(), path.stem, "uni_v1", 0.5, 512, 20.0, "pathchat", {})
    write_features_h5(path, bag)
    return path


@pytest.mark.parametrize("how", ["hardlink", "symlink", "copy"])
def test_pathchat_files_are_brought_over_unchanged(tmp_path, how):
    src = tmp_path / "extract_job" / TILING / "features_uni_v1"
    src.mkdir(parents=True)
    _pathchat_file(src / "p1.h5", 0)
    (src / "p1.h5").chmod(0o444)  # a read-only source must still work
    out = tmp_path / "out"
    result = import_job(tmp_path / "extract_job", out, FromTridentConfig(compatible=how, progress=False))
    assert (result.converted, result.linked, result.copied) == (0, int(how != "copy"), int(how == "copy"))
    assert result.by_format == {"pathchat": 1}
    assert (out / "p1.h5").is_symlink() == (how == "symlink")
    assert os.path.samefile(out / "p1.h5", src / "p1.h5") == (how != "copy")
    assert (out / "p1.h5").read_bytes() == (src / "p1.h5").read_bytes()
    assert [p.name for p in out.iterdir()] == ["p1.h5"]  # no temporaries left


def test_cli_exit_codes(trident_job, tmp_path, capsys):
    out = tmp_path / "o"
    assert main([str(trident_job), "--out", str(out), "--no-progress"]) == 2
    summary = json.loads(capsys.readouterr().out)
    assert (summary["converted"], len(summary["failed"])) == (2, 1)
    (trident_job / TILING / "features_uni_v1" / "TCGA-bad.h5").unlink()
    assert main([str(trident_job), "--out", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["existing"] == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(out)]) == 1
    assert "no feature files found" in capsys.readouterr().err
