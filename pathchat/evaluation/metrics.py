"""Scores: closed accuracy (per category, group, overall, FAILED), option-order consistency, open and
yes/no answers, and report metrics from pycocoevalcap.

Everything here is a pure function of already-parsed records, so scores can be recomputed from a
`predictions.jsonl` without a model. Open answers use the SQuAD normalisation (lowercase, no
punctuation, no articles, single spaces) for exact match and token F1. Report metrics (BLEU-1..4,
METEOR, ROUGE-L, CIDEr) are pycocoevalcap's, on its PTB tokenisation: the reference COCO caption
implementations, not re-implemented here. The PTB tokeniser and METEOR run Java (bundled jars).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import re
import shutil
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ClosedRecord",
    "OpenRecord",
    "closed_scores",
    "consistency",
    "exact_match",
    "normalize_answer",
    "open_scores",
    "parse_yes_no",
    "report_scores",
    "token_f1",
]


@dataclass(frozen=True)
class ClosedRecord:
    """One scored closed answer: the question's category and group, the chosen original option letter
    (None = FAILED) and the reference letter."""

    category: str
    group: str
    choice: str | None
    answer: str

    @property
    def correct(self) -> bool:
        return self.choice is not None and self.choice == self.answer


def _acc(rows: Sequence[ClosedRecord]) -> dict[str, Any]:
    n = len(rows)
    correct = sum(r.correct for r in rows)
    failed = sum(r.choice is None for r in rows)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None, "failed": failed}


def closed_scores(records: Sequence[ClosedRecord]) -> dict[str, Any]:
    """Accuracy overall, per category and per group; FAILED counts; predicted-letter distribution.

    Returns:
        ``{"overall": {n, correct, accuracy, failed}, "categories": {name: {...}}, "groups": {...},
        "predicted_letters": {"A": .., "FAILED": ..}, "answer_letters": {...}}``.
    """
    by_cat: dict[str, list[ClosedRecord]] = defaultdict(list)
    by_group: dict[str, list[ClosedRecord]] = defaultdict(list)
    for r in records:
        by_cat[r.category].append(r)
        by_group[r.group].append(r)
    return {
        "overall": _acc(records),
        "categories": {k: _acc(v) for k, v in sorted(by_cat.items())},
        "groups": {k: _acc(v) for k, v in sorted(by_group.items())},
        "predicted_letters": dict(sorted(Counter(r.choice or "FAILED" for r in records).items())),
        "answer_letters": dict(sorted(Counter(r.answer for r in records).items())),
    }


def consistency(choices: Mapping[str, Sequence[str | None]]) -> dict[str, Any]:
    """Option-order consistency: the share of questions whose chosen option *content* (original letter)
    is the same, and not FAILED, in every presentation order.

    Args:
        choices: question id -> the original-option letter chosen under each order (None = FAILED).
            Questions asked in fewer than 2 orders are not counted.
    """
    asked = {k: v for k, v in choices.items() if len(v) >= 2}
    consistent = sum(1 for v in asked.values() if v[0] is not None and all(c == v[0] for c in v))
    n = len(asked)
    return {"n": n, "consistent": consistent, "share": consistent / n if n else None,
            "orders_per_question": dict(sorted(Counter(len(v) for v in asked.values()).items()))}


# ------------------------------------------------------------------------------------------ open answers

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def token_f1(prediction: str, reference: str) -> float:
    """Token-overlap F1 of the normalised texts (1.0 when both are empty)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_yes_no(text: str) -> str | None:
    """``"yes"``/``"no"`` from a reply: its first word if that is yes/no, else the only one of the two
    words it contains; None (FAILED) when it has neither or both."""
    words = normalize_answer(text).split()
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    found = {w for w in words if w in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class OpenRecord:
    """One open answer: category (``yes/no`` questions are scored by yes/no accuracy), group, texts."""

    category: str
    group: str
    prediction: str
    reference: str


def _open_block(rows: Sequence[OpenRecord]) -> dict[str, Any]:
    n = len(rows)
    yn = [r for r in rows if r.category == "yes/no"]
    free = [r for r in rows if r.category != "yes/no"]
    out: dict[str, Any] = {"n": n}
    if free:
        out["exact_match"] = sum(exact_match(r.prediction, r.reference) for r in free) / len(free)
        out["token_f1"] = sum(token_f1(r.prediction, r.reference) for r in free) / len(free)
        out["n_open"] = len(free)
    if yn:
        parsed = [parse_yes_no(r.prediction) for r in yn]
        out["yes_no_accuracy"] = sum(p == r.reference.lower() for p, r in zip(parsed, yn, strict=True)) / len(yn)
        out["yes_no_failed"] = sum(p is None for p in parsed)
        out["n_yes_no"] = len(yn)
    return out


def open_scores(records: Sequence[OpenRecord]) -> dict[str, Any]:
    """Exact match and token F1 (free-text answers), yes/no accuracy and FAILED (yes/no answers):
    overall, per category and per group."""
    by_cat: dict[str, list[OpenRecord]] = defaultdict(list)
    by_group: dict[str, list[OpenRecord]] = defaultdict(list)
    for r in records:
        by_cat[r.category].append(r)
        by_group[r.group].append(r)
    return {"overall": _open_block(records),
            "categories": {k: _open_block(v) for k, v in sorted(by_cat.items())},
            "groups": {k: _open_block(v) for k, v in sorted(by_group.items())}}


# ---------------------------------------------------------------------------------------------- reports


@functools.lru_cache(maxsize=1)
def _meteor() -> Any:
    """One METEOR java process per Python process: loading its paraphrase table takes seconds, and a
    report task scores three conditions. It is stopped at exit."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()

    def stop() -> None:
        with contextlib.suppress(OSError, ValueError):
            scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()

    atexit.register(stop)
    return scorer


def java_available() -> bool:
    """pycocoevalcap's PTB tokeniser and METEOR run ``java``."""
    return shutil.which("java") is not None


def report_scores(references: Mapping[str, str | Iterable[str]], predictions: Mapping[str, str]) -> dict[str, Any]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of generated reports against references (pycocoevalcap).

    Args:
        references: id -> reference text (or several references).
        predictions: id -> generated text; must have exactly the ids of `references`.

    Returns:
        ``{"n", "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}`` (corpus-level; BLEU is the COCO
        corpus BLEU with the closest reference length).

    Raises:
        RuntimeError: java is not installed (needed by the PTB tokeniser and METEOR).
        ValueError: the id sets differ, or there is nothing to score.
    """
    if set(references) != set(predictions):
        raise ValueError(f"report_scores: {len(set(references) ^ set(predictions))} ids are not in both "
                         "references and predictions")
    if not references:
        raise ValueError("report_scores: nothing to score")
    if not java_available():
        raise RuntimeError("report metrics need java (pycocoevalcap's PTB tokeniser and METEOR); "
                           "install a JRE, e.g. apt-get install default-jre-headless")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = sorted(references)
    gts_raw = {i: [{"caption": r} for r in ([references[i]] if isinstance(references[i], str)
                                             else list(references[i]))] for i in ids}
    res_raw = {i: [{"caption": predictions[i]}] for i in ids}
    # One tokeniser run (one JVM start) for references and predictions together.
    both = PTBTokenizer().tokenize({**{("ref", i): v for i, v in gts_raw.items()},
                                    **{("hyp", i): v for i, v in res_raw.items()}})
    gts = {i: both[("ref", i)] for i in ids}
    res = {i: both[("hyp", i)] for i in ids}
    out: dict[str, Any] = {"n": len(ids)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU-{k + 1}": float(v) for k, v in enumerate(bleu)})
    out["METEOR"] = float(_meteor().compute_score(gts, res)[0])
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out
