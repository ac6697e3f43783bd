"""Conversation records (DESIGN.md format, SlideChat/LLaVA aliases) read from JSON or JSONL.

A record is one slide and its conversation. Bad records raise an error that names the file and the
record; with ``skip_invalid`` they are counted and left out instead, so one typo in a 176K-record
file does not cost a training run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathchat.model.conversation import SLIDE_TOKEN, messages_from_record

__all__ = [
    "ConversationRecord",
    "RecordError",
    "SkippedRecords",
    "load_records",
    "pack_by_slide",
    "split_by_question",
]

logger = logging.getLogger(__name__)


class RecordError(ValueError):
    """A conversation record (or its file) cannot be used; the message names both."""


@dataclass
class ConversationRecord:
    """One slide with OpenAI-style messages (optional system message, then user/assistant pairs)."""

    id: str
    slide: str | None
    messages: list[dict[str, str]]
    source_ids: list[str] = field(default_factory=list)  # records merged into this one by packing
    # Packing: index in `messages` where each merged record's turns begin (empty when not packed).
    segment_starts: list[int] = field(default_factory=list)

    def segments(self) -> list[list[dict[str, str]]]:
        """The merged records' messages, each with the slide marker on its first user turn and the
        shared system message in front (the packed record itself when it was not packed)."""
        if len(self.segment_starts) < 2:
            return [self.messages]
        system = [self.messages[0]] if self.messages[0]["role"] == "system" else []
        bounds = [*self.segment_starts, len(self.messages)]
        out = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            body = [dict(m) for m in self.messages[a:b]]
            first = next(m for m in body if m["role"] == "user")
            if SLIDE_TOKEN not in first["content"]:
                first["content"] = f"{SLIDE_TOKEN}\n{first['content']}"
            out.append(system + body)
        return out

    @property
    def num_answers(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "assistant")

    def to_json(self) -> dict[str, Any]:
        """Back to the DESIGN.md on-disk format."""
        roles = {"user": "human", "assistant": "gpt", "system": "system"}
        out: dict[str, Any] = {"id": self.id}
        if self.slide is not None:
            out["slide"] = self.slide
        out["conversations"] = [{"from": roles[m["role"]], "value": m["content"]} for m in self.messages]
        return out


@dataclass
class SkippedRecords:
    """What ``load_records(skip_invalid=True)`` left out: count and the first reasons."""

    count: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, reason: str, keep: int = 20) -> None:
        self.count += 1
        if len(self.reasons) < keep:
            self.reasons.append(reason)


def _raw_records(path: Path) -> Iterable[tuple[str, Any]]:
    """(where, raw record) pairs from a JSON list/object or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or (stripped.startswith("{") and "\n{" in stripped.rstrip()):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", RecordError(f"{path}:{lineno}: not valid JSON ({e.msg})")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON or JSONL ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict):
        for key in ("data", "records", "conversations", "samples"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a list of conversation records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield f"{path}[{i}]", rec


def load_records(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 skip_invalid: bool = False, require_slide: bool = True,
                 skipped: SkippedRecords | None = None) -> list[ConversationRecord]:
    """Read conversation records from one or more JSON / JSONL files.

    Args:
        paths: files; records keep file order.
        skip_invalid: count and leave out malformed records instead of raising.
        require_slide: a record must name a slide (training always needs one).
        skipped: filled with the count and reasons of skipped records.

    Raises:
        RecordError: naming the file, the record position and id, and the problem.
        FileNotFoundError: a path does not exist.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    skipped = skipped if skipped is not None else SkippedRecords()
    out: list[ConversationRecord] = []
    seen: dict[str, str] = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"conversation file not found: {path}")
        for where, raw in _raw_records(path):
            try:
                rec = _parse(where, raw, require_slide)
                if rec.id in seen:
                    raise RecordError(f"{where}: duplicate record id {rec.id!r} (first at {seen[rec.id]})")
                seen[rec.id] = where
            except RecordError as e:
                if not skip_invalid:
                    raise
                skipped.add(str(e))
                continue
            out.append(rec)
    if skipped.count:
        logger.warning("skipped %d invalid conversation records; first: %s", skipped.count,
                       skipped.reasons[0] if skipped.reasons else "")
    return out


def _parse(where: str, raw: Any, require_slide: bool) -> ConversationRecord:
    if isinstance(raw, RecordError):
        raise raw
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    rid = str(raw["id"]) if raw.get("id") is not None else where
    try:
        slide, messages = messages_from_record({**raw, "id": rid})
    except ValueError as e:
        raise RecordError(f"{where}: {e}") from e
    if require_slide and slide is None:
        raise RecordError(f"{where}: record {rid!r} names no slide ('slide' or 'image')")
    return ConversationRecord(id=rid, slide=slide, messages=messages, source_ids=[rid])


def pack_by_slide(records: Sequence[ConversationRecord], max_records: int | None = None) -> list[ConversationRecord]:
    """Merge all records of one slide into one multi-turn record: one slide encoding, many answers.

    SlideChat-style data holds one question per record; packing puts every question about a slide
    in one sequence, so the connector runs once per slide instead of once per question. The slide
    marker stays in the first user turn only; a system message is kept from the first record.
    Slides keep the order of their first record. `segment_starts` remembers where each record
    begins, so the dataset can also keep the records apart (`isolate_records`).

    With `max_records`, a slide with more records than that is split into the fewest packs that
    hold at most `max_records` each, of near-equal sizes, in file order. Attention costs grow with
    the square of the sequence length, so two half-length packs train faster than one long one
    for the price of a second, short, slide prefix.
    """
    if max_records is not None and max_records < 1:
        raise ValueError(f"max_records must be >= 1 or None, got {max_records}")
    groups: dict[str | None, list[ConversationRecord]] = {}
    for rec in records:
        groups.setdefault(rec.slide, []).append(rec)
    packed: list[ConversationRecord] = []
    for slide, recs in groups.items():
        if slide is None:
            packed.extend(recs)
            continue
        parts = 1 if max_records is None else -(-len(recs) // max_records)
        base, extra = divmod(len(recs), parts)
        start = 0
        for j in range(parts):
            chunk = recs[start: start + base + (j < extra)]
            start += len(chunk)
            suffix = "" if parts == 1 else f"-{j + 1}of{parts}"
            packed.append(chunk[0] if len(chunk) == 1 else _merge(slide, chunk, suffix))
    return packed


def _merge(slide: str, recs: Sequence[ConversationRecord], suffix: str) -> ConversationRecord:
    messages: list[dict[str, str]] = []
    if recs[0].messages[0]["role"] == "system":
        messages.append(dict(recs[0].messages[0]))
    starts = []
    for rec in recs:
        starts.append(len(messages))
        for m in rec.messages:
            if m["role"] == "system":
                continue
            content = m["content"]
            if m["role"] == "user":
                content = _strip_marker(content)
            messages.append({"role": m["role"], "content": content})
    first_user = next(m for m in messages if m["role"] == "user")
    first_user["content"] = f"{SLIDE_TOKEN}\n{first_user['content']}"
    ids = [i for r in recs for i in r.source_ids]
    return ConversationRecord(id=f"{slide}::packed{len(recs)}{suffix}", slide=slide, messages=messages,
                              source_ids=ids, segment_starts=starts)


def split_by_question(records: Sequence[ConversationRecord]) -> list[ConversationRecord]:
    """One record per question/answer pair, each showing the slide (the SlideChat layout)."""
    out: list[ConversationRecord] = []
    for rec in records:
        system = [dict(rec.messages[0])] if rec.messages[0]["role"] == "system" else []
        body = rec.messages[len(system):]
        for t in range(0, len(body), 2):
            user, answer = body[t], body[t + 1]
            q = _strip_marker(user["content"])
            if rec.slide is not None:
                q = f"{SLIDE_TOKEN}\n{q}"
            out.append(ConversationRecord(
                id=f"{rec.id}::q{t // 2}", slide=rec.slide,
                messages=[*system, {"role": "user", "content": q}, dict(answer)],
                source_ids=[f"{rec.id}::q{t // 2}"]))
    return out


def _strip_marker(text: str) -> str:
    return text.replace(f"{SLIDE_TOKEN}\n", "").replace(SLIDE_TOKEN, "").strip()
