"""Importers: files built in each tool's own schema (as its writer produces them) read back exactly."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from pathchat.features.importers import detect_format, import_feature_folder, read_feature_file
from pathchat.features.store import FeatureBag, FeatureFileError, write_features_h5

N, D = 12, 16


def _features(n: int = N, d: int = D, seed: int = 0) -> np.ndarray:
    """Deterministic float32 values that are exact in decimal text too (multiples of 1/1024)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-4096, 4096, size=(n, d)) / 1024).astype(np.float32)


def _coords(n: int = N, step: int = 512) -> np.ndarray:
    return np.stack([np.arange(n) % 4 * step, np.arange(n) // 4 * step], axis=1).astype(np.int64)


def _save_h5(path, assets: dict[str, np.ndarray], attributes: dict[str, dict] | None = None, mode: str = "w"):
    """TRIDENT's `IO.save_h5` / CLAM's `save_hdf5`: chunks of one row, resizable, attrs per dataset."""
    with h5py.File(path, mode) as f:
        for key, val in assets.items():
            if key not in f:
                ds = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                      chunks=(1,) + val.shape[1:], dtype=val.dtype)
                ds[:] = val
                for k, v in ((attributes or {}).get(key) or {}).items():
                    ds.attrs[k] = "None" if v is None else v
            else:
                ds = f[key]
                ds.resize(len(ds) + val.shape[0], axis=0)
                ds[-val.shape[0]:] = val


# Exactly the attrs TRIDENT's `coords_to_h5` writes (a 40x slide tiled at 20x, 256 px).
TRIDENT_COORDS_ATTRS = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                        "target_magnification": 20, "overlap": 0, "name": "TCGA-AA-0001",
                        "savetodir": "/job/20x_256px_0px_overlap", "level0_width": 4096, "level0_height": 2048}


def _trident(path, encoder: str | None = "uni_v1", coords_attrs=None, features=None, coords=None):
    feature_attrs: dict[str, str | None] = {"name": "TCGA-AA-0001",
                                            "savetodir": "/job/20x_256px_0px_overlap/features_uni_v1"}
    if encoder != "absent":
        feature_attrs["encoder"] = encoder  # None is stored as 'None', as TRIDENT does
    _save_h5(path, {"features": _features() if features is None else features,
                    "coords": _coords() if coords is None else coords},
             {"features": feature_attrs, "coords": TRIDENT_COORDS_ATTRS if coords_attrs is None else coords_attrs})
    return path


def _clam_h5(path, coords_attrs=None):
    """CLAM's `extract_features_fp.compute_w_loader`: two batches appended, coords int32, no attrs."""
    feats, coords = _features(), _coords().astype(np.int32)
    _save_h5(path, {"features": feats[:8], "coords": coords[:8]}, None, mode="w")
    _save_h5(path, {"features": feats[8:], "coords": coords[8:]}, None, mode="a")
    if coords_attrs:
        with h5py.File(path, "a") as f:
            f["coords"].attrs.update(coords_attrs)
    return path


def _slidechat_csv(path, n: int = N, d: int = 512, seed: int = 3, names: bool = True):
    """SlideChat's layout: header `0..511,patch_name`, no index column, tile names `<col>_<row>.jpeg`."""
    df = pd.DataFrame(_features(n, d, seed), columns=[str(i) for i in range(d)])
    if names:
        df["patch_name"] = [f"{100 + i}_{53 + i // 4}.jpeg" for i in range(n)]
    df.to_csv(path, index=False)
    return path


def test_trident_h5(tmp_path):
    bag = read_feature_file(_trident(tmp_path / "TCGA-AA-0001.h5"), mpp=0.25)
    assert bag.source_format == "trident" and bag.slide_id == "TCGA-AA-0001"
    np.testing.assert_array_equal(bag.features, _features())
    assert bag.features.dtype == np.float32 and bag.coords is not None and bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.coords, _coords())
    assert (bag.encoder, bag.patch_size_level0, bag.magnification, bag.mpp) == ("uni_v1", 512, 20.0, 0.25)
    np.testing.assert_array_equal(bag.coords_um(), _coords() * 0.25)
    assert bag.attrs["level0_magnification"] == 40 and bag.attrs["savetodir"].endswith("features_uni_v1")
    assert read_feature_file(tmp_path / "TCGA-AA-0001.h5").mpp is None  # TRIDENT does not record mpp


@pytest.mark.parametrize(("stored", "given", "expected"),
                         [("absent", None, None), (None, None, None), ("absent", "conch_v1", "conch_v1")])
def test_trident_encoder_missing_or_none_is_filled_by_the_caller(tmp_path, stored, given, expected):
    path = _trident(tmp_path / "s.h5", encoder=stored)
    assert detect_format(path) == "trident"
    assert read_feature_file(path, encoder=given).encoder == expected


def test_trident_with_legacy_clam_coords_and_a_batch_dim(tmp_path):
    path = _trident(tmp_path / "s.h5", coords_attrs={"patch_size": 256, "patch_level": 0},
                    features=_features()[None], coords=_coords()[None])
    bag = read_feature_file(path)
    assert bag.source_format == "trident" and bag.features.shape == (N, D)
    assert bag.coords is not None and bag.coords.shape == (N, 2)
    assert bag.patch_size_level0 is None and bag.magnification is None  # not recorded: not guessed
    assert bag.attrs["features_batch_dim_removed"] and bag.attrs["coords_batch_dim_removed"]


def test_trident_slide_embedding_is_rejected(tmp_path):
    path = tmp_path / "slide.h5"
    _save_h5(path, {"features": np.ones(768, np.float32)}, {"features": {"name": "s", "savetodir": "/x"}})
    with pytest.raises(FeatureFileError, match=r"features has 1 dims \(768,\): a slide-level embedding"):
        read_feature_file(path)


def test_clam_h5_without_attrs(tmp_path):
    path = _clam_h5(tmp_path / "slide-b.h5")
    assert detect_format(path) == "clam"
    bag = read_feature_file(path)
    assert bag.source_format == "clam" and bag.slide_id == "slide-b"
    np.testing.assert_array_equal(bag.features, _features())
    assert bag.coords is not None and bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.coords, _coords())
    assert (bag.encoder, bag.mpp, bag.patch_size_level0, bag.magnification) == (None, None, None, None)
    assert bag.coords_um() is None


def test_clam_h5_with_patch_attrs_derives_level0_patch_size(tmp_path):
    # CLAM's process_contours attrs: 256 px read at level 1 of a slide downsampled 4x there.
    attrs = {"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0]),
             "downsampled_level_dim": np.array([1024, 512]), "level_dim": np.array([1024, 512]),
             "name": "slide-b", "save_path": "/clam/patches"}
    bag = read_feature_file(_clam_h5(tmp_path / "slide-b.h5", attrs), mpp=0.25, encoder="resnet50_trunc")
    assert bag.source_format == "clam" and bag.patch_size_level0 == 1024
    assert bag.magnification is None and (bag.mpp, bag.encoder) == (0.25, "resnet50_trunc")
    assert bag.attrs["patch_level"] == 1 and bag.attrs["downsample"] == [4.0, 4.0]


def test_clam_pt_bare_tensor_and_trident_numpy_pt(tmp_path):
    torch.save(torch.from_numpy(_features()), tmp_path / "a.pt")
    bag = read_feature_file(tmp_path / "a.pt")
    assert (bag.source_format, bag.coords, bag.slide_id) == ("clam-pt", None, "a")
    np.testing.assert_array_equal(bag.features, _features())
    torch.save(torch.from_numpy(_features()).to(torch.bfloat16), tmp_path / "bf16.pt")
    assert read_feature_file(tmp_path / "bf16.pt").features.dtype == np.float32
    torch.save(_features(), tmp_path / "np.pt")  # TRIDENT's saveas='pt' saves the numpy array itself
    np.testing.assert_array_equal(read_feature_file(tmp_path / "np.pt").features, _features())
    torch.save(_features().astype(np.float16), tmp_path / "np16.pt")
    np16 = read_feature_file(tmp_path / "np16.pt").features
    assert np16.dtype == np.float32
    np.testing.assert_array_equal(np16, _features().astype(np.float16).astype(np.float32))


class _NotFeatures:
    pass


def test_malformed_pt_files(tmp_path):
    torch.save({"features": torch.zeros(2, 3)}, tmp_path / "dict.pt")
    with pytest.raises(FeatureFileError, match=r"expected a bare tensor \[n, d\], found a dict with keys \['features'\]"):
        read_feature_file(tmp_path / "dict.pt")
    torch.save(_NotFeatures(), tmp_path / "obj.pt")
    with pytest.raises(FeatureFileError, match="safe loading refuses.*_NotFeatures"):
        read_feature_file(tmp_path / "obj.pt")
    torch.save(torch.zeros(2, 3, 4), tmp_path / "3d.pt")
    with pytest.raises(FeatureFileError, match="features has 3 dims"):
        read_feature_file(tmp_path / "3d.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(FeatureFileError, match="not a readable torch.save file"):
        read_feature_file(tmp_path / "junk.pt")


def test_slidechat_csv_mirrors_slidechats_loader(tmp_path):
    path = _slidechat_csv(tmp_path / "TCGA-A7-A0CJ-01Z-00-DX2.csv")
    bag = read_feature_file(path)
    # SlideChat's xtuner/dataset/llava.py: pd.read_csv(image_file).iloc[:, :512].to_numpy()
    slidechat = pd.read_csv(path).iloc[:, :512].to_numpy()
    np.testing.assert_array_equal(bag.features, slidechat.astype(np.float32))
    np.testing.assert_array_equal(bag.features, _features(N, 512, 3))
    assert (bag.source_format, bag.slide_id, bag.dim, bag.coords, bag.encoder, bag.mpp) == \
        ("slidechat-csv", "TCGA-A7-A0CJ-01Z-00-DX2", 512, None, None, None)
    np.testing.assert_array_equal(bag.tile_grid, [[100 + i, 53 + i // 4] for i in range(N)])
    assert bag.attrs == {"csv_header": True, "patch_name_column": True}


def test_slidechat_csv_variants(tmp_path):
    no_names = read_feature_file(_slidechat_csv(tmp_path / "a.csv", names=False))
    assert no_names.tile_grid is None and no_names.attrs["patch_name_column"] is False
    headerless = tmp_path / "b.csv"
    pd.DataFrame(_features(N, 512, 3)).assign(p=[f"{i}_0.jpeg" for i in range(N)]).to_csv(
        headerless, index=False, header=False)
    bag = read_feature_file(headerless)  # the first tile is kept, not eaten as a header
    np.testing.assert_array_equal(bag.features, _features(N, 512, 3))
    assert bag.attrs["csv_header"] is False and bag.tile_grid is not None
    assert bag.tile_grid[:, 0].tolist() == list(range(N))
    (tmp_path / "empty.csv").write_text(",".join(map(str, range(512))) + ",patch_name\n")
    assert read_feature_file(tmp_path / "empty.csv").features.shape == (0, 512)


def test_malformed_csv_files(tmp_path):
    path = tmp_path / "bad.csv"
    df = pd.DataFrame(_features(4, 8), columns=[str(i) for i in range(8)])
    df.astype(object).assign(**{"7": ["1.0", "x", "2.0", "3.0"]}).to_csv(path, index=False)
    with pytest.raises(FeatureFileError, match=r"CSV has non-numeric column 7 \(row 1: 'x'\)") as e:
        read_feature_file(path)
    assert str(e.value).startswith(str(path))
    df.to_csv(path)  # pandas' default writes an index column SlideChat would read as feature 0
    with pytest.raises(FeatureFileError, match="CSV column 0 is named 'Unnamed: 0'; expected SlideChat's header"):
        read_feature_file(path)
    df.assign(**{"3": np.nan}).to_csv(path, index=False)
    with pytest.raises(FeatureFileError, match=r"4 missing or non-finite values \(first at row 0, column 3\)"):
        read_feature_file(path)
    df.assign(patch_name="0_0.jpeg", extra=1.0).to_csv(path, index=False)
    with pytest.raises(FeatureFileError, match="'patch_name' is not the last column"):
        read_feature_file(path)
    path.write_text("")
    with pytest.raises(FeatureFileError, match="CSV is empty"):
        read_feature_file(path)


def test_malformed_h5_files(tmp_path):
    coords_only = tmp_path / "patches.h5"
    _save_h5(coords_only, {"coords": _coords()}, {"coords": TRIDENT_COORDS_ATTRS})
    with pytest.raises(FeatureFileError, match=r"no 'features' dataset \(a coords/patches file, not features\)"):
        read_feature_file(coords_only)
    _save_h5(tmp_path / "rows.h5", {"features": _features(12), "coords": _coords(10)})
    with pytest.raises(FeatureFileError, match="coords rows 10 != features rows 12"):
        read_feature_file(tmp_path / "rows.h5")
    _save_h5(tmp_path / "dims.h5", {"features": np.zeros((2, 3, 4), np.float32), "coords": _coords(2)})
    with pytest.raises(FeatureFileError, match="features has 3 dims"):
        read_feature_file(tmp_path / "dims.h5")
    _save_h5(tmp_path / "nan.h5", {"features": np.full((2, 3), np.nan, np.float32), "coords": _coords(2)})
    with pytest.raises(FeatureFileError, match="non-finite"):
        read_feature_file(tmp_path / "nan.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(FeatureFileError, match="not a readable h5 file"):
        read_feature_file(tmp_path / "text.h5")
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(FeatureFileError, match="unknown feature file type '.npy'"):
        read_feature_file(tmp_path / "x.npy")
    with pytest.raises(FeatureFileError, match="no such file"):
        read_feature_file(tmp_path / "missing.h5")
    with pytest.raises(ValueError, match="format must be one of"):
        read_feature_file(coords_only, format="npz")


def _pathchat(path, **kw):
    bag = FeatureBag(_features(), _coords(), "slide-p", "conch_v1", 0.5, 512, 20.0, "pathchat", {})
    write_features_h5(path, bag, **kw)
    return path


def test_auto_detection_picks_each_format(tmp_path):
    files = {
        "pathchat": _pathchat(tmp_path / "p.h5"),
        "trident": _trident(tmp_path / "t.h5"),
        "clam": _clam_h5(tmp_path / "c.h5"),
        "clam-pt": tmp_path / "c.pt",
        "slidechat-csv": _slidechat_csv(tmp_path / "s.csv", d=16),
    }
    torch.save(torch.from_numpy(_features()), files["clam-pt"])
    for fmt, path in files.items():
        assert detect_format(path) == fmt
        bag = read_feature_file(path)
        assert bag.source_format == fmt and bag.features.dtype == np.float32
        np.testing.assert_array_equal(bag.features, _features() if fmt != "slidechat-csv" else _features(N, 16, 3))


def test_caller_values_that_contradict_the_file_are_errors(tmp_path):
    with pytest.raises(FeatureFileError, match=r"file records mpp=0.5 but mpp=0.25 was passed"):
        read_feature_file(_pathchat(tmp_path / "p.h5"), mpp=0.25)
    with pytest.raises(FeatureFileError, match=r"file records encoder='uni_v1' but encoder='conch_v1' was passed"):
        read_feature_file(_trident(tmp_path / "t.h5"), encoder="conch_v1")
    assert read_feature_file(tmp_path / "p.h5", mpp=0.5, encoder="conch_v1").mpp == 0.5


def test_a_converted_import_round_trips_through_the_store(tmp_path):
    bag = read_feature_file(_trident(tmp_path / "TCGA-AA-0001.h5"), mpp=0.25)
    write_features_h5(tmp_path / "out.h5", bag)
    back = read_feature_file(tmp_path / "out.h5")
    assert back.source_format == "pathchat" and back.attrs["imported_from"] == "trident"
    np.testing.assert_array_equal(back.features, bag.features)
    assert (back.encoder, back.mpp, back.patch_size_level0, back.magnification) == ("uni_v1", 0.25, 512, 20.0)


def test_import_feature_folder(tmp_path):
    _trident(tmp_path / "b.h5")
    _clam_h5(tmp_path / "a.h5")
    torch.save(torch.from_numpy(_features()), tmp_path / "c.pt")
    _slidechat_csv(tmp_path / "d.csv", d=16)
    (tmp_path / ".b.h5.tmp-123-abcd").write_bytes(b"partial")  # an atomic-write temporary
    (tmp_path / "notes.txt").write_text("ignored")
    bags = list(import_feature_folder(tmp_path, mpp=0.5))
    assert [(b.slide_id, b.source_format) for b in bags] == \
        [("a", "clam"), ("b", "trident"), ("c", "clam-pt"), ("d", "slidechat-csv")]
    assert all(b.mpp == 0.5 for b in bags)
    assert [b.slide_id for b in import_feature_folder(tmp_path, format="clam-pt")] == ["c"]

    (tmp_path / "e.h5").write_text("broken")
    with pytest.raises(FeatureFileError, match="e.h5: not a readable h5 file"):
        list(import_feature_folder(tmp_path))
    errors: list[FeatureFileError] = []
    assert len(list(import_feature_folder(tmp_path, errors=errors))) == 4
    assert [e.path for e in errors] == [str(tmp_path / "e.h5")]
    with pytest.raises(FeatureFileError, match="no such folder"):
        list(import_feature_folder(tmp_path / "nope"))
