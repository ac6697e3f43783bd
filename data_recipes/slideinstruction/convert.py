"""SlideChat's SlideInstruction → PathChat conversations JSONL and a features folder of `<slide>.h5`.

SlideChat trains on LLaVA-style records (`"image": ["<barcode>.csv"]`, `<image>` in the question) whose
CSV holds one row of 512 CONCH features per tile. Each referenced CSV is imported once with
`pathchat.features.importers` and written with `write_features_h5`, so training reads one contiguous
h5 per slide instead of re-parsing text; SlideChat's tile names `<col>_<row>.jpeg` are kept as an
int64 `tile_grid` dataset `[n, 2]` beside `features` (grid units, not pixels: the CSVs record no
pixel coordinates, so the h5 has no `coords`). A record whose CSV is missing or unreadable is skipped
and named in the result (or fails the run under `strict`).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal

import h5py
import numpy as np
from tqdm import tqdm

from pathchat.features.importers import read_feature_file
from pathchat.features.store import FeatureFileError, write_features_h5
from pathchat.model.conversation import SLIDE_TOKEN, messages_from_record
from pathchat.utils.atomic import atomic_path, atomic_write_text

SOURCE = "slideinstruction"
_IMAGE = "<image>"


class SlideInstructionError(Exception):
    """The input cannot be converted (unreadable file), or `strict` met a skipped record."""


@dataclass
class SlideInstructionConfig:
    """How to convert; every default works for SlideChat's published files."""

    encoder: str | None = "conch_v1"  # recorded in every h5: SlideChat extracted its CSVs with CONCH (v1)
    dtype: Literal["float32", "float16"] = "float32"  # float16 halves the folder; CONCH values fit it
    marker: Literal["front", "keep"] = "front"  # front: "<slide>\n" + question (CONTRACTS.md); keep: in place
    strict: bool = False  # any skipped record (missing/bad CSV, malformed record) fails the run
    overwrite: bool = False  # rewrite h5 files that already exist (else they are reused: resumable)
    progress: bool = True  # tqdm bar over the CSVs


@dataclass
class SlideInstructionResult:
    """What a run did; `skipped_ids` lists every record left out and why."""

    records_in: int = 0
    records_out: int = 0
    slides_written: int = 0
    slides_existing: int = 0  # h5 already there and reused (not re-read)
    missing: list[dict[str, str]] = field(default_factory=list)  # {"id", "csv"}: no such CSV file
    bad_features: list[dict[str, Any]] = field(default_factory=list)  # {"path", "problem", "ids"}
    invalid: list[dict[str, str]] = field(default_factory=list)  # {"id", "problem"}: malformed record

    @property
    def skipped_ids(self) -> list[str]:
        ids = [m["id"] for m in self.missing] + [i["id"] for i in self.invalid]
        return ids + [rid for b in self.bad_features for rid in b["ids"]]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.bad_features or self.invalid)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "records_skipped": len(self.skipped_ids)}


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a JSON list (SlideChat's files) or a JSONL file.

    Raises:
        SlideInstructionError: the file is missing, does not parse, or holds something other than objects.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SlideInstructionError(f"{p}: cannot read ({e})") from e
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise SlideInstructionError(f"{p}: not JSON or JSONL ({e})") from e
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise SlideInstructionError(f"{p}: record {bad} is a {type(rows[bad]).__name__}, expected an object")
    return rows


def convert_record(record: Mapping[str, Any], marker: Literal["front", "keep"] = "front",
                   index: int | None = None) -> dict[str, Any]:
    """One SlideChat record as a PathChat record: `"slide"` = the CSV's stem, `<image>` → `<slide>`.

    With `marker="front"` the marker is taken out of its question and put first (`"<slide>\\n..."`);
    a record without a marker gets one before its first human turn (LLaVA's convention). A record
    without an `id` gets `slideinstruction::<index>`.

    Raises:
        ValueError: naming the record, when it has no or several images, several markers, a marker
            outside a human turn, or turns the PathChat loader refuses.
    """
    rid = str(record["id"]) if record.get("id") is not None else f"{SOURCE}::{index}"
    images = record.get("image")
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str) or not images[0]:
        raise ValueError(f"record {rid!r}: expected 'image' to name exactly one feature CSV, got {images!r}")
    slide = PurePath(images[0]).stem
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"record {rid!r}: missing or empty 'conversations' list")
    out_turns: list[dict[str, str]] = []
    markers = 0
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise ValueError(f"record {rid!r}: turn {i} must be an object with 'from' and a text 'value'")
        value = turn["value"].replace(_IMAGE, SLIDE_TOKEN)
        count = value.count(SLIDE_TOKEN)
        markers += count
        if count and turn.get("from") not in ("human", "user"):
            raise ValueError(f"record {rid!r}: turn {i} ({turn.get('from')}) holds the slide marker")
        if count and marker == "front":
            before, after = value.split(SLIDE_TOKEN, 1)
            value = f"{SLIDE_TOKEN}\n" + " ".join(s for s in (before.strip(), after.strip()) if s)
        out_turns.append({"from": str(turn.get("from")), "value": value})
    if markers > 1:
        raise ValueError(f"record {rid!r}: {markers} slide markers; one record shows one slide once")
    out = {"id": rid, "slide": slide, "conversations": out_turns,
           "meta": {"source": SOURCE, "features_csv": images[0]}}
    _, messages = messages_from_record(out)  # the training loader's own checks (roles, empty turns)
    if markers == 0:  # put the marker where the loader would, so the file says what training sees
        first = next(i for i, t in enumerate(out_turns) if t["from"] in ("human", "user"))
        out_turns[first]["value"] = f"{SLIDE_TOKEN}\n{out_turns[first]['value']}"
    assert sum(m["content"].count(SLIDE_TOKEN) for m in messages) == 1
    return out


class _CsvIndex:
    """Finds `image` entries under the CSV folder: as a relative path first, else by file name anywhere."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def find(self, image: str) -> tuple[Path | None, str | None]:
        """(path, None), (None, None) when absent, or (None, problem) when the name is ambiguous."""
        direct = self.root / image
        if direct.is_file():
            return direct, None
        if self._by_name is None:
            self._by_name = defaultdict(list)
            for dirpath, dirs, files in os.walk(self.root):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in files:
                    if name.lower().endswith(".csv") and not name.startswith("."):
                        self._by_name[name].append(Path(dirpath) / name)
        hits = self._by_name.get(PurePath(image).name, [])
        if len(hits) > 1:
            return None, f"{PurePath(image).name} found in several places: {', '.join(map(str, hits))}"
        return (hits[0], None) if hits else (None, None)


def write_slide_h5(csv_path: Path, out_path: Path, encoder: str | None, dtype: str) -> int:
    """Import one SlideChat CSV and write it as a PathChat h5 (+ `tile_grid`), atomically. Returns tiles.

    Raises:
        FeatureFileError: the CSV is malformed (naming it and the problem).
    """
    bag = read_feature_file(csv_path, format="slidechat-csv", encoder=encoder)
    bag.slide_id = out_path.stem
    with atomic_path(out_path) as tmp:
        write_features_h5(tmp, bag, attrs={"source_file": csv_path.name}, dtype=np.dtype(dtype))
        if bag.tile_grid is not None:
            with h5py.File(tmp, "a") as f:
                f.create_dataset("tile_grid", data=bag.tile_grid.astype(np.int64))
    return len(bag)


def convert_slideinstruction(
    conversations: str | os.PathLike[str],
    csv_dir: str | os.PathLike[str],
    out_conversations: str | os.PathLike[str],
    out_features: str | os.PathLike[str],
    config: SlideInstructionConfig | None = None,
) -> SlideInstructionResult:
    """Convert SlideChat records and their per-slide CSVs into PathChat's conversation and feature files.

    Args:
        conversations: SlideChat JSON list (or JSONL) of `{"id", "image": ["<id>.csv"], "conversations"}`.
        csv_dir: folder holding the CSVs (a record's `image` is looked up as a relative path, then by
            file name anywhere below).
        out_conversations: JSONL written atomically, one record per kept input record, in input order.
        out_features: features folder; `<slide>.h5` for every slide a kept record names.
    Returns:
        Counts, and every skipped record with its reason.
    Raises:
        SlideInstructionError: the input is unreadable, or `config.strict` and a record would be skipped.
    """
    cfg = config or SlideInstructionConfig()
    records = load_records(conversations)
    result = SlideInstructionResult(records_in=len(records))
    converted: list[tuple[int, dict[str, Any]]] = []
    first_seen: dict[str, int] = {}
    for i, record in enumerate(records):
        try:
            rec = convert_record(record, cfg.marker, index=i)
            if rec["id"] in first_seen:  # the training loader refuses duplicate ids
                raise ValueError(f"record {rec['id']!r}: duplicate id (first at record {first_seen[rec['id']]})")
            first_seen[rec["id"]] = i
            converted.append((i, rec))
        except ValueError as e:
            rid = record.get("id")
            result.invalid.append({"id": str(rid) if rid is not None else f"{SOURCE}::{i}", "problem": str(e)})

    by_csv: dict[str, list[str]] = defaultdict(list)  # image entry → record ids
    for _, rec in converted:
        by_csv[rec["meta"]["features_csv"]].append(rec["id"])
    index = _CsvIndex(Path(csv_dir))
    located: dict[str, Path] = {}
    for image, ids in by_csv.items():
        path, problem = index.find(image)
        if problem is not None:
            result.bad_features.append({"path": str(Path(csv_dir) / image), "problem": problem, "ids": ids})
        elif path is None:
            result.missing.extend({"id": rid, "csv": image} for rid in ids)
        else:
            located[image] = path
    if cfg.strict and not result.ok:
        raise SlideInstructionError(_strict_message(result))

    out_dir = Path(out_features)
    out_dir.mkdir(parents=True, exist_ok=True)
    slides: dict[str, str] = {}  # slide id → image entry, to catch two CSVs claiming one slide
    good: set[str] = set()
    for image, path in tqdm(sorted(located.items()), desc="slideinstruction CSVs", unit="slide",
                            disable=not cfg.progress):
        slide = PurePath(image).stem
        if slide in slides:
            result.bad_features.append({"path": str(path), "ids": by_csv[image], "problem":
                                        f"slide id {slide!r} is also named by {slides[slide]!r}"})
            continue
        slides[slide] = image
        target = out_dir / f"{slide}.h5"
        if target.exists() and not cfg.overwrite:
            result.slides_existing += 1
            good.add(image)
            continue
        try:
            write_slide_h5(path, target, cfg.encoder, cfg.dtype)
        except FeatureFileError as e:
            result.bad_features.append({"path": e.path, "problem": e.problem, "ids": by_csv[image]})
            if cfg.strict:
                raise SlideInstructionError(_strict_message(result)) from e
            continue
        result.slides_written += 1
        good.add(image)

    kept = [rec for _, rec in converted if rec["meta"]["features_csv"] in good]
    result.records_out = len(kept)
    atomic_write_text(out_conversations, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return result


def _strict_message(result: SlideInstructionResult) -> str:
    parts = [f"record {m['id']!r}: no feature CSV {m['csv']!r}" for m in result.missing[:5]]
    parts += [f"record {i['id']!r}: {i['problem']}" for i in result.invalid[:5]]
    parts += [f"records {b['ids'][:3]}: {b['path']}: {b['problem']}" for b in result.bad_features[:5]]
    return f"--strict: {len(result.skipped_ids)} record(s) would be skipped: " + "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: exit 0 when every record was kept, 2 when some were skipped, 1 on an error."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m data_recipes.slideinstruction",
                                description=convert_slideinstruction.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("conversations", help="SlideChat conversation JSON (or JSONL)")
    p.add_argument("--csv-dir", required=True, help="folder of SlideChat's per-slide feature CSVs")
    p.add_argument("--out-conversations", required=True, help="output conversations JSONL")
    p.add_argument("--out-features", required=True, help="output features folder (<slide>.h5)")
    p.add_argument("--encoder", default="conch_v1", help="encoder recorded in the h5 files ('' for none)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--marker", choices=("front", "keep"), default="front",
                   help="front: '<slide>\\n' before the question; keep: <image> becomes <slide> in place")
    p.add_argument("--strict", action="store_true", help="fail on any record that would be skipped")
    p.add_argument("--overwrite", action="store_true", help="rewrite h5 files that already exist")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = SlideInstructionConfig(encoder=args.encoder or None, dtype=args.dtype, marker=args.marker,
                                 strict=args.strict, overwrite=args.overwrite, progress=not args.no_progress)
    try:
        result = convert_slideinstruction(args.conversations, args.csv_dir, args.out_conversations,
                                          args.out_features, cfg)
    except SlideInstructionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json(), indent=1))
    return 0 if result.ok else 2
