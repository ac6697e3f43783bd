"""Metrics on hand-computed examples."""

from __future__ import annotations

import pytest

from pathchat.evaluation.metrics import (
    ClosedRecord,
    OpenRecord,
    closed_scores,
    consistency,
    exact_match,
    normalize_answer,
    open_scores,
    parse_yes_no,
    report_scores,
    token_f1,
)


def test_closed_scores_by_category_group_and_failed() -> None:
    records = [ClosedRecord("Grading", "Diagnosis", "A", "A"), ClosedRecord("Grading", "Diagnosis", None, "B"),
               ClosedRecord("Staging", "Diagnosis", "C", "D"), ClosedRecord("Size", "Microscopy", "D", "D"),
               ClosedRecord("Size", "Microscopy", "B", "B")]
    s = closed_scores(records)
    assert s["overall"] == {"n": 5, "correct": 3, "accuracy": 0.6, "failed": 1}
    assert s["categories"]["Grading"] == {"n": 2, "correct": 1, "accuracy": 0.5, "failed": 1}
    assert s["categories"]["Staging"]["accuracy"] == 0.0
    assert s["groups"]["Diagnosis"] == {"n": 3, "correct": 1, "accuracy": pytest.approx(1 / 3), "failed": 1}
    assert s["groups"]["Microscopy"]["accuracy"] == 1.0
    assert s["predicted_letters"] == {"A": 1, "B": 1, "C": 1, "D": 1, "FAILED": 1}
    assert closed_scores([])["overall"]["accuracy"] is None


def test_consistency_counts_same_content_never_failed() -> None:
    c = consistency({"q1": ["A", "A", "A"], "q2": ["A", "B", "A"], "q3": [None, None, None], "q4": ["C"]})
    assert c == {"n": 3, "consistent": 1, "share": pytest.approx(1 / 3), "orders_per_question": {3: 3}}


def test_open_normalisation_em_f1() -> None:
    assert normalize_answer("The Histone  subunits!") == "histone subunits"
    assert exact_match("An Infiltrating Ductal Carcinoma.", "infiltrating ductal carcinoma")
    assert not exact_match("ductal carcinoma", "infiltrating ductal carcinoma")
    assert token_f1("positively charged ions", "positively charged") == pytest.approx(0.8)
    assert token_f1("alive", "dead") == 0.0
    assert token_f1("", "") == 1.0


@pytest.mark.parametrize(("reply", "expected"), [
    ("Yes, it is.", "yes"), ("No.", "no"), ("I think so, yes", "yes"), ("It is not yes or no", None),
    ("The nuclei are enlarged", None), ("", None), ("NO", "no"),
])
def test_parse_yes_no(reply: str, expected: str | None) -> None:
    assert parse_yes_no(reply) == expected


def test_open_scores_mix_yes_no_and_free_text() -> None:
    records = [OpenRecord("yes/no", "pathvqa", "Yes.", "yes"), OpenRecord("yes/no", "pathvqa", "maybe", "no"),
               OpenRecord("open", "pathvqa", "the histone subunits", "histone subunits"),
               OpenRecord("open", "pathvqa", "positively charged ions", "positively charged")]
    s = open_scores(records)["overall"]
    assert s["n"] == 4 and s["n_yes_no"] == 2 and s["n_open"] == 2
    assert s["yes_no_accuracy"] == 0.5 and s["yes_no_failed"] == 1
    assert s["exact_match"] == 0.5
    assert s["token_f1"] == pytest.approx((1.0 + 0.8) / 2)


@pytest.mark.slow
def test_report_scores_hand_computed() -> None:
    refs = {"r1": "a b c e", "r2": "x y z"}
    hyps = {"r1": "a b c d", "r2": "x y z"}
    s = report_scores(refs, hyps)
    assert s["n"] == 2
    assert s["BLEU-1"] == pytest.approx(6 / 7, abs=1e-6)  # 6 of 7 unigrams match; equal lengths, no penalty
    assert s["BLEU-2"] == pytest.approx((6 / 7 * 4 / 5) ** 0.5, abs=1e-6)
    assert s["ROUGE-L"] == pytest.approx((0.75 + 1.0) / 2, abs=1e-6)  # LCS 3 of 4, and identical
    # CIDEr: r2 identical (cosine 1 for 1..3-grams, no 4-grams), r1 cosines 3/4, 2/3, 1/2, 0; times 10.
    assert s["CIDEr"] == pytest.approx((10 * 3 / 4 + 10 * (3 / 4 + 2 / 3 + 1 / 2) / 4) / 2, abs=1e-4)
    assert 0.3 < s["METEOR"] < 1.0
    with pytest.raises(ValueError, match="not in both"):
        report_scores({"a": "x"}, {"b": "x"})
