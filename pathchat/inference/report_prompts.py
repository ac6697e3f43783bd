"""Report prompt sets: a YAML of named sections, each one question, with a content hash for resume.

The hash is taken over the parsed set (not the file's bytes), so reformatting a file or editing a
comment redoes nothing, while any changed name, title, question or token budget redoes every report.
The default set ships as package data (`pathchat/inference/prompts/default.yaml`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["PromptSet", "PromptSetError", "ReportSection", "load_prompt_set"]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class PromptSetError(ValueError):
    """A prompt file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ReportSection:
    """One report section: its key in the JSON, its heading, and the one question that fills it."""

    name: str
    title: str
    question: str
    max_new_tokens: int


@dataclass(frozen=True)
class PromptSet:
    """The sections of a report, in order, and where they came from."""

    name: str
    sections: tuple[ReportSection, ...]
    source: str  # the file read ("default" for the shipped set)

    @property
    def sha256(self) -> str:
        """Content hash of the parsed set (names, titles, questions, budgets): the resume key's part."""
        blob = json.dumps({"name": self.name, "sections": [asdict(s) for s in self.sections]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "sha256": self.sha256,
                "sections": [asdict(s) for s in self.sections]}


def _fail(source: str, problem: str) -> PromptSetError:
    return PromptSetError(f"{source}: {problem}")


def _positive_int(value: Any, source: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(source, f"{where} must be a positive integer, got {value!r}")
    return value


def parse_prompt_set(data: Any, source: str) -> PromptSet:
    """Validate a parsed YAML document into a `PromptSet`.

    Raises:
        PromptSetError: naming `source` and the first problem (missing key, duplicate section, empty
            question, wrong type).
    """
    if not isinstance(data, dict):
        raise _fail(source, "a prompt set is a mapping with 'name' and 'sections'")
    unknown = sorted(set(data) - {"name", "sections", "max_new_tokens"})
    if unknown:
        raise _fail(source, f"unknown keys {unknown}; valid keys: ['max_new_tokens', 'name', 'sections']")
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name.strip():
        raise _fail(source, f"'name' must be a non-empty string, got {name!r}")
    default_budget = _positive_int(data.get("max_new_tokens", 160), source, "max_new_tokens")
    raw = data.get("sections")
    if not isinstance(raw, list) or not raw:
        raise _fail(source, "'sections' must be a non-empty list of {name, title, question}")
    sections: list[ReportSection] = []
    seen: set[str] = set()
    for i, item in enumerate(raw, start=1):
        where = f"section {i}"
        if not isinstance(item, dict):
            raise _fail(source, f"{where} must be a mapping with name, title and question")
        extra = sorted(set(item) - {"name", "title", "question", "max_new_tokens"})
        if extra:
            raise _fail(source, f"{where}: unknown keys {extra}")
        sec_name, question = item.get("name"), item.get("question")
        if not isinstance(sec_name, str) or not _NAME.match(sec_name):
            raise _fail(source, f"{where}: 'name' must be letters, digits, '_', '.' or '-', got {sec_name!r}")
        if sec_name in seen:
            raise _fail(source, f"{where}: section name {sec_name!r} is used twice")
        seen.add(sec_name)
        if not isinstance(question, str) or not question.strip():
            raise _fail(source, f"{where} ({sec_name}): 'question' must be a non-empty string")
        if "<slide>" in question:
            raise _fail(source, f"{where} ({sec_name}): leave '<slide>' out; the slide is added to every question")
        title = item.get("title", sec_name.replace("_", " ").capitalize())
        if not isinstance(title, str) or not title.strip():
            raise _fail(source, f"{where} ({sec_name}): 'title' must be a non-empty string")
        budget = _positive_int(item.get("max_new_tokens", default_budget), source, f"{where} max_new_tokens")
        sections.append(ReportSection(sec_name, title.strip(), question.strip(), budget))
    return PromptSet(name=name.strip(), sections=tuple(sections), source=source)


def load_prompt_set(path: str | os.PathLike[str] | None = None) -> PromptSet:
    """The prompt set in `path`, or the shipped default set when None.

    Raises:
        PromptSetError: the file is missing, is not YAML, or does not validate (file and problem named).
    """
    if path is None:
        text = resources.files("pathchat.inference").joinpath("prompts/default.yaml").read_text(encoding="utf-8")
        source = "default"
    else:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise _fail(str(p), f"cannot read the prompt file: {e.strerror or e}") from e
        source = str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _fail(source, f"not valid YAML: {e}") from e
    return parse_prompt_set(data, source)
