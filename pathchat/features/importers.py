"""Read other tools' feature files into a FeatureBag, so existing features train without re-extraction.

Schemas, as their writers produce them:
  - TRIDENT h5 (`WSI.extract_patch_features` → `IO.save_h5`): `features` float32 `[n, d]`, `coords`
    int64 `[n, 2]` level-0; the coords file's attrs on `coords` (`patch_size`, `patch_size_level0`,
    `level0_magnification`, `target_magnification`, `overlap`, `name`, `savetodir`, `level0_width`,
    `level0_height`) and `name`, `savetodir` (and, in recent versions, `encoder`) on `features`; None is
    stored as the string 'None'.
  - CLAM h5 (`extract_features_fp.py` → `save_hdf5(..., attr_dict=None)`): `features` float32
    `[n, d]` and `coords` int32 `[n, 2]` level-0, with no attributes at all; the tiling attrs
    (`patch_size`, `patch_level`, `downsample`, ...) live only in CLAM's patches h5.
  - CLAM `.pt` (`pt_files/<slide>.pt`): a bare tensor `[n, d]` from `torch.save`; no coords.
  - SlideChat CSV (`<TCGA barcode>.csv`): header row `0,1,...,511,patch_name`, one row per tile,
    512 CONCH features then the tile's image name `<col>_<row>.jpeg`; SlideChat's loader does
    `pd.read_csv(f).iloc[:, :512]`. No pixel coordinates.
Nothing is guessed: mpp, magnification and encoder are set only when the file records them or the
caller passes them, and a caller value that contradicts the file is an error.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pathchat.features.store import (
    ATTRS_JSON,
    FeatureBag,
    FeatureFileError,
    _check_coords,
    _check_features,
    _check_finite,
    _opt_float,
    _opt_int,
    _opt_str,
    read_attrs,
    read_dataset,
    read_features_h5,
)

FORMATS = ("auto", "pathchat", "trident", "clam", "clam-pt", "slidechat-csv")
H5_SUFFIXES = (".h5", ".hdf5", ".he5")
PT_SUFFIXES = (".pt", ".pth")
CSV_SUFFIXES = (".csv",)
_SUFFIXES = {"pathchat": H5_SUFFIXES, "trident": H5_SUFFIXES, "clam": H5_SUFFIXES,
             "clam-pt": PT_SUFFIXES, "slidechat-csv": CSV_SUFFIXES}
# Attributes only TRIDENT puts on `coords` (CLAM's patches h5 has patch_level/downsample instead).
_TRIDENT_COORDS_KEYS = ("patch_size_level0", "level0_magnification", "target_magnification")
_TYPED_KEYS = ("encoder", "mpp", "patch_size_level0", "target_magnification")
_PATCH_NAME_RE = r"(?:^|[/\\])(\d+)_(\d+)\.[A-Za-z0-9]+$"


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of a feature file.

    Rule: `.pt`/`.pth` → "clam-pt"; `.csv` → "slidechat-csv"; for h5 files, a root `pathchat_version`
    attribute → "pathchat"; else `savetodir` or `encoder` on `features`, or TRIDENT's tiling attrs
    (`patch_size_level0`, `level0_magnification`, `target_magnification`) on `coords` → "trident";
    else "clam" (CLAM's feature h5 carries no attributes).

    Raises:
        FeatureFileError: unknown extension, or an h5 that cannot be opened.
    """
    suffix = Path(path).suffix.lower()
    if suffix in PT_SUFFIXES:
        return "clam-pt"
    if suffix in CSV_SUFFIXES:
        return "slidechat-csv"
    if suffix not in H5_SUFFIXES:
        raise FeatureFileError(path, f"unknown feature file type {suffix!r} "
                                     f"(expected {', '.join(H5_SUFFIXES + PT_SUFFIXES + CSV_SUFFIXES)})")
    with _open_h5(path) as f:
        if "pathchat_version" in f.attrs:
            return "pathchat"
        feature_attrs = f["features"].attrs if isinstance(f.get("features"), h5py.Dataset) else {}
        coords_attrs = f["coords"].attrs if isinstance(f.get("coords"), h5py.Dataset) else {}
        if "savetodir" in feature_attrs or "encoder" in feature_attrs:
            return "trident"
        if any(k in coords_attrs for k in _TRIDENT_COORDS_KEYS):
            return "trident"
    return "clam"


def read_feature_file(path: str | os.PathLike[str], format: str = "auto", mpp: float | None = None,
                      encoder: str | None = None) -> FeatureBag:
    """Read a PathChat, TRIDENT or CLAM h5, a CLAM `.pt` or a SlideChat CSV into a FeatureBag.

    Args:
        format: one of FORMATS; "auto" follows `detect_format`'s rule.
        mpp: level-0 µm per pixel, used when the file does not record it.
        encoder: encoder name, used when the file does not record it.
    Returns:
        features float32 `[n, d]`, coords int64 `[n, 2]` or None; `slide_id` is the file stem
        (PathChat files: the recorded slide id).
    Raises:
        FeatureFileError: the file is missing or malformed, or contradicts `mpp`/`encoder`; the message
            says what was expected and what was found.
        ValueError: unknown `format`.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not Path(path).is_file():
        raise FeatureFileError(path, "no such file")
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "pathchat":
        bag = read_features_h5(path)
    elif fmt in ("trident", "clam"):
        bag = _read_tool_h5(path, fmt)
    elif fmt == "clam-pt":
        bag = _read_pt(path)
    else:
        bag = _read_slidechat_csv(path)
    _check_finite(path, bag.features)
    bag.mpp = _fill(path, "mpp", bag.mpp, mpp)
    bag.encoder = _fill(path, "encoder", bag.encoder, encoder)
    return bag


def import_feature_folder(folder: str | os.PathLike[str], format: str = "auto",
                          errors: list[FeatureFileError] | None = None, **kw: Any) -> Iterator[FeatureBag]:
    """Every feature file in `folder` (sorted by name, not recursive), `slide_id` from the file stem.

    Hidden files (atomic-write temporaries) are skipped; with a fixed `format`, only files of its
    extension are read.

    Args:
        errors: when given, unreadable files are appended here and the iteration goes on (a batch job
            records the failure and continues); when None the first failure is raised.
        **kw: `mpp`, `encoder` for `read_feature_file`.
    Raises:
        FeatureFileError: the folder does not exist, or a file fails and `errors` is None.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FeatureFileError(root, "no such folder")
    suffixes = _SUFFIXES.get(format, H5_SUFFIXES + PT_SUFFIXES + CSV_SUFFIXES)
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        try:
            bag = read_feature_file(path, format, **kw)
        except FeatureFileError as e:
            if errors is None:
                raise
            errors.append(e)
            continue
        if bag.slide_id != path.stem:
            bag.attrs["recorded_slide_id"] = bag.slide_id
            bag.slide_id = path.stem
        yield bag


# ------------------------------------------------------------------------------------------ internals


def _open_h5(path: str | os.PathLike[str]) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError as e:
        raise FeatureFileError(path, "no such file") from e
    except OSError as e:
        raise FeatureFileError(path, f"not a readable h5 file ({e})") from e


def _fill(path: str | os.PathLike[str], key: str, recorded: Any, given: Any) -> Any:
    """The file's value, else the caller's; both present and different is an error."""
    if given is None:
        return recorded
    if recorded is None:
        return float(given) if key == "mpp" else given
    same = (math.isclose(float(recorded), float(given), rel_tol=1e-6) if key == "mpp" else recorded == given)
    if not same:
        raise FeatureFileError(path, f"file records {key}={recorded!r} but {key}={given!r} was passed")
    return recorded


def _squeeze_batch(path: str | os.PathLike[str], arr: np.ndarray, name: str, attrs: dict[str, Any]) -> np.ndarray:
    """Drop a leading batch axis of size 1 (`[1, n, k]` → `[n, k]`), as some writers add one."""
    if arr.ndim == 3 and arr.shape[0] == 1:
        attrs[f"{name}_batch_dim_removed"] = True
        return arr[0]
    return arr


def _read_tool_h5(path: str | os.PathLike[str], fmt: str) -> FeatureBag:
    """TRIDENT or CLAM h5: `features` `[n, d]`, `coords` `[n, 2]`, attributes wherever they are."""
    with _open_h5(path) as f:
        if not isinstance(f.get("features"), h5py.Dataset):
            hint = " (a coords/patches file, not features)" if "coords" in f else ""
            raise FeatureFileError(path, f"no 'features' dataset{hint}; found {sorted(f.keys())}")
        features = read_dataset(path, f["features"])
        has_coords = isinstance(f.get("coords"), h5py.Dataset)
        coords = read_dataset(path, f["coords"]) if has_coords else None
        merged = {**read_attrs(f), **(read_attrs(f["coords"]) if has_coords else {}), **read_attrs(f["features"])}
    notes: dict[str, Any] = {}
    features = _squeeze_batch(path, features, "features", notes)
    if features.ndim == 1 and features.size == 0:  # TRIDENT's empty slide when the encoder dim is unknown
        features = features.reshape(0, 0)
    if features.ndim == 1:
        raise FeatureFileError(path, f"features has 1 dims {features.shape}: a slide-level embedding "
                                     "(e.g. TRIDENT slide_features_*), not tile features [n, d]")
    _check_features(path, features)
    if coords is not None:
        coords = _check_coords(path, _squeeze_batch(path, coords, "coords", notes), features.shape[0])
    return FeatureBag(
        features=features.astype(np.float32, copy=False),
        coords=coords,
        slide_id=Path(path).stem,
        encoder=_opt_str(merged.get("encoder")),
        mpp=_opt_float(merged.get("mpp")),
        patch_size_level0=_patch_size_level0(merged),
        magnification=_opt_float(merged.get("target_magnification")),
        source_format=fmt,
        attrs={**{k: v for k, v in merged.items() if k not in _TYPED_KEYS and k != ATTRS_JSON}, **notes},
    )


def _patch_size_level0(attrs: dict[str, Any]) -> int | None:
    """Recorded level-0 tile side, else CLAM's `patch_size` × `downsample` (x) when both are recorded."""
    recorded = _opt_int(attrs.get("patch_size_level0"))
    if recorded is not None:
        return recorded
    size, down = attrs.get("patch_size"), attrs.get("downsample")
    if isinstance(down, list) and down:
        down = down[0]  # CLAM stores (x, y) level downsamples
    if isinstance(size, (int, float)) and isinstance(down, (int, float)) and size > 0 and down > 0:
        return round(float(size) * float(down))
    return None


def _numpy_safe_globals() -> list[Any]:
    """What `torch.load(weights_only=True)` needs to rebuild a plain numpy array (TRIDENT's `.pt`)."""
    reconstruct = np.ndarray((0,)).__reduce__()[0]
    dtype_classes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64)]
    return [reconstruct, np.ndarray, np.dtype, *dtype_classes]


def _read_pt(path: str | os.PathLike[str]) -> FeatureBag:
    """A bare tensor (CLAM `pt_files`) or numpy array (TRIDENT `saveas='pt'`) `[n, d]`, never unpickling code."""
    import torch  # only this format needs torch

    def load() -> Any:
        return torch.load(path, map_location="cpu", weights_only=True)

    try:
        try:
            obj = load()
        except pickle.UnpicklingError:
            needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            allowed = {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                       "numpy._core.multiarray._reconstruct"}
            if not needed or not all(g in allowed or g.startswith("numpy.dtypes.") for g in needed):
                raise FeatureFileError(path, f"holds objects that safe loading refuses ({sorted(needed)}); "
                                             "expected a bare tensor [n, d] saved with torch.save") from None
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = load()
    except FeatureFileError:
        raise
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for non-torch files
        raise FeatureFileError(path, f"not a readable torch.save file ({type(e).__name__}: {e})") from e
    if isinstance(obj, torch.Tensor):
        features = obj.detach().to(torch.float32).numpy()
    elif isinstance(obj, np.ndarray):
        features = obj
    else:
        found = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise FeatureFileError(path, f"expected a bare tensor [n, d], found {found}")
    notes: dict[str, Any] = {}
    features = _squeeze_batch(path, features, "features", notes)
    _check_features(path, features)
    return FeatureBag(features=features.astype(np.float32, copy=False), coords=None, slide_id=Path(path).stem,
                      encoder=None, mpp=None, patch_size_level0=None, magnification=None,
                      source_format="clam-pt", attrs=notes)


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _read_slidechat_csv(path: str | os.PathLike[str]) -> FeatureBag:
    """SlideChat's per-slide CSV: header `0..d-1[,patch_name]`, one row per tile (d = 512 for CONCH).

    Read as SlideChat does (`pd.read_csv`, header row, no index column, the numbered columns are the
    features). A file with no header row (every field of line 1 numeric) is read with `header=None`
    instead of losing its first tile, and recorded as `attrs["csv_header"] = False`.
    """
    import pandas as pd  # only this format needs pandas

    with open(path, encoding="utf-8", errors="replace") as fh:
        first = fh.readline().rstrip("\r\n").split(",")
    if first == [""]:
        raise FeatureFileError(path, "CSV is empty")
    body = first[:-1] if first and not _is_number(first[-1]) else first
    header = not (body and all(_is_number(t) for t in body) and not all(t.isdigit() for t in body))
    try:
        df = pd.read_csv(path, header=0 if header else None)
    except (ValueError, pd.errors.ParserError) as e:
        raise FeatureFileError(path, f"CSV does not parse ({e})") from e
    df.columns = names = [str(c) for c in df.columns]
    patch_col: str | None = None
    if header:
        if "patch_name" in names:
            if names[-1] != "patch_name":
                raise FeatureFileError(path, "CSV column 'patch_name' is not the last column")
            patch_col = "patch_name"
        feature_cols = [n for n in names if n != patch_col]
        for i, name in enumerate(feature_cols):
            if name != str(i):
                raise FeatureFileError(path, f"CSV column {i} is named {name!r}; expected SlideChat's header "
                                             f"0..{len(feature_cols) - 1} then an optional patch_name")
    else:
        if len(names) > 1 and df[names[-1]].dtype.kind not in "fiu":
            patch_col = names[-1]
        feature_cols = [n for n in names if n != patch_col]
    if not feature_cols:
        raise FeatureFileError(path, "CSV has no feature columns")
    if len(df):
        for col in feature_cols:
            if df[col].dtype.kind not in "fiu":
                column = df[col]
                bad = column[pd.to_numeric(column, errors="coerce").isna() & column.notna()]
                example = f" (row {bad.index[0]}: {bad.iloc[0]!r})" if len(bad) else ""
                raise FeatureFileError(path, f"CSV has non-numeric column {col}{example}")
        features = df[feature_cols].to_numpy(dtype=np.float32)
    else:
        features = np.zeros((0, len(feature_cols)), np.float32)
    bad = ~np.isfinite(features)
    if bad.any():
        row, col_i = (int(i) for i in np.argwhere(bad)[0])
        raise FeatureFileError(path, f"CSV has {int(bad.sum())} missing or non-finite values "
                                     f"(first at row {row}, column {feature_cols[col_i]})")
    attrs: dict[str, Any] = {"csv_header": header, "patch_name_column": patch_col is not None}
    tile_grid = None
    if patch_col is not None:
        parts = df[patch_col].astype(str).str.extract(_PATCH_NAME_RE)
        if len(parts) and not parts.isna().any().any():
            tile_grid = parts.to_numpy(dtype=np.int64)
        elif len(parts):
            attrs["patch_names_parsed"] = False
    return FeatureBag(features=features, coords=None, slide_id=Path(path).stem, encoder=None, mpp=None,
                      patch_size_level0=None, magnification=None, source_format="slidechat-csv", attrs=attrs,
                      tile_grid=tile_grid)
