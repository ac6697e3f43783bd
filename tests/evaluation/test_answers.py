"""The closed-answer parser on a table of real-style model replies."""

from __future__ import annotations

import pytest

from pathchat.evaluation.answers import FAILED, normalize_option_text, parse_closed_answer

LUNG = ["Squamous cell carcinoma", "Small cell lung carcinoma", "Papillary adenocarcinoma", "Alveolar adenoma"]
NESTED = ["carcinoma", "invasive carcinoma", "carcinoma in situ", "benign"]
GRADE = ["grade 1", "grade 2", "grade 3", "grade 4"]
YESNO = ["yes", "no", "cannot be determined", "not applicable"]
QUADRANT = ["lower right", "upper left", "lower left", "upper right"]

# (reply, options, expected letter or FAILED, expected method)
CASES = [
    ("B", LUNG, "B", "letter"),
    ("b", LUNG, "B", "letter"),
    (" C. ", LUNG, "C", "letter"),
    ("(D)", LUNG, "D", "letter"),
    ("**C**", LUNG, "C", "letter"),
    ("[A]", LUNG, "A", "letter"),
    ("A)", LUNG, "A", "letter"),
    ("Answer: A", LUNG, "A", "answer-cue"),
    ("answer: b", LUNG, "B", "answer-cue"),
    ("**Answer:** C", LUNG, "C", "answer-cue"),
    ("The answer is B", LUNG, "B", "answer-cue"),
    ("The answer is B.", LUNG, "B", "answer-cue"),
    ("The correct answer is (C) Papillary adenocarcinoma.", LUNG, "C", "answer-cue"),
    ("The correct option is D", LUNG, "D", "answer-cue"),
    ("Based on the slide, the answer is C, not A.", LUNG, "C", "answer-cue"),
    ("The answer would be option B because small cells are seen.", LUNG, "B", "answer-cue"),
    ("Answer:\n\nD) Alveolar adenoma", LUNG, "D", "answer-cue"),
    ("B is correct because squamous cell carcinoma is excluded.", LUNG, "B", "answer-cue"),
    ("Option A is wrong; (D) is the correct answer.", LUNG, "D", "answer-cue"),
    # Reasoning that names several options first, then the one after the cue.
    ("Two separate regions: tumor in the upper left and stroma in the lower right. Answer: stroma in the lower right.",
     QUADRANT, "A", "answer-cue"),
    ("Small cells and squamous nests are absent. The answer is papillary adenocarcinoma.", LUNG, "C", "answer-cue"),
    ("Upper left has tumor, lower left has stroma.\nAnswer: lower left\nupper right is empty", QUADRANT, "C",
     "answer-cue"),
    ("(B) Small cell lung carcinoma is the answer, not (A).", LUNG, "B", "label"),
    ("Option C", LUNG, "C", "option-cue"),
    ("I would choose B.", LUNG, "B", "option-cue"),
    ("Between A and B, I'd pick B", LUNG, "B", "option-cue"),
    ("Not A, it's C", LUNG, "C", "option-cue"),
    ("It is D.", LUNG, "D", "option-cue"),
    ("C) Papillary adenocarcinoma", LUNG, "C", "label"),
    ("B. Small cell lung carcinoma", LUNG, "B", "label"),
    ("(A) Squamous cell carcinoma", LUNG, "A", "label"),
    ("c) papillary adenocarcinoma", LUNG, "C", "label"),
    ("D: alveolar adenoma is the most likely condition.", LUNG, "D", "label"),
    ("Papillary adenocarcinoma", LUNG, "C", "text"),
    ("papillary adenocarcinoma.", LUNG, "C", "text"),
    ("The tumour shows features of a small cell lung carcinoma.", LUNG, "B", "text"),
    ("A squamous cell carcinoma is most likely present.", LUNG, "A", "text"),
    ("This is not squamous cell carcinoma; it is a papillary adenocarcinoma.", LUNG, "C", "text"),
    ("invasive carcinoma", NESTED, "B", "text"),
    ("The lesion is an invasive carcinoma of the breast.", NESTED, "B", "text"),
    ("Carcinoma in situ", NESTED, "C", "text"),
    ("carcinoma", NESTED, "A", "text"),
    ("grade 3", GRADE, "C", "text"),
    ("Grade 3.", GRADE, "C", "text"),
    ("no", YESNO, "B", "text"),
    ("I think B is right.", LUNG, "B", "answer-cue"),
    ("I think B, given the small cells.", LUNG, "B", "bare-letter"),
    ("Most consistent with B", LUNG, "B", "bare-letter"),
    # Ambiguous or empty: FAILED.
    ("A or B", LUNG, FAILED, "failed"),
    ("Either A or C could be correct.", LUNG, FAILED, "failed"),
    ("The answer is A or B", LUNG, FAILED, "failed"),
    ("Answer: A. Answer: C.", LUNG, FAILED, "failed"),
    ("Answer: upper left. Answer: lower left.", QUADRANT, FAILED, "failed"),
    ("Tumor in the upper left and stroma in the lower right.", QUADRANT, FAILED, "failed"),
    ("I cannot determine the answer from the image.", LUNG, FAILED, "failed"),
    ("", LUNG, FAILED, "failed"),
    ("The slide shows a malignant tumour.", LUNG, FAILED, "failed"),
    ("Squamous cell carcinoma or papillary adenocarcinoma", LUNG, FAILED, "failed"),
    ("A) Squamous cell carcinoma\nB) Small cell lung carcinoma\nC) Papillary adenocarcinoma", LUNG, FAILED, "failed"),
    ("E", LUNG, FAILED, "failed"),
    ("Answer: E", LUNG, FAILED, "failed"),
    ("A tumour is present, but its type cannot be determined.", LUNG, FAILED, "failed"),
    ("carcinoma and benign areas", NESTED, FAILED, "failed"),
]


@pytest.mark.parametrize(("reply", "options", "expected", "method"), CASES)
def test_parser_table(reply: str, options: list[str], expected: str, method: str) -> None:
    parsed = parse_closed_answer(reply, options)
    assert (parsed.label, parsed.method) == (expected, method), parsed


def test_table_is_wide() -> None:
    assert len(CASES) >= 40
    assert sum(expected == FAILED for _, _, expected, _ in CASES) >= 10


def test_failed_reasons() -> None:
    assert parse_closed_answer("A or B", LUNG).reason == "ambiguous: A, B"
    assert parse_closed_answer("no idea", LUNG).reason == "no answer"
    assert parse_closed_answer("no idea", LUNG).failed


def test_letter_text_conflict_is_flagged_but_letter_wins() -> None:
    parsed = parse_closed_answer("B) Papillary adenocarcinoma", LUNG)
    assert parsed.letter == "B" and parsed.text_letter == "C" and parsed.conflict
    agreed = parse_closed_answer("C) Papillary adenocarcinoma", LUNG)
    assert agreed.text_letter == "C" and not agreed.conflict


def test_parser_is_deterministic_and_validates() -> None:
    assert parse_closed_answer("The answer is B", LUNG) == parse_closed_answer("The answer is B", LUNG)
    with pytest.raises(ValueError, match="options"):
        parse_closed_answer("A", ["only one"])


def test_two_option_question_limits_letters() -> None:
    assert parse_closed_answer("C", ["yes", "no"]).label == FAILED
    assert parse_closed_answer("B", ["yes", "no"]).label == "B"


def test_normalize_option_text() -> None:
    assert normalize_option_text("  Grade 3. ") == "grade 3"
    assert normalize_option_text("pT2, N1a, Mx") == "pt2 n1a mx"
