"""How a closed question is put to the model: one format shared by training data and evaluation.

Training recipes and the evaluation harness must ask closed questions the same way, or a model
trained on one wording is scored on another. Options are lettered ``A)``, ``B)``, … one per line.

The trained answer is the option's text, ``"stroma"``: what the model sees in the slide, in the
option's own words. Pointing at a letter on top of that is a copy from the prompt that adds nothing
about the slide, and a small model learns it far more slowly (measured on the synthetic recipe:
letter-first answers stayed at chance after 1,140 steps while the option text was right for 58% of
dominant-class questions). The answer parser maps option text to its letter deterministically and
reads letters just the same, so models that answer "B" or "B) stroma" are scored alike.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

__all__ = ["LETTERS", "closed_answer_text", "format_closed_question", "option_letter"]

LETTERS = string.ascii_uppercase
CLOSED_INSTRUCTION = "Answer with the correct option."


def option_letter(index: int) -> str:
    """``0 -> "A"``; raises for more options than letters."""
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"option index {index} out of range 0..{len(LETTERS) - 1}")
    return LETTERS[index]


def format_closed_question(question: str, options: Sequence[str]) -> str:
    """The user turn for a closed question: the question, lettered options, the instruction."""
    if len(options) < 2:
        raise ValueError(f"a closed question needs at least 2 options, got {len(options)}: {question!r}")
    lines = [question.strip()]
    lines += [f"{option_letter(i)}) {opt.strip()}" for i, opt in enumerate(options)]
    lines.append(CLOSED_INSTRUCTION)
    return "\n".join(lines)


def closed_answer_text(options: Sequence[str], answer_index: int) -> str:
    """The reference assistant turn for a closed question: the option's text."""
    if not 0 <= answer_index < len(options):
        raise ValueError(f"answer index {answer_index} out of range for {len(options)} options")
    return options[answer_index].strip()
