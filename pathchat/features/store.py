"""The feature store: one h5 per slide and encoder, in TRIDENT's layout, read back in one contiguous read.

`JOB/<mag>x_<tile>px_<overlap>px_overlap/features_<encoder>/<slide>.h5` holds `features` `[n, d]`
(float32, or float16 to halve the cache) and `coords` int64 `[n, 2]` (level-0 x, y of each tile's
top-left corner). Attributes sit on the file root and are copied onto `features` and `coords`, so
TRIDENT's readers (which look at `coords.attrs`) and ours (which look at the root) both find them.
Datasets are contiguous and uncompressed: training reads whole slides, and one `read_direct` of a
contiguous block is the fastest read h5 offers. The root also holds `pathchat_attrs`, a JSON copy
of every attribute, because h5py spends ~40 µs per attribute and a slide has ~25 of them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import h5py
import numpy as np

import pathchat
from pathchat.utils.atomic import atomic_path

SOURCE_FORMATS = ("pathchat", "trident", "clam", "clam-pt", "slidechat-csv")
ATTRS_JSON = "pathchat_attrs"  # root attribute: JSON copy of all attributes, read in one go
FLOAT16_MAX = float(np.finfo(np.float16).max)

# Attributes that become typed FeatureBag fields (so they are not repeated in `FeatureBag.attrs`).
_TYPED_KEYS = ("encoder", "dim", "mpp", "patch_size_level0", "target_magnification", "slide_id", "name",
               "n_tiles", "pathchat_version")


class FeatureFileError(Exception):
    """A feature file is missing, malformed or inconsistent. Names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class FeatureBag:
    """Features of one slide, whatever tool wrote them.

    Shapes: `features` `[n, d]`, `coords` `[n, 2]` (level-0 pixels, row i locates feature row i).
    """

    features: np.ndarray  # float32 [n, d] (float16 only when a reader was asked to keep it)
    coords: np.ndarray | None  # int64 [n, 2], level-0 (x, y) top-left; None when the source has none
    slide_id: str
    encoder: str | None
    mpp: float | None  # level-0 µm per pixel (coords * mpp = µm) when known
    patch_size_level0: int | None  # tile side in level-0 pixels when known
    magnification: float | None  # tile (target) magnification when known
    source_format: str  # one of SOURCE_FORMATS
    attrs: dict[str, Any] = field(default_factory=dict)  # everything else the file recorded, JSON-safe
    # int64 [n, 2] (column, row) indices on the source tool's tile grid, when it names tiles that way
    # (SlideChat's `patch_name` "<col>_<row>.jpeg"); grid units, not pixels, so never mixed with coords.
    tile_grid: np.ndarray | None = None

    @property
    def dim(self) -> int:
        """Feature width `d`."""
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def coords_um(self) -> np.ndarray | None:
        """Tile positions in µm, float64 `[n, 2]` (coords × mpp); None when coords or mpp is unknown."""
        if self.coords is None or self.mpp is None:
            return None
        return self.coords.astype(np.float64) * float(self.mpp)

    def slide_size_um(self) -> np.ndarray | None:
        """(width, height) of the scanned slide in µm, float64 `[2]`, from the tiler's `level0_width` /
        `level0_height` attributes × mpp (pathchat and TRIDENT files record them); None when unknown."""
        width, height = self.attrs.get("level0_width"), self.attrs.get("level0_height")
        if width is None or height is None or self.mpp is None:
            return None
        return np.array([float(width), float(height)], np.float64) * float(self.mpp)


# ----------------------------------------------------------------------------------------------- paths


def encoder_dir_name(encoder: str) -> str:
    """File-system-safe form of an encoder name, reversible with `encoder_from_dir_name`.

    Percent-encoding (RFC 3986, as in URLs): letters, digits and `_ . - ~` stay as they are, every
    other byte of the UTF-8 name becomes `%XX`, and a leading `.` becomes `%2E` so no name makes a
    hidden folder. So `uni_v1` stays `uni_v1` (TRIDENT's folder name) and `hf:owkin/phikon` becomes
    `hf%3Aowkin%2Fphikon`.

    Raises:
        ValueError: the name is empty.
    """
    if not encoder:
        raise ValueError("encoder name is empty")
    safe = quote(encoder, safe="")
    return "%2E" + safe[1:] if safe.startswith(".") else safe


def encoder_from_dir_name(name: str) -> str:
    """Inverse of `encoder_dir_name`."""
    return unquote(name)


def features_path(job_dir: str | os.PathLike[str], folder_name: str, encoder: str, slide_id: str) -> Path:
    """`job_dir/<folder_name>/features_<encoder>/<slide_id>.h5`, with the encoder name escaped.

    Args:
        folder_name: the tiling folder, e.g. `20x_256px_0px_overlap` (`TilingParams.folder_name`).
    Raises:
        ValueError: `slide_id` is empty or holds a path separator.
    """
    if not slide_id or slide_id in (".", "..") or any(c in slide_id for c in ("/", "\\", "\0")):
        raise ValueError(f"slide id {slide_id!r} cannot be a file name")
    return Path(job_dir) / folder_name / f"features_{encoder_dir_name(encoder)}" / f"{slide_id}.h5"


# ----------------------------------------------------------------------------------------- attributes


def json_safe(value: Any) -> Any:
    """An h5 attribute value as plain Python (numpy scalars and arrays, bytes, h5py.Empty)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    if isinstance(value, h5py.Empty):
        return None
    return value


def read_attrs(obj: h5py.File | h5py.Dataset | h5py.Group) -> dict[str, Any]:
    """All attributes of an h5 object, JSON-safe."""
    return {str(k): json_safe(v) for k, v in obj.attrs.items()}


def _h5_value(key: str, value: Any) -> Any:
    """A value h5py stores as an attribute: scalars and flat numeric lists as is, dicts as JSON."""
    if isinstance(value, (str, bool, int, float, np.generic)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(value)
        except ValueError:  # ragged nesting
            return json.dumps(value, sort_keys=True, default=str)
        if arr.dtype.kind in "biuf" and arr.ndim == 1:
            return arr
        if arr.ndim == 1 and all(isinstance(v, str) for v in value):
            return [str(v) for v in value]
        return json.dumps(arr.tolist() if isinstance(value, np.ndarray) else value, sort_keys=True, default=str)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    raise TypeError(f"attribute {key!r}: cannot store a {type(value).__name__}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float, np.number)) and isinstance(b, (int, float, np.number)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return bool(a == b)


# ------------------------------------------------------------------------------------------ validation


def _check_features(path: str | os.PathLike[str], features: np.ndarray) -> None:
    if not isinstance(features, np.ndarray):
        raise FeatureFileError(path, f"features must be a numpy array, got {type(features).__name__}")
    if features.ndim != 2:
        raise FeatureFileError(path, f"features has {features.ndim} dims {features.shape}, expected [n, d]")
    if features.dtype.kind not in "fiu":
        raise FeatureFileError(path, f"features has dtype {features.dtype}, expected floats")


def _check_coords(path: str | os.PathLike[str], coords: np.ndarray, n: int, what: str = "coords") -> np.ndarray:
    """Coords as int64 `[n, 2]`; integral floats are accepted, anything else is an error."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureFileError(path, f"{what} has shape {coords.shape}, expected [n, 2]")
    if n >= 0 and coords.shape[0] != n:
        raise FeatureFileError(path, f"{what} rows {coords.shape[0]} != features rows {n}")
    if coords.dtype.kind == "f":
        if not np.all(np.isfinite(coords)) or not np.array_equal(coords, np.round(coords)):
            raise FeatureFileError(path, f"{what} are not whole level-0 pixels (dtype {coords.dtype})")
    elif coords.dtype.kind not in "iu":
        raise FeatureFileError(path, f"{what} has dtype {coords.dtype}, expected integers")
    return coords.astype(np.int64, copy=False)


def _check_finite(path: str | os.PathLike[str], features: np.ndarray) -> None:
    bad = ~np.isfinite(features)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise FeatureFileError(path, f"features has {int(bad.sum())} non-finite values "
                                     f"(first at row {row}, column {col}: {features[row, col]})")


# -------------------------------------------------------------------------------------------- writing


def write_features_h5(
    path: str | os.PathLike[str],
    bag: FeatureBag,
    attrs: dict[str, Any] | None = None,
    dtype: type[np.floating[Any]] | np.dtype[Any] = np.float32,
    failed_coords: np.ndarray | None = None,
) -> None:
    """Write one slide's features atomically (a crash leaves no half-written file under `path`).

    Args:
        bag: features `[n, d]`, coords int64 `[n, 2]` (None writes no `coords`: readable here, but not
            by TRIDENT, whose files always have coords).
        attrs: extra attributes, typically the coords file's tiling attrs plus `slide_fingerprint`,
            `encoder_fingerprint` and `failed_tiles`. Dicts and nested lists are stored as JSON strings.
            A value that contradicts the bag (`encoder`, `dim`, `mpp`, `patch_size_level0`,
            `target_magnification`) is an error, never silently replaced.
        dtype: float32 (default, exact) or float16 (half the size; values beyond ±65504 are an error).
        failed_coords: int64 `[m, 2]` level-0 coords of tiles that could not be read.
    Raises:
        FeatureFileError: shapes or values are invalid (naming `path` and the problem).
        ValueError: `dtype` is not float16/float32, or `attrs` contradicts the bag.
    """
    out_dtype = np.dtype(dtype)
    if out_dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"dtype must be float32 or float16, got {out_dtype}")
    _check_features(path, bag.features)
    n = bag.features.shape[0]
    coords = None if bag.coords is None else _check_coords(path, bag.coords, n)
    _check_finite(path, bag.features)
    if out_dtype == np.float16 and n and float(np.abs(bag.features).max()) > FLOAT16_MAX:
        raise FeatureFileError(path, f"features exceed the float16 range (|x| max {np.abs(bag.features).max():.6g} "
                                     f"> {FLOAT16_MAX:g}); store float32")
    failed = None if failed_coords is None else _check_coords(path, failed_coords, -1, "failed_coords")
    merged = _file_attrs(bag, attrs or {}, failed)
    features = np.ascontiguousarray(bag.features, dtype=out_dtype)
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        ds_features = f.create_dataset("features", data=features)
        targets: list[h5py.File | h5py.Dataset] = [f, ds_features]
        if coords is not None:
            targets.append(f.create_dataset("coords", data=coords, dtype=np.int64))
        if failed is not None:
            f.create_dataset("failed_coords", data=failed, dtype=np.int64)
        merged[ATTRS_JSON] = json.dumps({k: json_safe(v) for k, v in merged.items()}, sort_keys=True)
        for target in targets:
            for key, value in merged.items():
                if key == ATTRS_JSON and target is not f:
                    continue
                try:
                    target.attrs[key] = value
                except (OSError, TypeError, ValueError, RuntimeError) as e:
                    raise FeatureFileError(path, f"attribute {key!r} could not be stored ({e})") from e


def _file_attrs(bag: FeatureBag, attrs: dict[str, Any], failed: np.ndarray | None) -> dict[str, Any]:
    """Attributes to write: bag.attrs < caller attrs < the bag's typed fields (conflicts are errors)."""
    typed: dict[str, Any] = {"encoder": bag.encoder, "dim": int(bag.features.shape[1]), "mpp": bag.mpp,
                             "patch_size_level0": bag.patch_size_level0, "target_magnification": bag.magnification}
    for key, value in typed.items():
        if value is not None and attrs.get(key) is not None and not _same(attrs[key], value):
            raise ValueError(f"attrs[{key!r}]={attrs[key]!r} contradicts the bag's {key}={value!r}")
    if failed is not None and attrs.get("failed_tiles") is not None and int(attrs["failed_tiles"]) != len(failed):
        raise ValueError(f"attrs['failed_tiles']={attrs['failed_tiles']} but failed_coords has {len(failed)} rows")
    merged: dict[str, Any] = {**bag.attrs, **attrs}
    merged.update({k: v for k, v in typed.items() if v is not None})
    merged["slide_id"] = bag.slide_id
    merged.setdefault("name", bag.slide_id)  # TRIDENT's key for the slide name
    merged["n_tiles"] = int(bag.features.shape[0])
    if "slide_fingerprint" not in merged and "fingerprint" in merged:
        merged["slide_fingerprint"] = merged["fingerprint"]
    if failed is not None:
        merged["failed_tiles"] = len(failed)
    if bag.source_format != "pathchat":
        merged["imported_from"] = bag.source_format
    merged["pathchat_version"] = pathchat.__version__
    return {k: _h5_value(k, v) for k, v in merged.items() if v is not None}


# -------------------------------------------------------------------------------------------- reading


def read_dataset(path: str | os.PathLike[str], ds: h5py.Dataset) -> np.ndarray:
    """A whole dataset in one contiguous read (no per-row work)."""
    if ds.shape is None:
        raise FeatureFileError(path, f"dataset {ds.name} is empty (no shape)")
    out = np.empty(ds.shape, dtype=ds.dtype)
    if out.size:
        ds.read_direct(out)
    return out


def read_features_h5(path: str | os.PathLike[str],
                     dtype: type[np.floating[Any]] | np.dtype[Any] | None = np.float32) -> FeatureBag:
    """Read a PathChat features file (for TRIDENT, CLAM and SlideChat files use `read_feature_file`).

    Args:
        dtype: features are returned in this dtype (float16 files become float32 by default);
            None returns them as stored.
    Returns:
        A FeatureBag with `source_format="pathchat"`: features `[n, d]`, coords int64 `[n, 2]` or None.
    Raises:
        FeatureFileError: the file is missing, not an h5, not a PathChat file, or inconsistent.
    """
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError as e:
        raise FeatureFileError(path, "no such file") from e
    except OSError as e:
        raise FeatureFileError(path, f"not a readable h5 file ({e})") from e
    with f:
        root = _read_root_attrs(f)
        if "pathchat_version" not in root:
            raise FeatureFileError(path, "not a PathChat features file (no pathchat_version attribute); "
                                         "read TRIDENT/CLAM files with pathchat.features.importers.read_feature_file")
        if "features" not in f:
            raise FeatureFileError(path, f"no 'features' dataset (found {sorted(f.keys())})")
        features = read_dataset(path, f["features"])
        coords = read_dataset(path, f["coords"]) if "coords" in f else None
    _check_features(path, features)
    if coords is not None:
        coords = _check_coords(path, coords, features.shape[0])
    if dtype is not None and features.dtype != np.dtype(dtype):
        features = features.astype(dtype)
    return FeatureBag(
        features=features,
        coords=coords,
        slide_id=str(root.get("slide_id") or root.get("name") or Path(path).stem),
        encoder=_opt_str(root.get("encoder")),
        mpp=_opt_float(root.get("mpp")),
        patch_size_level0=_opt_int(root.get("patch_size_level0")),
        magnification=_opt_float(root.get("target_magnification")),
        source_format="pathchat",
        attrs={k: v for k, v in root.items() if k not in _TYPED_KEYS},
    )


def _read_root_attrs(f: h5py.File) -> dict[str, Any]:
    """Root attributes, from the JSON copy when there is one (one attribute read instead of ~25)."""
    if ATTRS_JSON in f.attrs:
        try:
            copy = json.loads(json_safe(f.attrs[ATTRS_JSON]))
        except (TypeError, ValueError):
            copy = None
        if isinstance(copy, dict):
            return copy
    return {k: v for k, v in read_attrs(f).items() if k != ATTRS_JSON}


def read_feature_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The root attributes of a features h5, without reading the features.

    Raises:
        FeatureFileError: the file is missing or not an h5 file.
    """
    try:
        with h5py.File(path, "r") as f:
            attrs = _read_root_attrs(f)
            if "features" in f and "dim" not in attrs and f["features"].ndim == 2:
                attrs["dim"] = int(f["features"].shape[1])
            return attrs
    except FileNotFoundError as e:
        raise FeatureFileError(path, "file not found") from e
    except OSError as e:
        raise FeatureFileError(path, f"not a readable h5 file ({e})") from e


def read_failed_coords(path: str | os.PathLike[str]) -> np.ndarray:
    """Level-0 coords int64 `[m, 2]` of the tiles that could not be read (`[0, 2]` when none were recorded)."""
    try:
        with h5py.File(path, "r") as f:
            failed = read_dataset(path, f["failed_coords"]) if "failed_coords" in f else np.zeros((0, 2), np.int64)
    except FileNotFoundError as e:
        raise FeatureFileError(path, "no such file") from e
    except OSError as e:
        raise FeatureFileError(path, f"not a readable h5 file ({e})") from e
    return _check_coords(path, failed, -1, "failed_coords")


def _opt_str(value: Any) -> str | None:
    """None for missing values, including TRIDENT's serialised None (the string 'None')."""
    if value is None or (isinstance(value, str) and value in ("", "None")):
        return None
    return str(value)


def _opt_float(value: Any) -> float | None:
    if value is None or isinstance(value, (str, list, bytes)):
        return None
    out = float(value)
    return out if math.isfinite(out) and out > 0 else None


def _opt_int(value: Any) -> int | None:
    out = _opt_float(value)
    return None if out is None else round(out)
