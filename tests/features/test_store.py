"""The feature store: exact round trips, attributes where TRIDENT and PathChat look, atomic writes, clear errors."""

from __future__ import annotations

import json
from typing import Any

import h5py
import numpy as np
import pytest

import pathchat
from pathchat.features.store import (
    FeatureBag,
    FeatureFileError,
    encoder_dir_name,
    encoder_from_dir_name,
    features_path,
    read_attrs,
    read_failed_coords,
    read_features_h5,
    write_features_h5,
)

# Tiling attrs as a PathChat coords file records them (TRIDENT names plus ours).
TILING = {
    "patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40.0, "target_magnification": 20.0,
    "mpp": 0.25, "target_mpp": 0.5, "overlap": 0, "level0_width": 4096, "level0_height": 2048,
    "name": "slide-a", "fingerprint": "f" * 16, "slide_info": '{"vendor": "aperio"}',
}


def _bag(n: int = 12, d: int = 8, seed: int = 0, **kw) -> FeatureBag:
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, d)).astype(np.float32)
    features[0, :3] = [np.float32(1e-30), np.float32(-3.4e38), np.float32(-0.0)]  # extremes survive float32
    coords = np.stack([np.arange(n) % 4 * 512, np.arange(n) // 4 * 512], axis=1).astype(np.int64)
    args: dict[str, Any] = dict(features=features, coords=coords, slide_id="slide-a", encoder="uni_v1", mpp=0.25,
                                patch_size_level0=512, magnification=20.0, source_format="pathchat", attrs={})
    args.update(kw)
    return FeatureBag(**args)


def test_float32_round_trip_is_bit_exact(tmp_path):
    path = tmp_path / "a.h5"
    bag = _bag()
    write_features_h5(path, bag, attrs=TILING)
    back = read_features_h5(path)
    assert back.features.dtype == np.float32
    assert back.features.tobytes() == bag.features.tobytes()
    assert back.coords is not None and back.coords.dtype == np.int64
    np.testing.assert_array_equal(back.coords, bag.coords)
    assert (back.slide_id, back.encoder, back.mpp, back.patch_size_level0, back.magnification, back.source_format) == \
        ("slide-a", "uni_v1", 0.25, 512, 20.0, "pathchat")
    assert (len(back), back.dim) == (12, 8)
    assert bag.coords is not None
    np.testing.assert_array_equal(back.coords_um(), bag.coords * 0.25)


def test_float16_round_trip_within_fp16_rounding(tmp_path):
    path = tmp_path / "half.h5"
    bag = _bag(features=np.linspace(-300, 300, 96, dtype=np.float32).reshape(12, 8))
    write_features_h5(path, bag, dtype=np.float16)
    with h5py.File(path) as f:
        assert f["features"].dtype == np.float16
    back = read_features_h5(path)
    assert back.features.dtype == np.float32
    np.testing.assert_array_equal(back.features, bag.features.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(back.features, bag.features, rtol=2.0**-11, atol=0)
    assert read_features_h5(path, dtype=None).features.dtype == np.float16


def test_float16_overflow_is_an_error(tmp_path):
    path = tmp_path / "big.h5"
    bag = _bag(features=np.full((2, 3), 7e4, np.float32), coords=np.zeros((2, 2), np.int64))
    with pytest.raises(FeatureFileError, match="float16 range") as e:
        write_features_h5(path, bag, dtype=np.float16)
    assert str(path) in str(e.value) and not path.exists()


def test_attrs_round_trip_on_root_features_and_coords(tmp_path):
    path = tmp_path / "a.h5"
    extra = {**TILING, "encoder_fingerprint": "e" * 16, "flag": True, "ids": [3, 1, 2], "tags": ["x", "y"],
             "nested": {"b": 1, "a": [1, 2]}, "ragged": [[1, 2], [3]], "where": tmp_path / "x", "skipped": None}
    write_features_h5(path, _bag(attrs={"from_bag": "kept"}), attrs=extra)
    with h5py.File(path) as f:
        for obj in (f, f["features"], f["coords"]):  # TRIDENT's readers look at coords.attrs
            assert obj.attrs["patch_size"] == 256 and obj.attrs["level0_magnification"] == 40.0
            assert obj.attrs["encoder"] == "uni_v1" and obj.attrs["dim"] == 8
            assert obj.attrs["pathchat_version"] == pathchat.__version__
    back = read_features_h5(path)
    a = back.attrs
    assert a["slide_fingerprint"] == "f" * 16 and a["encoder_fingerprint"] == "e" * 16
    assert (a["flag"], a["ids"], a["tags"], a["nested"]) == (True, [3, 1, 2], ["x", "y"], '{"a": [1, 2], "b": 1}')
    assert a["slide_info"] == '{"vendor": "aperio"}' and a["from_bag"] == "kept" and "skipped" not in a
    assert a["ragged"] == "[[1, 2], [3]]" and a["where"] == str(tmp_path / "x")
    assert a["overlap"] == 0 and a["level0_width"] == 4096 and a["target_mpp"] == 0.5
    assert back.slide_size_um().tolist() == [1024.0, 512.0]  # level-0 size x mpp 0.25
    assert _bag().slide_size_um() is None  # no level0_width / level0_height recorded
    # the typed values are fields, not repeated in attrs
    assert not {"encoder", "dim", "mpp", "patch_size_level0", "target_magnification"} & set(a)
    # and writing the bag back reproduces the same attributes
    write_features_h5(tmp_path / "b.h5", back)
    assert read_features_h5(tmp_path / "b.h5").attrs == a
    # the one-read JSON copy says exactly what the individual attributes say, and is only a shortcut
    with h5py.File(path, "a") as f:
        individual = {k: v for k, v in read_attrs(f).items() if k != "pathchat_attrs"}
        assert json.loads(f.attrs["pathchat_attrs"]) == individual
        del f.attrs["pathchat_attrs"]
    assert read_features_h5(path).attrs == a


def test_unstorable_attrs_fail_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match="attribute 'model': cannot store a object"):
        write_features_h5(tmp_path / "a.h5", _bag(), attrs={"model": object()})
    assert list(tmp_path.iterdir()) == []


def test_failed_coords_are_stored_and_counted(tmp_path):
    path = tmp_path / "a.h5"
    failed = np.array([[1024, 0], [1536, 512]], np.int64)
    write_features_h5(path, _bag(), failed_coords=failed)
    np.testing.assert_array_equal(read_failed_coords(path), failed)
    assert read_features_h5(path).attrs["failed_tiles"] == 2
    write_features_h5(tmp_path / "none.h5", _bag())
    assert read_failed_coords(tmp_path / "none.h5").shape == (0, 2)
    with pytest.raises(ValueError, match="failed_tiles"):
        write_features_h5(tmp_path / "c.h5", _bag(), attrs={"failed_tiles": 5}, failed_coords=failed)


def test_no_coords_and_empty_slides_round_trip(tmp_path):
    write_features_h5(tmp_path / "nocoords.h5", _bag(coords=None))
    assert read_features_h5(tmp_path / "nocoords.h5").coords is None
    empty = _bag(features=np.zeros((0, 8), np.float32), coords=np.zeros((0, 2), np.int64))
    write_features_h5(tmp_path / "empty.h5", empty)
    back = read_features_h5(tmp_path / "empty.h5")
    assert back.features.shape == (0, 8) and back.coords is not None and back.coords.shape == (0, 2)


def test_failure_inside_the_write_leaves_no_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f" / "a.h5"
    calls = []

    def boom(self, name, *a, **kw):
        calls.append(name)
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(OSError, match="disk full"):
        write_features_h5(path, _bag())
    assert calls == ["features"]
    assert list(path.parent.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.h5"
    write_features_h5(path, _bag(seed=1))
    before = path.read_bytes()
    original = h5py.Group.create_dataset

    def fail_on_coords(self, name, *a, **kw):
        if name == "coords":
            raise RuntimeError("killed mid-write")
        return original(self, name, *a, **kw)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_coords)
    with pytest.raises(RuntimeError):
        write_features_h5(path, _bag(seed=2))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.h5"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"features": np.zeros((2, 3, 4), np.float32)}, "features has 3 dims"),
        ({"coords": np.zeros((10, 2), np.int64)}, "coords rows 10 != features rows 12"),
        ({"coords": np.zeros((12, 3), np.int64)}, r"coords has shape \(12, 3\), expected \[n, 2\]"),
        ({"coords": np.full((12, 2), 0.5)}, "coords are not whole level-0 pixels"),
        ({"features": np.where(np.eye(12, 8) > 0, np.nan, 1).astype(np.float32)},
         r"8 non-finite values \(first at row 0, column 0: nan\)"),
        ({"features": np.array([["a"] * 8] * 12)}, "expected floats"),
    ],
)
def test_invalid_bags_name_the_path_and_the_problem(tmp_path, change, problem):
    path = tmp_path / "bad.h5"
    with pytest.raises(FeatureFileError, match=problem) as e:
        write_features_h5(path, _bag(**change))
    assert e.value.path == str(path) and str(e.value).startswith(f"{path}: ")
    assert list(tmp_path.iterdir()) == []


def test_attrs_that_contradict_the_bag_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"attrs\['mpp'\]=0.5 contradicts the bag's mpp=0.25"):
        write_features_h5(tmp_path / "a.h5", _bag(), attrs={**TILING, "mpp": 0.5})
    with pytest.raises(ValueError, match="float32 or float16"):
        write_features_h5(tmp_path / "a.h5", _bag(), dtype=np.float64)
    write_features_h5(tmp_path / "a.h5", _bag(), attrs={**TILING, "patch_size_level0": 512.0})  # equal is fine


def test_reading_foreign_or_broken_files_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureFileError, match="no such file"):
        read_features_h5(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not h5")
    with pytest.raises(FeatureFileError, match="not a readable h5 file"):
        read_features_h5(tmp_path / "text.h5")
    with h5py.File(tmp_path / "trident.h5", "w") as f:
        f["features"] = np.zeros((2, 3), np.float32)
        f["coords"] = np.zeros((2, 2), np.int64)
    with pytest.raises(FeatureFileError, match="not a PathChat features file.*read_feature_file"):
        read_features_h5(tmp_path / "trident.h5")


def test_features_path_layout(tmp_path):
    path = features_path(tmp_path, "20x_256px_0px_overlap", "uni_v1", "TCGA-AB-1234")
    assert path == tmp_path / "20x_256px_0px_overlap" / "features_uni_v1" / "TCGA-AB-1234.h5"
    hf = features_path(tmp_path, "20x_256px_0px_overlap", "hf:owkin/phikon", "s")
    assert hf.parent.name == "features_hf%3Aowkin%2Fphikon" and hf.parent.parent.name == "20x_256px_0px_overlap"
    for bad in ("", "..", "a/b", "a\\b"):
        with pytest.raises(ValueError, match="cannot be a file name"):
            features_path(tmp_path, "f", "uni_v1", bad)


@pytest.mark.parametrize(
    "name", ["uni_v1", "conch_v15", "hf:owkin/phikon", "hf-hub:MahmoodLab/UNI2-h", "a b%20c", ".hidden", "..",
             "ünï/κ:1", "x~y.z-w"])
def test_encoder_names_escape_reversibly(tmp_path, name):
    safe = encoder_dir_name(name)
    assert encoder_from_dir_name(safe) == name
    assert not set(safe) & set('/\\:*?"<>| ') and not safe.startswith(".")
    folder = tmp_path / f"features_{safe}"
    folder.mkdir()  # a real, single path component
    assert folder.parent == tmp_path
    if name in ("uni_v1", "conch_v15", "x~y.z-w"):
        assert safe == name  # plain names keep TRIDENT's folder names
    with pytest.raises(ValueError, match="empty"):
        encoder_dir_name("")
