"""Questions, answers and reports about one synthetic slide, all computed from its `SlideTruth`.

Closed questions are put with `pathchat.evaluation.prompts` (the format the evaluation uses) and
their options are placed so that, per question type, the answer letter cycles through every
position in a shuffled order: a model that prefers a letter cannot score above chance. Open
questions take the shortest exact answer ("3", "upper left"). Reports come in a few deterministic
paraphrases, so stage 1 cannot learn the slide from the sentence shape alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_recipes.synthetic.layout import AMOUNTS, CLASS_NAMES, QUADRANTS, RECIPE_CLASSES
from data_recipes.synthetic.truth import SlideTruth
from pathchat.evaluation.prompts import closed_answer_text, format_closed_question, option_letter

SLIDE_TOKEN = "<slide>"


@dataclass(frozen=True)
class QuestionType:
    group: str  # "content" | "layout" | "report"
    kind: str  # "closed" | "open" | "report"
    num_options: int | None  # closed only
    wordings: tuple[str, ...]  # paraphrases; "{cls}" is the class asked about


#: Every question type the recipe asks, by category name (the `category` of the evaluation file).
QUESTION_TYPES: dict[str, QuestionType] = {
    "presence": QuestionType("content", "closed", 4, (
        "Which of these tissue types is present on the slide?",
        "Which of the following tissue types can be seen in this slide?")),
    "dominant": QuestionType("content", "closed", 4, (
        "Which tissue type covers the largest area?",
        "Which tissue type dominates this slide?")),
    "location": QuestionType("layout", "closed", 4, (
        "Where on the slide is the region of {cls}?",
        "In which part of the slide is the region of {cls}?")),
    "region_count": QuestionType("layout", "closed", 4, (
        "How many separate tissue regions are there?",
        "How many separate pieces of tissue does the slide contain?")),
    "tissue_amount": QuestionType("layout", "closed", 3, (
        "How much tissue is on the slide?",
        "Is the amount of tissue on the slide small, medium or large?")),
    "presence_open": QuestionType("content", "open", None, (
        "Which tissue types are present?", "What kinds of tissue does this slide show?")),
    "dominant_open": QuestionType("content", "open", None, (
        "What is the dominant tissue type?", "Which tissue type is most abundant?")),
    "location_open": QuestionType("layout", "open", None, (
        "Where is the region of {cls} located?", "In which quadrant is the region of {cls}?")),
    "region_count_open": QuestionType("layout", "open", None, (
        "How many separate tissue regions are there?", "How many distinct tissue pieces are on the slide?")),
    "tissue_amount_open": QuestionType("layout", "open", None, (
        "How much tissue is on the slide?", "Is there a small, medium or large amount of tissue?")),
    "report": QuestionType("report", "report", None, (
        "Describe this slide.", "Summarize what is visible on this slide.", "Write a short report of this slide.")),
}

REGION_COUNT_OPTIONS: tuple[str, ...] = ("1", "2", "3", "4")
_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")


def chance_level(category: str) -> float | None:
    """Accuracy of a uniform guess: 1 / number of options for closed types, None otherwise."""
    n = QUESTION_TYPES[category].num_options
    return None if n is None else 1.0 / n


class LetterBalancer:
    """Answer positions per question type: each block of `n` questions uses every position once.

    The order inside a block is drawn from `rng`, so the sequence is deterministic but not a pattern.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.queues: dict[str, list[int]] = {}

    def next(self, category: str, n_options: int) -> int:
        queue = self.queues.setdefault(category, [])
        if not queue:
            queue.extend(int(i) for i in self.rng.permutation(n_options))
        return queue.pop()


@dataclass(frozen=True)
class QAItem:
    """One question about a slide with its answer; closed ones carry options and the answer's index."""

    category: str
    question: str  # without options
    options: tuple[str, ...] | None
    answer_index: int | None  # closed only
    answer: str  # closed: the option text; open/report: the reference answer

    @property
    def qtype(self) -> QuestionType:
        return QUESTION_TYPES[self.category]

    def user_text(self) -> str:
        """The human turn (without the slide token)."""
        if self.options is None:
            return self.question
        return format_closed_question(self.question, self.options)

    def assistant_text(self) -> str:
        """The training target: the option text for closed questions, the answer otherwise."""
        if self.options is None or self.answer_index is None:
            return self.answer
        return closed_answer_text(self.options, self.answer_index)

    def eval_record(self, qid: str, slide_id: str) -> dict[str, Any]:
        """The evaluation-file row (CONTRACTS.md): closed answers are the letter."""
        closed = self.options is not None and self.answer_index is not None
        return {
            "id": qid, "slide": slide_id, "question": self.question,
            "options": list(self.options) if self.options is not None else None,
            "answer": option_letter(self.answer_index) if closed and self.answer_index is not None else self.answer,
            "kind": self.qtype.kind, "category": self.category, "group": self.qtype.group,
        }


def _closed(category: str, question: str, correct: str, distractors: Sequence[str], rng: np.random.Generator,
            balancer: LetterBalancer) -> QAItem:
    n = QUESTION_TYPES[category].num_options
    if n is None or len(distractors) < n - 1:
        raise ValueError(f"{category}: need {n} options, have {1 + len(distractors)}")
    others = [str(d) for d in rng.permutation(np.array(list(distractors), dtype=object))[: n - 1]]
    pos = balancer.next(category, n)
    options = others[:pos] + [correct] + others[pos:]
    return QAItem(category, question, tuple(options), pos, correct)


def _wording(category: str, rng: np.random.Generator, wordings: Mapping[str, Sequence[str]] | None = None,
             **fmt: str) -> str:
    choices = QUESTION_TYPES[category].wordings if wordings is None else wordings[category]
    return choices[int(rng.integers(len(choices)))].format(**fmt)


def join_names(names: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def slide_questions(truth: SlideTruth, rng: np.random.Generator, balancer: LetterBalancer,
                    max_per_type: int = 2, open_questions: int | None = 2,
                    only: Sequence[str] | None = None,
                    wordings: Mapping[str, Sequence[str]] | None = None) -> list[QAItem]:
    """Closed questions of every applicable type plus open ones, in a shuffled order.

    Args:
        max_per_type: presence and location are asked about up to this many different classes.
        open_questions: how many open questions (drawn among the open types); None asks all of them.
        only: ask only these closed categories and no open question (None: everything).
        wordings: phrasings per category (None: each type's own `QuestionType.wordings`); the same
            random draws either way, so the default gives the dataset's questions unchanged.
    """
    name = CLASS_NAMES
    present = list(truth.present)
    absent = [name[c] for c in RECIPE_CLASSES if c not in truth.class_tiles]
    located = [c for c in present if truth.unique_location(c) is not None]
    items: list[QAItem] = []

    def asked(category: str) -> bool:
        return only is None or category in only

    if asked("presence"):
        for c in rng.permutation(np.array(present, dtype=object))[:max_per_type]:
            items.append(_closed("presence", _wording("presence", rng, wordings), name[str(c)], absent, rng, balancer))
    if asked("dominant"):
        others = [name[c] for c in present if c != truth.dominant] + absent
        items.append(_closed("dominant", _wording("dominant", rng, wordings), name[truth.dominant], others, rng, balancer))
    if asked("location"):
        for c in rng.permutation(np.array(located, dtype=object))[:max_per_type]:
            where = truth.unique_location(str(c)) or ""
            wrong = [q for q in QUADRANTS if q != where]
            items.append(_closed("location", _wording("location", rng, wordings, cls=name[str(c)]), where, wrong, rng,
                                 balancer))
    count = str(truth.region_count)
    if asked("region_count"):
        items.append(_closed("region_count", _wording("region_count", rng, wordings), count,
                             [o for o in REGION_COUNT_OPTIONS if o != count], rng, balancer))
    if asked("tissue_amount"):
        items.append(_closed("tissue_amount", _wording("tissue_amount", rng, wordings), truth.amount,
                             [a for a in AMOUNTS if a != truth.amount], rng, balancer))
    if only is not None:
        return [items[i] for i in rng.permutation(len(items))]

    opens = [QAItem("presence_open", _wording("presence_open", rng, wordings), None, None,
                    join_names([name[c] for c in present])),
             QAItem("dominant_open", _wording("dominant_open", rng, wordings), None, None, name[truth.dominant]),
             QAItem("region_count_open", _wording("region_count_open", rng, wordings), None, None, count),
             QAItem("tissue_amount_open", _wording("tissue_amount_open", rng, wordings), None, None, truth.amount)]
    if located:
        c = str(located[int(rng.integers(len(located)))])
        opens.append(QAItem("location_open", _wording("location_open", rng, wordings, cls=name[c]), None, None,
                            truth.unique_location(c) or ""))
    order = rng.permutation(len(opens))
    items += [opens[i] for i in (order if open_questions is None else order[:open_questions])]
    return [items[i] for i in rng.permutation(len(items))]


def slide_report(truth: SlideTruth, variant: int) -> str:
    """A short report of what the tiles show, in paraphrase `variant` (0, 1 or 2)."""
    name = CLASS_NAMES
    n = truth.region_count
    plural = "s" if n > 1 else ""
    regions = join_names([f"{name[r.tissue_class]} in the {r.quadrant}" for r in truth.regions])
    present = join_names([name[c] for c in truth.present])
    dominant, amount, words = name[truth.dominant], truth.amount, _NUMBER_WORDS[n]
    templates = (
        f"{words.capitalize()} separate tissue region{plural}: {regions}. The dominant tissue type is "
        f"{dominant}. The amount of tissue is {amount}.",
        f"The slide shows a {amount} amount of tissue in {words} separate piece{plural}, mostly {dominant}: "
        f"{regions}.",
        f"Tissue types present: {present}. Largest area: {dominant}. {words.capitalize()} region{plural}: "
        f"{regions}. Amount of tissue: {amount}.",
    )
    return templates[variant % len(templates)]


REPORT_VARIANTS = 3


def conversation(slide_id: str, record_id: str, turns: Sequence[tuple[str, str]],
                 meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A DESIGN.md conversation record; the slide token opens the first human turn."""
    conv: list[dict[str, str]] = []
    for k, (user, assistant) in enumerate(turns):
        conv.append({"from": "human", "value": (f"{SLIDE_TOKEN}\n" if k == 0 else "") + user})
        conv.append({"from": "gpt", "value": assistant})
    record: dict[str, Any] = {"id": record_id, "slide": slide_id, "conversations": conv}
    if meta is not None:
        record["meta"] = meta
    return record
