"""Benchmark loaders: each published file becomes one list of `Question`s (the evaluation-questions schema).

A question's `id` is its own id in the source file, or else its 0-based position there, so answers
produced by any system can be matched back (``pathchat eval --predictions``). Noise in a source is
normalised only where the fix is unambiguous, and every fix or dropped item is counted in
`TaskData.stats`, never silently absorbed.

| task | source | kinds |
|---|---|---|
| `slidebench` | SlideBench-VQA JSON (``{"samples": [...]}``) or the official CSV | closed, 4 options |
| `wsi-vqa` | WSI-VQA ``WsiVQA_*.json`` | closed (option strings) and open |
| `pathvqa` | PathVQA ``QA_pairs_*.json`` | open; yes/no answers get category ``yes/no`` |
| `report` | JSONL ``{id, slide, report}`` | report |
| `synthetic` / `questions` | our evaluation-questions JSONL | any |
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pathchat.evaluation.prompts import LETTERS, format_closed_question

__all__ = [
    "KINDS",
    "REPORT_PROMPT",
    "TASKS",
    "Question",
    "TaskData",
    "TaskFormatError",
    "export_task",
    "load_task",
    "read_questions_jsonl",
    "recipe_main",
    "write_questions_jsonl",
]

KINDS = ("closed", "open", "report")
REPORT_PROMPT = "Write the pathology report for this slide: describe what is visible on the H&E slide."
YES_NO = ("yes", "no")


class TaskFormatError(ValueError):
    """A task file does not have the expected shape. Names the file, the item and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class Question:
    """One evaluation question (the evaluation-questions JSONL schema).

    Attributes:
        id: the question's id in its source, or its 0-based position there.
        slide: slide id; features are read from ``<features>/<slide>.h5``.
        question: the question text without options.
        options: option texts without letter prefixes (closed), else None.
        answer: closed: the letter "A".."Z"; open: the reference text; report: the reference report.
        kind: "closed", "open" or "report".
        category: narrow category / question type; group: broad group.
    """

    id: str
    slide: str
    question: str
    options: tuple[str, ...] | None
    answer: str
    kind: str
    category: str
    group: str

    @property
    def answer_index(self) -> int:
        """0-based index of the correct option (closed questions only)."""
        if self.options is None:
            raise ValueError(f"question {self.id} is not closed")
        return LETTERS.index(self.answer)

    def prompt(self, order: tuple[int, ...] | None = None) -> str:
        """The user text: closed questions with lettered options (in `order`, original indices), else the question."""
        if self.options is None:
            return self.question
        idx = order if order is not None else tuple(range(len(self.options)))
        return format_closed_question(self.question, [self.options[i] for i in idx])

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["options"] = list(self.options) if self.options is not None else None
        return row


@dataclass
class TaskData:
    """A loaded task: its questions and what loading found (fixes, dropped items, duplicates)."""

    name: str
    source: str
    questions: list[Question]
    stats: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, Any]:
        """Counts for ``--dry-run``: questions, kinds, categories, groups, option counts, slides, answers."""
        qs = self.questions
        closed = [q for q in qs if q.kind == "closed"]
        return {
            "task": self.name,
            "source": self.source,
            "questions": len(qs),
            "slides": len({q.slide for q in qs}),
            "kinds": dict(sorted(Counter(q.kind for q in qs).items())),
            "groups": dict(sorted(Counter(q.group for q in qs).items())),
            "categories": dict(sorted(Counter(q.category for q in qs).items())),
            "option_counts": {str(k): v for k, v in sorted(Counter(len(q.options or ()) for q in closed).items())},
            "closed_answers": dict(sorted(Counter(q.answer for q in closed).items())),
            **({"loading": self.stats} if self.stats else {}),
        }


# ------------------------------------------------------------------------------------------ helpers


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise TaskFormatError(path, "no such file") from e
    except json.JSONDecodeError as e:
        raise TaskFormatError(path, f"not valid JSON ({e})") from e


def _need(path: Path, where: str, row: dict[str, Any], key: str) -> Any:
    if key not in row:
        raise TaskFormatError(path, f"{where}: missing key {key!r} (has {sorted(row)})")
    return row[key]


def _text(path: Path, where: str, row: dict[str, Any], key: str) -> str:
    value = _need(path, where, row, key)
    if not isinstance(value, str) or not value.strip():
        raise TaskFormatError(path, f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _strip_prefix(path: Path, where: str, choice: str, index: int) -> str:
    """``"B) text"`` -> ``"text"``; the prefix must carry the option's own letter."""
    m = re.match(r"\s*([A-Z])\s*[).:]\s*(.*)$", choice, re.DOTALL)
    if not m or m.group(1) != LETTERS[index]:
        raise TaskFormatError(path, f"{where}: choice {index} {choice!r} lacks the prefix '{LETTERS[index]}) '")
    if not m.group(2).strip():
        raise TaskFormatError(path, f"{where}: choice {index} {choice!r} is empty after its prefix")
    return m.group(2).strip()


# ------------------------------------------------------------------------------------------- loaders


def load_slidebench(path: str | os.PathLike[str]) -> TaskData:
    """SlideBench-VQA: the JSON reformat (``{"samples": [{slide_id, question, choices, answer, category}]}``)
    or the official CSV (columns Slide, Broad Category, Narrow Category, Question, A, B, C, D, Answer).

    Category ``"Diagnosis - Grading"`` becomes group ``Diagnosis``, category ``Grading``.
    """
    p = Path(path)
    if p.suffix.lower() == ".csv":
        return _slidebench_csv(p)
    data = _read_json(p)
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        raise TaskFormatError(p, 'expected {"samples": [...]} (SlideBench-VQA JSON)')
    questions = []
    for i, row in enumerate(data["samples"]):
        where = f"sample {i}"
        choices = _need(p, where, row, "choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise TaskFormatError(p, f"{where}: 'choices' must be a list of >= 2 strings")
        options = tuple(_strip_prefix(p, where, c, j) for j, c in enumerate(choices))
        category = _text(p, where, row, "category")
        group, _, narrow = category.partition(" - ")
        if not narrow:
            raise TaskFormatError(p, f"{where}: category {category!r} is not '<Broad> - <Narrow>'")
        questions.append(_closed(p, where, str(row.get("id", i)), _text(p, where, row, "slide_id"),
                                 _text(p, where, row, "question"), options, _text(p, where, row, "answer"),
                                 narrow.strip(), group.strip()))
    return TaskData("slidebench", str(p), questions, {})


_SLIDEBENCH_COLUMNS = ("Slide", "Broad Category", "Narrow Category", "Question", "A", "B", "Answer")


def _slidebench_csv(p: Path) -> TaskData:
    try:
        with p.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError as e:
        raise TaskFormatError(p, "no such file") from e
    except UnicodeDecodeError as e:
        raise TaskFormatError(p, f"not a UTF-8 text CSV ({e})") from e
    columns = set(rows[0]) if rows else set()
    lacking = [c for c in _SLIDEBENCH_COLUMNS if c not in columns]
    if lacking:
        raise TaskFormatError(p, f"a SlideBench CSV needs the columns {', '.join(_SLIDEBENCH_COLUMNS)}; "
                                 f"it lacks {', '.join(lacking)} (has {', '.join(sorted(columns)) or 'no rows'})")
    questions = []
    for i, row in enumerate(rows):
        where = f"row {i}"
        options = tuple(_text(p, where, row, k) for k in "ABCD" if row.get(k, "").strip())
        questions.append(_closed(p, where, str(i), _text(p, where, row, "Slide"), _text(p, where, row, "Question"),
                                 options, _text(p, where, row, "Answer"),
                                 _text(p, where, row, "Narrow Category"), _text(p, where, row, "Broad Category")))
    return TaskData("slidebench", str(p), questions, {})


def _closed(p: Path, where: str, qid: str, slide: str, question: str, options: tuple[str, ...], answer: str,
            category: str, group: str) -> Question:
    letter = answer.strip().upper()
    if len(options) < 2:
        raise TaskFormatError(p, f"{where}: a closed question needs >= 2 options, got {len(options)}")
    if letter not in LETTERS[: len(options)]:
        raise TaskFormatError(p, f"{where}: answer {answer!r} is not one of the letters "
                                 f"{LETTERS[0]}..{LETTERS[len(options) - 1]}")
    return Question(qid, slide, question, options, letter, "closed", category, group)


_WSI_VQA_FIELDS = ("histological_type", "progesterone_receptor", "vital_status", "survival time", "her2")


def load_wsi_vqa(path: str | os.PathLike[str]) -> TaskData:
    """WSI-VQA: ``[{Id, Question, Answer, Choice?}]``; with ``Choice`` closed, without it open.

    A closed answer is matched to its choice exactly, else after dropping a trailing ``.`` and
    surrounding spaces (``"grade 3."`` -> ``"grade 3"``; counted as ``answers_trailing_period``).
    Answers that match no choice either way (such as ``"the correct option is c(grade 3)."``) are
    dropped and listed in ``stats["unmatched"]``. Open questions are categorised by the clinical
    field their wording names (``her2``, ``vital_status``, …); closed ones by ``closed``.
    """
    p = Path(path)
    data = _read_json(p)
    if not isinstance(data, list):
        raise TaskFormatError(p, "expected a JSON list of {Id, Question, Answer, Choice?} (WSI-VQA)")
    questions: list[Question] = []
    trailing: list[str] = []
    unmatched: list[dict[str, Any]] = []
    duplicates = 0
    for i, row in enumerate(data):
        where = f"item {i}"
        slide = _text(p, where, row, "Id")
        question = _text(p, where, row, "Question")
        answer = _need(p, where, row, "Answer")
        if not isinstance(answer, str):
            raise TaskFormatError(p, f"{where}: 'Answer' must be a string, got {answer!r}")
        if "Choice" not in row:
            q_low = question.lower()
            category = next((f for f in _WSI_VQA_FIELDS if f in q_low), "other")
            questions.append(Question(str(i), slide, question, None, answer.strip(), "open", category, "open"))
            continue
        choices = row["Choice"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise TaskFormatError(p, f"{where}: 'Choice' must be a list of >= 2 strings")
        options = tuple(c.strip() for c in choices)
        duplicates += len(set(options)) < len(options)
        index = options.index(answer.strip()) if answer.strip() in options else None
        if index is None:
            fixed = answer.strip().rstrip(".").strip()
            if fixed in options:
                index = options.index(fixed)
                trailing.append(str(i))
        if index is None:
            unmatched.append({"id": str(i), "answer": answer})
            continue
        questions.append(Question(str(i), slide, question, options, LETTERS[index], "closed", "closed", "closed"))
    stats = {"answers_trailing_period": len(trailing), "trailing_period_ids": trailing,
             "unmatched_dropped": len(unmatched), "unmatched": unmatched,
             "closed_with_duplicate_choices": duplicates}
    return TaskData("wsi-vqa", str(p), questions, stats)


def load_pathvqa(path: str | os.PathLike[str]) -> TaskData:
    """PathVQA pairs ``[{Image_ID, Questions, Answers}]``: open questions; ``yes``/``no`` answers get
    category ``yes/no`` (scored by yes/no accuracy), the rest category ``open``. Group: ``pathvqa``."""
    p = Path(path)
    data = _read_json(p)
    if not isinstance(data, list):
        raise TaskFormatError(p, "expected a JSON list of {Image_ID, Questions, Answers} (PathVQA)")
    questions = []
    for i, row in enumerate(data):
        where = f"item {i}"
        answer = _text(p, where, row, "Answers")
        yes_no = answer.lower() in YES_NO
        questions.append(Question(str(i), _text(p, where, row, "Image_ID"), " ".join(_text(p, where, row, "Questions")
                                                                                       .split()),
                                  None, answer.lower() if yes_no else answer, "open",
                                  "yes/no" if yes_no else "open", "pathvqa"))
    return TaskData("pathvqa", str(p), questions, {})


def _jsonl_rows(p: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise TaskFormatError(p, "no such file") from e
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFormatError(p, f"line {n}: not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise TaskFormatError(p, f"line {n}: expected a JSON object")
        yield n, row


def load_report(path: str | os.PathLike[str]) -> TaskData:
    """Reports: JSONL ``{"id", "slide", "report"}`` (optional ``"question"``, default `REPORT_PROMPT`)."""
    p = Path(path)
    questions = []
    for n, row in _jsonl_rows(p):
        where = f"line {n}"
        qid = str(row.get("id", n - 1))
        question = row.get("question") or REPORT_PROMPT
        questions.append(Question(qid, _text(p, where, row, "slide"), str(question), None,
                                  _text(p, where, row, "report"), "report", "report", "report"))
    _check_unique(p, questions)
    return TaskData("report", str(p), questions, {})


def read_questions_jsonl(path: str | os.PathLike[str], name: str = "questions") -> TaskData:
    """Our evaluation-questions JSONL (one `Question` per line; see the module docstring)."""
    p = Path(path)
    questions = []
    for n, row in _jsonl_rows(p):
        where = f"line {n}"
        kind = _text(p, where, row, "kind")
        if kind not in KINDS:
            raise TaskFormatError(p, f"{where}: kind {kind!r} is not one of {KINDS}")
        options = row.get("options")
        qid, slide = str(_need(p, where, row, "id")), _text(p, where, row, "slide")
        question, answer = _text(p, where, row, "question"), _text(p, where, row, "answer")
        category, group = str(row.get("category") or kind), str(row.get("group") or kind)
        if kind == "closed":
            if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
                raise TaskFormatError(p, f"{where}: a closed question needs 'options' (list of strings)")
            questions.append(_closed(p, where, qid, slide, question, tuple(options), answer, category, group))
        else:
            if options is not None:
                raise TaskFormatError(p, f"{where}: a {kind} question must have options null")
            questions.append(Question(qid, slide, question, None, answer, kind, category, group))
    _check_unique(p, questions)
    return TaskData(name, str(p), questions, {})


def write_questions_jsonl(path: str | os.PathLike[str], questions: Iterable[Question]) -> int:
    """Write questions as evaluation-questions JSONL, atomically. Returns how many."""
    from pathchat.utils.atomic import atomic_write_text

    rows = [json.dumps(q.to_json(), ensure_ascii=False) for q in questions]
    atomic_write_text(path, "".join(r + "\n" for r in rows))
    return len(rows)


def _check_unique(p: Path, questions: list[Question]) -> None:
    seen = Counter(q.id for q in questions)
    dup = [k for k, v in seen.items() if v > 1]
    if dup:
        raise TaskFormatError(p, f"{len(dup)} duplicate question ids, e.g. {dup[:3]}")


TASKS: dict[str, Callable[[str | os.PathLike[str]], TaskData]] = {
    "slidebench": load_slidebench,
    "wsi-vqa": load_wsi_vqa,
    "pathvqa": load_pathvqa,
    "report": load_report,
    "synthetic": lambda path: read_questions_jsonl(path, "synthetic"),
    "questions": read_questions_jsonl,
}


def load_task(name: str, path: str | os.PathLike[str]) -> TaskData:
    """Load task `name` from its file.

    Raises:
        ValueError: unknown task name.
        TaskFormatError: the file is missing or malformed (naming the file and the item).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](path)


def export_task(name: str, source: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Convert a published benchmark file to evaluation-questions JSONL (the data recipes' one step).

    Returns:
        The task's counts (with what loading normalised or dropped), as `--dry-run` prints them.
    """
    task = load_task(name, source)
    write_questions_jsonl(out, task.questions)
    return task.counts()


def recipe_main(name: str, description: str, argv: Sequence[str] | None = None) -> int:
    """Command line of a data recipe: ``python -m data_recipes.<name> SOURCE --out OUT.jsonl``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=f"python -m data_recipes.{name.replace('-', '_')}", description=description)
    parser.add_argument("source", help="the published file")
    parser.add_argument("--out", required=True, help="evaluation-questions JSONL to write")
    args = parser.parse_args(argv)
    try:
        counts = export_task(name, args.source, args.out)
    except (TaskFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(counts))
    return 0
