"""One deterministic parser for closed (multiple-choice) answers, with a FAILED bucket.

Every published WSI benchmark parses answers its own way, so numbers do not compare. This parser
tries fixed tiers in order and stops at the first that finds anything; a tier that finds two
different letters fails (ambiguous) instead of guessing:

1. the whole reply is one letter (``B``, ``(B)``, ``**B**``, ``b.``);
2. an explicit answer cue: ``Answer: B``, ``the answer is (B)``, ``correct option is B``, ``B is correct``;
   else the one option text named after such a cue (``Answer: stroma in the lower right``);
3. an option cue: ``option B``, ``choice B``, ``I choose B``;
4. letter labels: ``B) …`` / ``B. …`` at the start, ``(B)`` or ``B)`` anywhere;
5. the option text: normalised equality, else the one option whose text occurs in the reply
   (an option found only inside a longer option's occurrence does not count);
6. bare capital letters in prose (``I think B``; the article ``A`` before a word is skipped).

Letters preceded by a negation (``not A``, ``rather than A``) are ignored in every tier. A reply
with no answer, or with two different ones (``A or B``), is FAILED: scored wrong and counted.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from pathchat.evaluation.prompts import LETTERS

__all__ = ["FAILED", "ParsedAnswer", "normalize_option_text", "parse_closed_answer"]

FAILED = "FAILED"

_NEGATION = re.compile(
    r"(?:\bnot|n't|\bnor|\brather\s+than|\binstead\s+of|\bexcept|\bexcluding|\bnever|\bno|\bunlike|\bbesides)"
    r"\s*(?:option\s+|choice\s+|answer\s+)?[\(\[]?$",
    re.IGNORECASE,
)
# Words after a capital "A" that show it is a letter, not the article ("A or B", "A is correct").
_A_AS_LETTER_NEXT = {"or", "and", "nor", "is", "was", "would", "seems", "looks", "appears", "vs", "versus",
                     "fits", "matches", "because", "since", "as", "but"}
_LETTER_END = r"(?=$|[\s.,;:!?)\]*'\"])"
_TEXT_NEGATION = re.compile(r"\b(?:not|no|nor|than|except|excluding|unlike|isn t|instead of|rather than)"
                            r"\s+(?:(?:a|an|the)\s+)?$")


@dataclass(frozen=True)
class ParsedAnswer:
    """What a reply answered.

    Attributes:
        letter: the chosen option's letter in the presented order, or None (FAILED).
        method: the tier that decided ("letter", "answer-cue", "option-cue", "label", "text",
            "bare-letter") or "failed".
        reason: for FAILED, "no answer" or "ambiguous: A, B"; "" otherwise.
        text_letter: the letter whose option text the reply names uniquely (None when none);
            differs from `letter` when a reply's letter and text disagree.
    """

    letter: str | None
    method: str
    reason: str = ""
    text_letter: str | None = None

    @property
    def failed(self) -> bool:
        return self.letter is None

    @property
    def label(self) -> str:
        """The letter, or ``FAILED``."""
        return self.letter if self.letter is not None else FAILED

    @property
    def conflict(self) -> bool:
        """The reply's letter and the option text it names disagree."""
        return self.letter is not None and self.text_letter is not None and self.letter != self.text_letter


_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_option_text(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: ``"Grade 3."`` -> ``"grade 3"``."""
    return " ".join(text.lower().translate(_PUNCT).split())


def _clean(text: str) -> str:
    """Drop markdown emphasis and code marks, unify whitespace."""
    text = re.sub(r"[*_`]+", "", text)
    return text.replace("\r", "\n").strip()


def _negated(text: str, start: int) -> bool:
    return bool(_NEGATION.search(text[max(0, start - 24):start]))


def _decide(letters: list[str], method: str) -> ParsedAnswer | None:
    distinct = sorted(set(letters))
    if not distinct:
        return None
    if len(distinct) > 1:
        return ParsedAnswer(None, "failed", f"ambiguous: {', '.join(distinct)}")
    return ParsedAnswer(distinct[0], method)


def _valid(letter: str, n_options: int) -> str | None:
    up = letter.upper()
    return up if up in LETTERS[:n_options] else None


def _cue_letters(text: str, cue: str, n_options: int) -> list[str]:
    """Letters right after a cue phrase (``cue`` is a regex group); lowercase letters only when alone."""
    pattern = re.compile(
        rf"(?:{cue})\s*(?:[:=\-–]\s*|\bis\b\s*|\bwould\s+be\b\s*|\bshould\s+be\b\s*)?"
        rf"(?:option\s+|choice\s+|letter\s+)?[\(\[]?([A-Za-z])[\)\]]?{_LETTER_END}",
        re.IGNORECASE,
    )
    out = []
    for m in pattern.finditer(text):
        raw = m.group(1)
        after = text[m.end(1):]
        # "the answer is a carcinoma": a lowercase letter, or "A", followed by a word is an article.
        if re.match(r"\s+[a-z]", after) and (raw.islower() or raw == "A"):
            next_word = re.match(r"\s+([a-z]+)", after)
            if not (raw == "A" and next_word and next_word.group(1) in _A_AS_LETTER_NEXT):
                continue
        if _negated(text, m.start(1)) or _negated(text, m.start()):
            continue
        letter = _valid(raw, n_options)
        if letter:
            out.append(letter)
            # "the answer is A or B": a hedge names both letters (so the tier fails as ambiguous).
            hedge = re.match(rf"\s*(?:or|and|/|,)\s*(?:option\s+)?[\(\[]?([A-Za-z])[\)\]]?{_LETTER_END}", after)
            if hedge and _valid(hedge.group(1), n_options):
                out.append(str(_valid(hedge.group(1), n_options)))
    return out


_REVERSE_CUE = re.compile(
    r"(?<![A-Za-z0-9'’\-])[\(\[]?([A-Z])[\)\]]?\s+(?:is|would\s+be|seems|appears)\s+(?:to\s+be\s+)?(?:the\s+)?"
    r"(?:correct|right|best|most\s+likely|answer)\b")


def _reverse_cue_letters(text: str, n_options: int) -> list[str]:
    """``B is correct``, ``(D) is the correct answer``: a capital letter asserted by what follows it."""
    out = []
    for m in _REVERSE_CUE.finditer(text):
        letter = _valid(m.group(1), n_options)
        if letter and not _negated(text, m.start()):
            out.append(letter)
    return out


_ANSWER_CUE = (r"\banswer\b|\bcorrect\s+(?:option|choice|letter|one)\b|\bbest\s+(?:option|choice|answer)\b"
               r"|\bfinal\s+(?:option|choice)\b")
_OPTION_CUE = (r"\b(?:option|choice|letter)\b"
               r"|\bI(?:'d|’d|\s+would)?\s+(?:choose|select|pick|go\s+with)\b|\bit(?:'|’)?s\b|\bit\s+is\b")


def _label_letters(text: str, n_options: int) -> list[str]:
    """``(B)``, ``[B]``, ``B)`` anywhere; ``B.`` / ``B:`` / ``B -`` at the start of the reply or a line."""
    out = []
    for m in re.finditer(r"(?:^|(?<=[\s(\[]))[\(\[]([A-Za-z])[\)\]]|(?:^|(?<=\s))([A-Za-z])\)", text):
        raw = m.group(1) or m.group(2)
        letter = _valid(raw, n_options)
        if letter and not _negated(text, m.start()):
            out.append(letter)
    for m in re.finditer(r"(?m)^\s*([A-Za-z])\s*(?:[.:]|\s[-–])(?=\s|$)", text):
        letter = _valid(m.group(1), n_options)
        if letter:
            out.append(letter)
    return out


def _bare_letters(text: str, n_options: int) -> list[str]:
    out = []
    # A letter standing alone between spaces or punctuation (never glued to other characters).
    for m in re.finditer(r"(?:^|(?<=[\s(\[\"“,;:]))([A-Z])(?=$|[\s.,;:!?)\]\"”])", text):
        raw = m.group(1)
        letter = _valid(raw, n_options)
        if not letter:
            continue
        after = text[m.end():]
        nxt = re.match(r"\s+([a-z]+)", after)
        if raw in ("A", "I") and nxt and nxt.group(1) not in _A_AS_LETTER_NEXT:
            continue  # the article "A tumour", the pronoun "I think"
        if _negated(text, m.start()):
            continue
        out.append(letter)
    return out


def _text_letter(text: str, options: Sequence[str]) -> str | None:
    """The letter of the one option the reply names (exact after normalisation, else contained)."""
    reply = normalize_option_text(text)
    norm = [normalize_option_text(o) for o in options]
    exact = [i for i, o in enumerate(norm) if o and o == reply]
    if len(exact) == 1:
        return LETTERS[exact[0]]
    # Spans of each option's occurrences (whole words) in the reply.
    padded = f" {reply} "
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, o in enumerate(norm):
        if not o:
            continue
        found = [(m.start(), m.start() + len(o)) for m in re.finditer(rf"(?<= ){re.escape(o)}(?= )", padded)]
        # An occurrence right after a negation ("not squamous cell carcinoma") does not name the option.
        found = [s for s in found if not _TEXT_NEGATION.search(padded[:s[0]])]
        if found:
            spans[i] = found
    named = []
    for i, occ in spans.items():
        # Count an option only where its occurrence is not inside a longer option's occurrence.
        free = [s for s in occ if not any(j != i and len(norm[j]) > len(norm[i]) and a <= s[0] and s[1] <= b
                                          for j, other in spans.items() for a, b in other)]
        if free:
            named.append(i)
    if len(named) == 1:
        return LETTERS[named[0]]
    return None


def _cued_text_letters(text: str, options: Sequence[str]) -> list[str]:
    """``Answer: stroma in the lower right``: the one option named between an answer cue and the line's end.

    A reply that reasons first names several options before its answer; the cue says which one it chose.
    """
    cues = [m for m in re.finditer(rf"(?:{_ANSWER_CUE})\s*(?::|\bis\b)", text, re.IGNORECASE)
            if not _negated(text, m.start())]
    out = []
    for i, m in enumerate(cues):
        end = cues[i + 1].start() if i + 1 < len(cues) else len(text)  # a segment stops at the next cue
        segment = text[m.end():end].split("\n", 1)[0]
        letter = _text_letter(segment, options)
        if letter:
            out.append(letter)
    return out


def parse_closed_answer(text: str, options: Sequence[str]) -> ParsedAnswer:
    """Which option a free-text reply chose, by the fixed tiers in the module docstring.

    Args:
        text: the model's raw reply.
        options: the option texts in the order they were presented (without letter prefixes).

    Returns:
        A `ParsedAnswer`; `letter` is None (FAILED) for no answer or two different answers.
    """
    n = len(options)
    if n < 2 or n > len(LETTERS):
        raise ValueError(f"parse_closed_answer: need 2..{len(LETTERS)} options, got {n}")
    clean = _clean(text)
    text_letter = _text_letter(clean, options)

    def done(p: ParsedAnswer) -> ParsedAnswer:
        return ParsedAnswer(p.letter, p.method, p.reason, text_letter)

    whole = re.fullmatch(r"[\s(\[]*([A-Za-z])[\s)\].:!]*", clean)
    if whole and _valid(whole.group(1), n):
        return done(ParsedAnswer(_valid(whole.group(1), n), "letter"))
    answer_cued = _cue_letters(clean, _ANSWER_CUE, n) + _reverse_cue_letters(clean, n)
    if not answer_cued:
        answer_cued = _cued_text_letters(clean, options)
    for method, letters in (("answer-cue", answer_cued),
                            ("option-cue", _cue_letters(clean, _OPTION_CUE, n)),
                            ("label", _label_letters(clean, n))):
        decided = _decide(letters, method)
        if decided is not None:
            return done(decided)
    if text_letter is not None:
        return done(ParsedAnswer(text_letter, "text"))
    decided = _decide(_bare_letters(clean, n), "bare-letter")
    if decided is not None:
        return done(decided)
    return done(ParsedAnswer(None, "failed", "no answer"))
