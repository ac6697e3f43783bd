"""Find slides in files and folders, counting multi-file slides once.

A DICOM series (several files, one SeriesInstanceUID) is one slide; so is a MIRAX `.mrxs` with its
data folder, and a Hamamatsu `.vms`/`.vmu` with the JPEG files it lists. Other files are candidates
when their extension is a slide or image format; anything else (h5, json, ini, dat, xml…) is ignored.
A DICOM file whose SOP Instance UID an earlier file already has (a copied export) is the same
instance, not a new part of the series: it becomes its own source with `duplicate_of` set, which
the batch runner records as a failure row naming both files, so every input file is accounted for.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pathchat.wsi.slide import PLAIN_IMAGE_SUFFIXES, is_dicom_file

log = logging.getLogger(__name__)

#: Extensions OpenSlide reads as whole slides (DICOM is detected by content, whatever its name).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm", ".dicom",
     ".qptiff"}  # QPTIFF (Akoya/PerkinElmer) is a TIFF: it gets a row, and is refused when it is fluorescence
)
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ""})
#: Files that sit beside slides and are quietly passed over in folders (outputs, sidecars, notes).
SIDECAR_SUFFIXES = frozenset(
    {".h5", ".json", ".jsonl", ".csv", ".tsv", ".txt", ".md", ".xml", ".ini", ".dat", ".yaml", ".yml", ".log",
     ".geojson", ".pt", ".npy", ".npz", ".pdf", ".html", ".lock", ".py", ".sh", ".zip", ".gz"}
)


def formats_looked_for() -> str:
    """The file types discovery takes as slides, for messages."""
    return ", ".join(sorted(SLIDE_SUFFIXES | PLAIN_IMAGE_SUFFIXES)) + " and DICOM files of any name"


@dataclass
class Discovery:
    """What a search found: the slides, and the files passed over with the reason (shown to the user)."""

    sources: list[SlideSource]
    ignored: list[tuple[str, str]]  # (path, reason)


@dataclass(frozen=True)
class SlideSource:
    """One slide to process: the path to open and every file it is made of."""

    slide_id: str  # unique within a job, used for output file names
    path: Path  # what `open_slide` receives
    files: tuple[Path, ...]  # all files whose content makes up the slide (for fingerprints)
    fingerprint: str | None = None  # content fingerprint, once the batch runner has computed it
    duplicate_of: Path | None = None  # an earlier DICOM file holding the same instance (SOP Instance UID)


def _dicom_uids(path: Path) -> tuple[str | None, str | None]:
    """(SeriesInstanceUID, SOPInstanceUID) of a DICOM file; None for what its header lacks."""
    try:
        import pydicom

        # Header quirks (a 65-character UID) are not this step's business: no warning per file on the console.
        settings = pydicom.config.settings
        previous, settings.reading_validation_mode = settings.reading_validation_mode, pydicom.config.IGNORE
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
            return str(ds.get("SeriesInstanceUID", "")) or None, str(ds.get("SOPInstanceUID", "")) or None
        finally:  # values are validated when read, so they are read before the mode is restored
            settings.reading_validation_mode = previous
    except Exception:  # noqa: BLE001 - any unreadable header just means "no series"; the slide opener reports it
        return None, None


def _vms_members(vms: Path) -> set[Path]:
    """Image files a Hamamatsu .vms/.vmu index references (they are parts, not slides)."""
    members: set[Path] = set()
    try:
        text = vms.read_text(errors="replace")
    except OSError:
        return members
    for line in text.splitlines():
        m = re.match(r"\s*(ImageFile(\(\d+,\d+\))?|MapFile|OptimisationFile|MacroImage)\s*=\s*(.+)", line)
        if m:
            members.add((vms.parent / m.group(3).strip()).resolve())
    return members


def _walk(root: Path, ignored: list[tuple[str, str]] | None = None) -> list[Path]:
    """Files under `root`, following folder symlinks but never into a loop (a loop is noted and skipped)."""
    files: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink back to a folder already searched
            dirnames[:] = []
            if ignored is not None:
                ignored.append((dirpath, "symlink loop: this folder was already searched"))
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return files


def _resolve(path: Path, ignored: list[tuple[str, str]]) -> Path | None:
    """The real path of a file, or None (noted in `ignored`) for a symlink loop or a dangling link."""
    try:
        return path.resolve(strict=True)
    except RuntimeError:  # Python 3.11 raises this for a symlink loop
        ignored.append((str(path), "symlink loop"))
    except OSError as e:
        ignored.append((str(path), "symlink loop" if e.errno == errno.ELOOP else f"cannot resolve: {e.strerror}"))
    return None


def discover_slides(inputs: Sequence[str | os.PathLike[str]]) -> list[SlideSource]:
    """Slides under the given files and folders (folders searched recursively), in a stable order.

    Raises:
        FileNotFoundError: an input path does not exist.
    """
    return find_slides(inputs).sources


def find_slides(inputs: Sequence[str | os.PathLike[str]]) -> Discovery:
    """Slides under the given files and folders, and the files in those folders that are no slide.

    A file named directly is always a candidate, whatever its extension (so it gets a row, and a failure
    says why it cannot be read). In folders, files with an unknown extension and symlink loops are
    listed in `ignored` with the reason; sidecar files (h5, json, csv, txt…) are passed over silently.

    Raises:
        FileNotFoundError: an input path does not exist.
        ValueError: an input is a symlink loop.
    """
    ignored: list[tuple[str, str]] = []
    walked: list[Path] = []
    direct: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_symlink() and _resolve(p, []) is None:
            raise ValueError(f"{p}: a symlink loop or a dangling link, not a slide or folder")
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        if p.is_dir():
            walked.extend(_walk(p, ignored))
        else:
            walked.append(p)
            direct.add(p.resolve())
    resolved = (_resolve(f, ignored) for f in walked)
    files = list(dict.fromkeys(f for f in resolved if f is not None))  # de-duplicate, keep order
    for path, reason in ignored:
        log.warning("skipped %s: %s", path, reason)

    excluded: set[Path] = set()
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".mrxs":  # its data folder holds .dat/.ini parts
            data_dir = f.with_suffix("")
            if data_dir.is_dir():
                excluded.update(p.resolve() for p in _walk(data_dir))
        elif suffix in (".vms", ".vmu"):
            excluded.update(_vms_members(f))

    singles: list[tuple[Path, tuple[Path, ...]]] = []
    series: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    instances: dict[str, Path] = {}  # SOP Instance UID -> the first file holding it
    duplicates: list[tuple[Path, Path]] = []
    for f in files:
        if f in excluded:
            continue
        suffix = f.suffix.lower()
        if suffix in _DICOM_SUFFIXES and is_dicom_file(f):
            series_uid, instance_uid = _dicom_uids(f)
            if instance_uid is not None and instance_uid in instances:
                duplicates.append((f, instances[instance_uid]))
                continue
            if instance_uid is not None:
                instances[instance_uid] = f
            series[(f.parent, series_uid or f.name)].append(f)
        elif suffix in SLIDE_SUFFIXES or suffix in PLAIN_IMAGE_SUFFIXES:
            parts: tuple[Path, ...] = (f,)
            if suffix == ".mrxs" and f.with_suffix("").is_dir():
                parts = (f, *sorted(p.resolve() for p in _walk(f.with_suffix(""))))
            elif suffix in (".vms", ".vmu"):
                parts = (f, *sorted(p for p in _vms_members(f) if p.exists()))
            singles.append((f, parts))
        elif f in direct:
            singles.append((f, (f,)))  # named on the command line: it gets a row, whatever it is
        elif suffix not in SIDECAR_SUFFIXES:
            reason = f"unknown extension {suffix or '(none)'!r}; PathChat reads {formats_looked_for()}"
            ignored.append((str(f), reason))

    found: list[tuple[Path, str, tuple[Path, ...], Path | None]] = [(f, f.stem, parts, None) for f, parts in singles]
    found += [(f, f.stem, (f,), original) for f, original in duplicates]
    per_folder: dict[Path, int] = defaultdict(int)
    for folder, _uid in series:
        per_folder[folder] += 1
    for (folder, _uid), members in series.items():
        members = sorted(members)
        # A folder with one series is named after the folder, as people name DICOM slides.
        name = folder.name if per_folder[folder] == 1 else members[0].stem
        found.append((members[0], name, tuple(members), None))
    found.sort(key=lambda t: str(t[0]))
    return Discovery(_unique_ids(found), ignored)


def find_slides_or_fail(inputs: Sequence[str | os.PathLike[str]]) -> Discovery:
    """`find_slides`, refusing a search that finds no slide at all (a usage error, not "done 0").

    Raises:
        ValueError: no slide under `inputs`; names them, the formats looked for and what was passed over.
    """
    found = find_slides(inputs)
    if not found.sources:
        names = ", ".join(str(i) for i in inputs) or "(no inputs)"
        passed = "".join(f"; skipped {path}: {reason}" for path, reason in found.ignored[:5])
        raise ValueError(f"no slide files in {names} (looked for {formats_looked_for()}){passed}")
    return found


def _unique_ids(found: list[tuple[Path, str, tuple[Path, ...], Path | None]]) -> list[SlideSource]:
    """Use the stem as id; where two slides share one, add parent folder names until they differ."""
    counts: dict[str, int] = defaultdict(int)
    for _, name, _, _ in found:
        counts[name] += 1
    sources = []
    used: set[str] = set()
    for path, name, parts, duplicate_of in found:
        slide_id = name
        if counts[name] > 1:
            parents = [p.name for p in path.parents if p.name][: 4]
            for depth in range(1, len(parents) + 1):
                slide_id = "__".join([*reversed(parents[:depth]), name])
                if slide_id not in used:
                    break
        n = 1
        base = slide_id
        while slide_id in used:
            n += 1
            slide_id = f"{base}_{n}"
        used.add(slide_id)
        sources.append(SlideSource(slide_id=slide_id, path=path, files=parts, duplicate_of=duplicate_of))
    return sources
