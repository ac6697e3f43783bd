"""Report files → filtered report targets (JSONL) and, optionally, stage-1 conversation records.

Input: a folder of `<slide>.txt`, a JSONL or JSON list of `{slide, report}`, or a CSV (column names
configurable, e.g. tatonetti-lab/tcga-path-reports' `patient_filename`, `text`). A report with nothing
visible left is written with `"empty": true` and never becomes a conversation. The stage-1 prompt is one
of several paraphrases, chosen from a hash of the slide id, so reruns give the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_recipes.tcga_reports.filter import filter_report
from pathchat.utils.atomic import atomic_write_text

SOURCE = "tcga_reports"
PROMPTS: tuple[str, ...] = (
    "Describe the slide.",
    "Describe the histological findings in this slide.",
    "Write a pathology report for this whole-slide image.",
    "What does this H&E slide show? Give a concise report.",
    "Summarise the microscopic findings of this slide.",
    "Provide a histopathological description of this slide.",
    "Report the diagnosis and the features visible on this slide.",
    "Give a brief pathology report of what is seen in this slide.",
)


class ReportInputError(Exception):
    """The report input cannot be read (names the file and the problem)."""


@dataclass
class ReportsResult:
    """Counts of a run: `empty` lists the slides whose reports kept nothing."""

    reports: int = 0
    kept: int = 0
    empty: list[str] = field(default_factory=list)
    conversations: int = 0
    rule_counts: dict[str, int] = field(default_factory=dict)  # dropped sentences per rule
    kept_chars: int = 0
    input_chars: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"reports": self.reports, "kept": self.kept, "empty": len(self.empty), "empty_slides": self.empty,
                "conversations": self.conversations, "rule_counts": self.rule_counts,
                "kept_chars": self.kept_chars, "input_chars": self.input_chars}


def stage1_prompt(slide: str, seed: int = 0) -> str:
    """One of `PROMPTS`, fixed by (seed, slide) through SHA-256, so it never depends on input order."""
    digest = hashlib.sha256(f"{seed}:{slide}".encode()).digest()
    return PROMPTS[int.from_bytes(digest[:8], "big") % len(PROMPTS)]


def stage1_record(slide: str, text: str, seed: int = 0) -> dict[str, Any]:
    """A stage-1 conversation record (CONTRACTS.md): `<slide>` + a report prompt → the kept report text."""
    return {"id": f"{SOURCE}::{slide}", "slide": slide,
            "conversations": [{"from": "human", "value": f"<slide>\n{stage1_prompt(slide, seed)}"},
                              {"from": "gpt", "value": text}],
            "meta": {"source": SOURCE}}


def load_reports(path: str | os.PathLike[str], slide_key: str = "slide",
                 report_key: str = "report") -> list[tuple[str, str]]:
    """(slide, report text) pairs in input order (a folder: sorted `*.txt`, slide = file stem).

    Raises:
        ReportInputError: unreadable input, a row without the two keys, or a slide named twice.
    """
    p = Path(path)
    pairs: list[tuple[str, str]] = []
    try:
        if p.is_dir():
            pairs = [(f.stem, f.read_text(encoding="utf-8", errors="replace"))
                     for f in sorted(p.glob("*.txt")) if not f.name.startswith(".")]
        elif p.suffix.lower() == ".csv":
            import pandas as pd

            df = pd.read_csv(p, dtype=str, keep_default_na=False)
            missing = [k for k in (slide_key, report_key) if k not in df.columns]
            if missing:
                raise ReportInputError(f"{p}: no column {missing[0]!r} (columns: {list(df.columns)})")
            pairs = list(zip(df[slide_key], df[report_key], strict=True))
        else:
            text = p.read_text(encoding="utf-8")
            rows = json.loads(text) if text.lstrip().startswith("[") else \
                [json.loads(line) for line in text.splitlines() if line.strip()]
            for i, row in enumerate(rows):
                if not isinstance(row, dict) or not isinstance(row.get(slide_key), str) or \
                        not isinstance(row.get(report_key), str):
                    raise ReportInputError(f"{p}: row {i} needs text fields {slide_key!r} and {report_key!r}")
                pairs.append((row[slide_key], row[report_key]))
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise ReportInputError(f"{p}: cannot read reports ({e})") from e
    seen: set[str] = set()
    for slide, _ in pairs:
        if not slide or slide in seen:
            raise ReportInputError(f"{p}: slide {slide!r} is {'empty' if not slide else 'named twice'}")
        seen.add(slide)
    return pairs


def build_report_targets(
    reports: str | os.PathLike[str],
    out: str | os.PathLike[str],
    conversations: str | os.PathLike[str] | None = None,
    seed: int = 0,
    slide_key: str = "slide",
    report_key: str = "report",
    progress: bool = True,
) -> ReportsResult:
    """Filter every report; write `{slide, report, dropped, empty}` JSONL and optional stage-1 records.

    Args:
        reports: folder of `<slide>.txt`, JSONL/JSON of `{slide, report}`, or CSV.
        out: JSONL, written atomically; `report` is the kept text, `dropped` a list of [sentence, rule].
        conversations: when given, stage-1 records for every non-empty report (JSONL, atomic).
        seed: changes which paraphrase each slide's prompt gets.
    Raises:
        ReportInputError: the input cannot be read.
    """
    pairs = load_reports(reports, slide_key, report_key)
    result = ReportsResult(reports=len(pairs))
    rows: list[str] = []
    records: list[str] = []
    counts: Counter[str] = Counter()
    for slide, text in tqdm(pairs, desc="tcga_reports", unit="report", disable=not progress):
        filtered = filter_report(text)
        counts.update(d.rule for d in filtered.dropped)
        result.input_chars += len(text)
        rows.append(json.dumps({"slide": slide, "report": filtered.text, "empty": filtered.empty,
                                "dropped": [list(d) for d in filtered.dropped]}, ensure_ascii=False) + "\n")
        if filtered.empty:
            result.empty.append(slide)
            continue
        result.kept += 1
        result.kept_chars += len(filtered.text)
        records.append(json.dumps(stage1_record(slide, filtered.text, seed), ensure_ascii=False) + "\n")
    result.rule_counts = dict(sorted(counts.items()))
    atomic_write_text(out, "".join(rows))
    if conversations is not None:
        atomic_write_text(conversations, "".join(records))
        result.conversations = len(records)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: prints the counts as JSON; exit 0, or 1 when the input cannot be read."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m data_recipes.tcga_reports", description=build_report_targets.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", help="folder of <slide>.txt, JSONL/JSON of {slide, report}, or CSV")
    p.add_argument("--out", required=True, help="output JSONL of {slide, report, dropped, empty}")
    p.add_argument("--conversations", help="also write stage-1 conversation records here (JSONL)")
    p.add_argument("--seed", type=int, default=0, help="changes the prompt paraphrase chosen per slide")
    p.add_argument("--slide-key", default="slide", help="slide field/column of the input")
    p.add_argument("--report-key", default="report", help="report text field/column of the input")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        result = build_report_targets(args.reports, args.out, args.conversations, args.seed, args.slide_key,
                                      args.report_key, progress=not args.no_progress)
    except ReportInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json(), indent=1))
    return 0
