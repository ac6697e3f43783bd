"""Keep only what an H&E slide shows from a pathology report, and say what was dropped and by which rule.

Training a slide model to write "received in formalin labeled with the patient's name" or "ER positive"
teaches it to invent what no tile can show. The report is cut into units (lines, with wrapped lines
joined), units into sentences, and `rules.py` decides per section and per sentence. Sentence splitting
is a few lines of regex tuned to report text (abbreviations such as `M.D.`, `Dr.`, part labels `A.`,
decimals), because the usual libraries either need downloaded models (nltk punkt) or are unmaintained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from data_recipes.tcga_reports.rules import (
    FINDING_RE,
    HEADER_RE,
    KEEP,
    LABEL_RE,
    PROCEDURE_RE,
    first_rule,
    section_kind,
)

# Kinds whose header, written inline (`GROSS DESCRIPTION: Received ...`), opens a section; other
# inline headers (`Procedure: Mastectomy`, `Date: ...`) are one-line fields and leave the section as is.
_INLINE_SECTION_KINDS = (KEEP, "clinical_history", "gross", "intraoperative")
_LIST_RE = re.compile(r"^\s*(?:[-*•·]+|\(?\d{1,2}[.)]|\(?[A-Za-z][.)])\s+")
_KEYLINE_RE = re.compile(r"^\s*[A-Za-z][A-Za-z0-9 ,/&()'\-]{0,60}:(?:\s|$)")
_SPLIT_RE = re.compile(r"[.!?]+[\"')\]]*\s+(?=[A-Z0-9(\"'\[])")
_ABBREVIATIONS = frozenset({"dr", "mr", "mrs", "ms", "prof", "st", "no", "nos", "vs", "approx", "fig", "figs", "e.g",
                            "i.e", "m.d", "d.o", "ph.d", "etc", "incl", "cf", "ca", "sq", "hpf", "hpfs"})
_XREF_FRAGMENT = re.compile(r"\s*(?:[(\[]\s*(?:see|refer to)\b[^)\]]*[)\]]|[-–]\s*see (?:comment|note)\b[^.]*)",
                            re.IGNORECASE)


class Dropped(NamedTuple):
    """One dropped sentence (or section line) and the rule that dropped it."""

    text: str
    rule: str


@dataclass
class FilteredReport:
    """`text`: the kept sentences, one report unit per line; `dropped`: everything else, in order."""

    text: str
    dropped: list[Dropped] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing visible on the slide remained: the report should not become a training target."""
        return not self.text.strip()


def report_units(report: str) -> list[str]:
    """Logical units of a report: lines, with a line that continues a wrapped sentence joined to it.

    A line starts a new unit after a blank line, after a line ending in `. : ; ! ?`, when it starts
    with a list marker or a `Key:` field, or when it is a section header; a bare header line
    (`GROSS DESCRIPTION`) becomes `GROSS DESCRIPTION:`. An empty string marks a paragraph break
    (a blank line or a section header), where the kept text starts a new line.
    """
    units: list[str] = []
    current = ""

    def flush(paragraph_break: bool) -> None:
        nonlocal current
        if current:
            units.append(current)
        if paragraph_break and units and units[-1]:
            units.append("")
        current = ""

    for raw in report.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = re.sub(r"\s+", " ", raw).strip()
        if not line:
            flush(True)
        elif len(line) <= 60 and section_kind(line.rstrip(":")) is not None:
            flush(True)
            units.append(line if line.endswith(":") else line + ":")
        elif (inline := HEADER_RE.match(line)) and section_kind(inline["head"]) in _INLINE_SECTION_KINDS:
            flush(True)
            current = line
        elif not current:
            current = line
        elif current[-1] in ".:;!?" or _LIST_RE.match(line) or _KEYLINE_RE.match(line):
            flush(False)
            current = line
        else:
            current = f"{current} {line}"
    flush(False)
    return units


def split_sentences(unit: str) -> list[str]:
    """Sentences of one unit; no split after abbreviations, single letters (initials, `A.`) or decimals."""
    out: list[str] = []
    start = 0
    for m in _SPLIT_RE.finditer(unit):
        word = re.search(r"[A-Za-z][A-Za-z.]*$", unit[start:m.start()])
        w = word.group(0).lower().rstrip(".") if word else ""
        if w in _ABBREVIATIONS or (len(w) == 1 and w.isalpha()):
            continue
        out.append(unit[start:m.end()].strip())
        start = m.end()
    tail = unit[start:].strip()
    if tail:
        out.append(tail)
    return out


def _clean(sentence: str) -> str:
    """Without a leading list marker and with single spaces."""
    return re.sub(r"\s+", " ", _LIST_RE.sub("", sentence, count=1)).strip(" -–")


def filter_report(report: str) -> FilteredReport:
    """Keep the H&E-visible sentences of a pathology report.

    Returns:
        The kept text (one unit per line, in report order; empty when nothing visible remains) and
        every dropped sentence with its rule name (`section:<kind>` for whole dropped sections, else a
        sentence rule of `rules.SENTENCE_RULES`).
    """
    section = KEEP
    paragraphs: list[list[str]] = [[]]
    dropped: list[Dropped] = []
    for unit in report_units(report):
        if not unit:
            paragraphs.append([])
            continue
        header = HEADER_RE.match(unit)
        kind = section_kind(header["head"]) if header else None
        if header and kind is not None:
            rest = header["rest"].strip()
            if not rest or kind in _INLINE_SECTION_KINDS:
                section, unit = kind, rest
            else:  # a one-line field such as `Procedure: ...`: its first sentence goes, the rest is judged
                field_value, *more = split_sentences(rest)
                dropped.append(Dropped(_clean(f"{header['head']}: {field_value}"), f"section:{kind}"))
                unit = " ".join(more)
            if not unit:
                continue
        if section != KEEP:
            dropped.extend(Dropped(_clean(s), f"section:{section}") for s in split_sentences(unit)
                           if re.search(r"[A-Za-z0-9]", s))
            continue
        label = LABEL_RE.match(unit)
        if label and PROCEDURE_RE.search(label["label"]) and not FINDING_RE.search(label["label"]):
            dropped.append(Dropped(_clean(label["label"]), "specimen"))
            unit = label["rest"]
        for fragment in _XREF_FRAGMENT.findall(unit):
            dropped.append(Dropped(fragment.strip(" -–()[]"), "cross_reference"))
        unit = _XREF_FRAGMENT.sub("", unit)
        kept: list[str] = []
        for sentence in split_sentences(unit):
            text = _clean(sentence)
            if not re.search(r"[A-Za-z]", text):
                continue
            rule = first_rule(text)
            if rule is None:
                kept.append(text if text[-1] in ".!?;:" else text + ".")
            else:
                dropped.append(Dropped(text, rule))
        paragraphs[-1].extend(kept)
    return FilteredReport("\n".join(" ".join(p) for p in paragraphs if p), dropped)
