"""A TRIDENT or CLAM job folder → a PathChat features folder (`<slide>.h5`), without re-running any encoder.

Layouts found (first that matches):
  - TRIDENT: `JOB/<mag>x_<px>px_<overlap>px_overlap/features_<encoder>/<slide>.h5` (the job, a tiling
    folder or one `features_<encoder>` folder may be given); the encoder comes from the folder name.
  - CLAM: `JOB/h5_files/<slide>.h5` (features + coords) and `JOB/pt_files/<slide>.pt` (features only);
    a `.pt` is used only for slides without an h5, since the h5 also has coordinates.
  - flat: feature files directly in the folder.
TRIDENT and CLAM files are read with `pathchat.features.importers` and rewritten in PathChat's format
(the same feature values, plus the mpp/encoder/tiling attributes the model needs); files that already
are PathChat h5 are hard-linked (or symlinked, or copied) unchanged. A bad file is recorded with its
path and the problem, and the rest go on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from pathchat.features.importers import H5_SUFFIXES, PT_SUFFIXES, detect_format, read_feature_file
from pathchat.features.store import FeatureFileError, encoder_from_dir_name, write_features_h5
from pathchat.utils.atomic import atomic_path, temp_path_for

TILING_RE = re.compile(r"^\d+(?:\.\d+)?x_\d+px_\d+px_overlap$")
_FEATURES_PREFIX = "features_"


class JobFolderError(Exception):
    """The folder holds no feature files in a known layout, or several feature sets and no choice."""


@dataclass(frozen=True)
class FeatureSource:
    """One feature file found in a job folder."""

    path: Path
    slide_id: str
    layout: str  # "trident" | "clam" | "flat"
    encoder: str | None  # from TRIDENT's `features_<encoder>` folder name; None elsewhere
    tiling: str | None  # TRIDENT's tiling folder name, e.g. "20x_256px_0px_overlap"


@dataclass
class DiscoveredJob:
    layout: str
    sources: list[FeatureSource]
    pt_shadowed: list[Path] = field(default_factory=list)  # CLAM .pt files skipped for the slide's h5


@dataclass
class FromTridentConfig:
    """How to import; every default works for a single-encoder TRIDENT or CLAM job."""

    encoder: str | None = None  # picks one TRIDENT feature set; recorded for CLAM files (which do not say)
    tiling: str | None = None  # picks one TRIDENT tiling folder, e.g. "20x_256px_0px_overlap"
    mpp: float | None = None  # level-0 µm/px for slides missing from `mpp_table` (TRIDENT/CLAM do not record it)
    mpp_table: Path | None = None  # CSV with `wsi` (TRIDENT's custom list) or `slide`, and `mpp` columns
    compatible: Literal["hardlink", "symlink", "copy"] = "hardlink"  # for files already in PathChat's format
    dtype: Literal["float32", "float16"] = "float32"
    overwrite: bool = False  # re-import slides whose output exists (else they are kept: resumable)
    progress: bool = True


@dataclass
class FromTridentResult:
    """What a run did; `failed` names each bad file and its problem."""

    layout: str = ""
    found: int = 0
    converted: int = 0  # read and rewritten in PathChat's format
    linked: int = 0  # already PathChat files, hard- or symlinked
    copied: int = 0  # already PathChat files, copied (asked for, or a hard link across file systems)
    existing: int = 0  # output already there and kept
    by_format: dict[str, int] = field(default_factory=dict)  # source format of each converted/linked file
    encoders: list[str] = field(default_factory=list)
    pt_shadowed: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)  # {"path", "problem"}

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _feature_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)


def _trident_groups(root: Path) -> list[tuple[str | None, Path]]:
    """(tiling, features folder) pairs of a TRIDENT job, tiling folder or features folder."""
    if root.name.startswith(_FEATURES_PREFIX):
        return [(root.parent.name if TILING_RE.match(root.parent.name) else None, root)]
    tilings = [root] if TILING_RE.match(root.name) else sorted(d for d in root.iterdir()
                                                                if d.is_dir() and TILING_RE.match(d.name))
    return [(t.name, d) for t in tilings for d in sorted(t.iterdir())
            if d.is_dir() and d.name.startswith(_FEATURES_PREFIX)]


def discover_feature_files(job: str | os.PathLike[str], encoder: str | None = None,
                           tiling: str | None = None) -> DiscoveredJob:
    """The feature files of a TRIDENT or CLAM job folder (or a flat folder of feature files).

    Args:
        encoder, tiling: choose among several TRIDENT feature sets (`features_<encoder>` folders).
    Raises:
        JobFolderError: no feature files in a known layout, several TRIDENT sets left after the
            choice, or none matching it.
    """
    root = Path(job)
    if not root.is_dir():
        raise JobFolderError(f"{root}: no such folder")
    groups = _trident_groups(root)
    if groups:
        names = [f"{t}/{d.name}" if t else d.name for t, d in groups]
        chosen = [(t, d) for t, d in groups
                  if (encoder is None or encoder_from_dir_name(d.name[len(_FEATURES_PREFIX):]) == encoder)
                  and (tiling is None or t == tiling)]
        if not chosen:
            raise JobFolderError(f"{root}: no TRIDENT feature set matches encoder={encoder!r} tiling={tiling!r}; "
                                 f"found {', '.join(names)}")
        if len(chosen) > 1:
            raise JobFolderError(f"{root}: several TRIDENT feature sets ({', '.join(names)}); choose one with "
                                 "--encoder and/or --tiling")
        t, d = chosen[0]
        enc = encoder_from_dir_name(d.name[len(_FEATURES_PREFIX):])
        return DiscoveredJob("trident", [FeatureSource(p, p.stem, "trident", enc, t)
                                         for p in _feature_files(d, H5_SUFFIXES)])
    h5_dir, pt_dir = root / "h5_files", root / "pt_files"
    if h5_dir.is_dir() or pt_dir.is_dir():
        h5 = _feature_files(h5_dir, H5_SUFFIXES) if h5_dir.is_dir() else []
        pt = _feature_files(pt_dir, PT_SUFFIXES) if pt_dir.is_dir() else []
        with_h5 = {p.stem for p in h5}
        sources = [FeatureSource(p, p.stem, "clam", None, None) for p in h5]
        sources += [FeatureSource(p, p.stem, "clam", None, None) for p in pt if p.stem not in with_h5]
        return DiscoveredJob("clam", sorted(sources, key=lambda s: (s.slide_id, str(s.path))),
                             [p for p in pt if p.stem in with_h5])
    flat = _feature_files(root, H5_SUFFIXES + PT_SUFFIXES)
    if flat:
        return DiscoveredJob("flat", [FeatureSource(p, p.stem, "flat", None, None) for p in flat])
    raise JobFolderError(f"{root}: no feature files found (expected TRIDENT's <tiling>/features_<encoder>/*.h5, "
                         "CLAM's h5_files/ and pt_files/, or .h5/.pt files in the folder itself)")


def read_mpp_table(path: str | os.PathLike[str]) -> dict[str, float]:
    """Slide id → level-0 mpp from a CSV with `mpp` and `wsi` (a file name, as TRIDENT's list) or `slide`.

    Raises:
        JobFolderError: the CSV lacks the columns or holds a non-positive or non-numeric mpp.
    """
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype={"wsi": str, "slide": str})
    except (OSError, ValueError) as e:
        raise JobFolderError(f"{path}: cannot read the mpp table ({e})") from e
    key = "wsi" if "wsi" in df.columns else "slide" if "slide" in df.columns else None
    if key is None or "mpp" not in df.columns:
        raise JobFolderError(f"{path}: the mpp table needs columns 'mpp' and 'wsi' or 'slide' "
                             f"(found {list(df.columns)})")
    mpp = pd.to_numeric(df["mpp"], errors="coerce")
    bad = df[~(mpp > 0)]
    if len(bad):
        raise JobFolderError(f"{path}: row {bad.index[0]} ({bad[key].iloc[0]}) has mpp {bad['mpp'].iloc[0]!r}")
    ids = [Path(str(v)).stem if key == "wsi" else str(v) for v in df[key]]
    return dict(zip(ids, mpp.astype(float), strict=True))


def _bring_over(src: Path, dst: Path, how: str) -> str:
    """Put an already-compatible file at `dst` without rewriting it; returns "linked" or "copied".

    Links are made under a temporary name and renamed into place (atomic, and the source is never
    opened for writing, so read-only sources work); copies go through `atomic_path`.
    """
    if how in ("hardlink", "symlink"):
        tmp = temp_path_for(dst)
        try:
            if how == "hardlink":
                os.link(src, tmp)
            else:
                os.symlink(src.resolve(), tmp)
            os.replace(tmp, dst)
            return "linked"
        except OSError:
            if how == "symlink":
                raise
        finally:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
    with atomic_path(dst) as tmp:  # asked for, or a hard link across file systems
        shutil.copyfile(src, tmp)
    return "copied"


def import_job(job: str | os.PathLike[str], out: str | os.PathLike[str],
               config: FromTridentConfig | None = None) -> FromTridentResult:
    """Import every feature file of a TRIDENT/CLAM job into the features folder `out`.

    Returns:
        Counts per outcome and source format, and each failed file with its problem.
    Raises:
        JobFolderError: the job folder (or the mpp table) cannot be used at all.
    """
    cfg = config or FromTridentConfig()
    found = discover_feature_files(job, cfg.encoder, cfg.tiling)
    mpps = read_mpp_table(cfg.mpp_table) if cfg.mpp_table is not None else {}
    result = FromTridentResult(layout=found.layout, found=len(found.sources),
                               pt_shadowed=[str(p) for p in found.pt_shadowed])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    formats: Counter[str] = Counter()
    encoders: set[str] = set()
    claimed: dict[str, Path] = {}
    for src in tqdm(found.sources, desc="import features", unit="slide", disable=not cfg.progress):
        if src.slide_id in claimed:
            result.failed.append({"path": str(src.path), "problem": f"slide id {src.slide_id!r} is also given by "
                                                                    f"{claimed[src.slide_id]}"})
            continue
        claimed[src.slide_id] = src.path
        target = out_dir / f"{src.slide_id}.h5"
        if target.exists() and not cfg.overwrite:
            result.existing += 1
            continue
        try:
            fmt = detect_format(src.path)
            bag = read_feature_file(src.path, fmt, mpp=mpps.get(src.slide_id, cfg.mpp),
                                    encoder=src.encoder or cfg.encoder)
            if fmt == "pathchat":
                outcome = _bring_over(src.path, target, cfg.compatible)
                setattr(result, outcome, getattr(result, outcome) + 1)
            else:
                bag.slide_id = src.slide_id
                write_features_h5(target, bag, attrs={"source_file": str(src.path)}, dtype=np.dtype(cfg.dtype))
                result.converted += 1
        except (FeatureFileError, OSError) as e:
            problem = e.problem if isinstance(e, FeatureFileError) else f"{type(e).__name__}: {e}"
            result.failed.append({"path": str(src.path), "problem": problem})
            continue
        formats[fmt] += 1
        if bag.encoder:
            encoders.add(bag.encoder)
    result.by_format = dict(sorted(formats.items()))
    result.encoders = sorted(encoders)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prints the counts as JSON; exit 0 when every file imported, 2 when some failed, 1 on an error."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m data_recipes.from_trident", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="TRIDENT job / tiling / features_<encoder> folder, CLAM results folder, or a "
                               "folder of feature files")
    p.add_argument("--out", required=True, help="PathChat features folder to write (<slide>.h5)")
    p.add_argument("--encoder", help="TRIDENT: which features_<encoder> folder; CLAM: the encoder to record")
    p.add_argument("--tiling", help="TRIDENT: which tiling folder, e.g. 20x_256px_0px_overlap")
    p.add_argument("--mpp", type=float, help="level-0 µm/px of slides the mpp table does not list")
    p.add_argument("--mpp-table", type=Path, help="CSV with columns wsi (or slide) and mpp")
    p.add_argument("--compatible", choices=("hardlink", "symlink", "copy"), default="hardlink",
                   help="how files already in PathChat's format are brought over (never rewritten)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--overwrite", action="store_true", help="re-import slides whose output exists")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = FromTridentConfig(encoder=args.encoder, tiling=args.tiling, mpp=args.mpp, mpp_table=args.mpp_table,
                            compatible=args.compatible, dtype=args.dtype, overwrite=args.overwrite,
                            progress=not args.no_progress)
    try:
        result = import_job(args.job, args.out, cfg)
    except JobFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json(), indent=1))
    for failure in result.failed:
        print(f"failed: {failure['path']}: {failure['problem']}", file=sys.stderr)
    return 0 if result.ok else 2
