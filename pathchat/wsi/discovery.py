"""Find slides in files and folders, counting multi-file slides once.

A DICOM series (several files, one SeriesInstanceUID) is one slide; so is a MIRAX `.mrxs` with its
data folder, and a Hamamatsu `.vms`/`.vmu` with the JPEG files it lists. Other files are candidates
when their extension is a slide or image format; anything else (h5, json, ini, dat, xml…) is ignored.
A DICOM file whose SOP Instance UID an earlier file already has (a copied export) is the same
instance, not a new part of the series: it becomes its own source with `duplicate_of` set, which
the batch runner records as a failure row naming both files, so every input file is accounted for.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pathchat.wsi.slide import PLAIN_IMAGE_SUFFIXES, is_dicom_file

#: Extensions OpenSlide reads as whole slides (DICOM is detected by content, whatever its name).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm", ".dicom"}
)
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ""})


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

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
        return str(ds.get("SeriesInstanceUID", "")) or None, str(ds.get("SOPInstanceUID", "")) or None
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


def _walk(root: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return files


def discover_slides(inputs: Sequence[str | os.PathLike[str]]) -> list[SlideSource]:
    """Slides under the given files and folders (folders searched recursively), in a stable order.

    Raises:
        FileNotFoundError: an input path does not exist.
    """
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        files.extend(_walk(p) if p.is_dir() else [p])
    files = list(dict.fromkeys(f.resolve() for f in files))  # de-duplicate, keep order

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
    return _unique_ids(found)


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
