"""How a closed question is put to the model: one format shared by training data and evaluation.

Training recipes and the evaluation harness must ask closed questions the same way, or a model
trained on one wording is scored on another. Options are lettered ``A)``, ``B)``, … one per line.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

__all__ = ["LETTERS", "closed_answer_text", "format_closed_question", "option_letter"]

LETTERS = string.ascii_uppercase
CLOSED_INSTRUCTION = "Answer with the letter of the correct option."


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
    """The reference assistant turn for a closed question: ``"B) option text"``."""
    return f"{option_letter(answer_index)}) {options[answer_index].strip()}"
