"""Every real benchmark file loads with its exact counts; malformed files fail naming the item."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fixtures import PATHVQA, SLIDEBENCH, WSI_VQA_TEST, WSI_VQA_TRAIN

from pathchat.evaluation.tasks import (
    REPORT_PROMPT,
    Question,
    TaskFormatError,
    load_task,
    read_questions_jsonl,
    write_questions_jsonl,
)

SLIDEBENCH_CATEGORIES = {
    "Disease Classification": 359, "Grading": 290, "Staging": 279, "Tissue Architecture and Arrangement": 150,
    "Histopathological Changes": 118, "Tumor Characteristics": 83, "Differential Diagnosis": 52,
    "Treatment Guidance": 47, "Cytomorphological Characteristics": 40, "Prognostic Assessment": 31,
    "Disease Detection": 22, "Biomarker Analysis": 12, "Risk Factors": 11,
}


def test_slidebench_counts() -> None:
    task = load_task("slidebench", SLIDEBENCH)
    counts = task.counts()
    assert counts["questions"] == 1494 and counts["slides"] == 591
    assert counts["categories"] == SLIDEBENCH_CATEGORIES
    assert counts["groups"] == {"Clinical": 101, "Diagnosis": 1002, "Microscopy": 391}
    assert counts["option_counts"] == {"4": 1494}
    assert counts["closed_answers"] == {"A": 224, "B": 618, "C": 540, "D": 112}
    first = task.questions[0]
    assert first.id == "0" and first.slide == "TCGA-05-4244-01Z-00-DX1" and first.answer == "C"
    assert first.options == ("Squamous cell carcinoma", "Small cell lung carcinoma", "Papillary adenocarcinoma",
                             "Alveolar adenoma")
    assert first.prompt().splitlines()[1:3] == ["A) Squamous cell carcinoma", "B) Small cell lung carcinoma"]
    assert not any(o[:2] in ("A)", "B)", "C)", "D)") for q in task.questions for o in q.options or ())


def test_slidebench_official_csv_layout(tmp_path: Path) -> None:
    csv_path = tmp_path / "SlideBench-VQA-TCGA.csv"
    csv_path.write_text("Slide,Tumor,Broad Category,Narrow Category,Question,A,B,C,D,Answer\n"
                        "TCGA-X,BRCA,Diagnosis,Grading,What grade?,G1,G2,G3,G4,C\n"
                        'TCGA-Y,LUAD,Microscopy,Tumor Characteristics,"Size, roughly?",1 cm,2 cm,3 cm,4 cm,A\n')
    task = load_task("slidebench", csv_path)
    assert [(q.id, q.slide, q.category, q.group, q.answer) for q in task.questions] == [
        ("0", "TCGA-X", "Grading", "Diagnosis", "C"), ("1", "TCGA-Y", "Tumor Characteristics", "Microscopy", "A")]
    assert task.questions[1].question == "Size, roughly?"


def test_wsi_vqa_test_counts() -> None:
    counts = load_task("wsi-vqa", WSI_VQA_TEST).counts()
    assert counts["questions"] == 735 and counts["slides"] == 86
    assert counts["kinds"] == {"closed": 390, "open": 345}
    assert counts["option_counts"] == {"2": 2, "4": 388}
    assert counts["categories"] == {"closed": 390, "her2": 35, "histological_type": 81,
                                    "progesterone_receptor": 77, "survival time": 76, "vital_status": 76}
    assert counts["loading"]["answers_trailing_period"] == 0 and counts["loading"]["unmatched_dropped"] == 0


def test_wsi_vqa_train_noise_is_normalised_or_counted() -> None:
    task = load_task("wsi-vqa", WSI_VQA_TRAIN)
    stats = task.stats
    # 29 closed answers match no choice exactly: 8 only by a trailing ".", 21 are other noise.
    assert stats["answers_trailing_period"] == 8 and stats["unmatched_dropped"] == 21
    assert stats["closed_with_duplicate_choices"] == 2
    counts = task.counts()
    assert counts["questions"] == 7139 - 21 and counts["slides"] == 804
    assert counts["kinds"] == {"closed": 3724 - 21, "open": 3415}
    by_id = {q.id: q for q in task.questions}
    raw = json.loads(WSI_VQA_TRAIN.read_text())
    for qid in stats["trailing_period_ids"]:
        q = by_id[qid]
        assert q.options is not None and q.options[q.answer_index] == raw[int(qid)]["Answer"].strip().rstrip(".")
    dropped = {u["id"] for u in stats["unmatched"]}
    assert not dropped & set(by_id)
    assert any(u["answer"] == "the correct option is c(grade 3)." for u in stats["unmatched"])
    # Ids are positions in the source file.
    assert all(raw[int(q.id)]["Question"].strip() == q.question for q in task.questions[:200])


def test_pathvqa_counts() -> None:
    counts = load_task("pathvqa", PATHVQA).counts()
    assert counts["questions"] == 5429 and counts["slides"] == 955
    assert counts["categories"] == {"yes/no": 2852, "open": 5429 - 2852}
    assert counts["kinds"] == {"open": 5429}


def test_questions_jsonl_round_trip_and_report(tmp_path: Path) -> None:
    qs = [Question("q1", "s1", "Which?", ("x", "y"), "B", "closed", "shape", "synthetic"),
          Question("q2", "s2", "What colour?", None, "red", "open", "colour", "synthetic")]
    path = tmp_path / "q.jsonl"
    assert write_questions_jsonl(path, qs) == 2
    assert load_task("synthetic", path).questions == qs
    reports = tmp_path / "r.jsonl"
    reports.write_text(json.dumps({"id": "r1", "slide": "s1", "report": "Invasive carcinoma."}) + "\n")
    (q,) = load_task("report", reports).questions
    assert (q.kind, q.question, q.answer) == ("report", REPORT_PROMPT, "Invasive carcinoma.")


@pytest.mark.parametrize(("line", "problem"), [
    ({"id": "1", "slide": "s", "question": "q", "options": ["a", "b"], "answer": "C", "kind": "closed"},
     "answer 'C' is not one of the letters A..B"),
    ({"id": "1", "slide": "s", "question": "q", "options": None, "answer": "A", "kind": "closed"}, "needs 'options'"),
    ({"id": "1", "slide": "s", "question": "q", "answer": "A", "kind": "multiple"}, "kind 'multiple'"),
    ({"id": "1", "question": "q", "answer": "A", "kind": "open", "options": None}, "missing key 'slide'"),
])
def test_malformed_questions_name_line_and_problem(tmp_path: Path, line: dict, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(TaskFormatError, match="bad.jsonl: line 1") as err:
        read_questions_jsonl(path)
    assert problem in str(err.value)


def test_bad_slidebench_prefix_and_unknown_task(tmp_path: Path) -> None:
    path = tmp_path / "sb.json"
    path.write_text(json.dumps({"samples": [{"slide_id": "s", "question": "q", "choices": ["A) x", "C) y"],
                                             "answer": "A", "category": "Diagnosis - Grading"}]}))
    with pytest.raises(TaskFormatError, match=r"sample 0: choice 1 'C\) y' lacks the prefix 'B\) '"):
        load_task("slidebench", path)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("nope", path)
    with pytest.raises(TaskFormatError, match="no such file"):
        load_task("pathvqa", tmp_path / "missing.json")
