"""A flawed predictions file never raises a score: it fails naming the line, or (asked to) counts as FAILED.

The example from the bug report: five closed questions, four answered right and one wrong. Intact,
the file scores 4/5 = 0.8. With the wrong answer's line torn it used to score 4/4 = 1.0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pathchat.cli import main
from pathchat.evaluation.tasks import Question, write_questions_jsonl
from pathchat.utils.atomic import read_jsonl


def _task(tmp_path: Path) -> tuple[Path, list[str]]:
    qs = [Question(str(i), f"s{i}", f"q{i}?", ("tumor", "stroma", "fat"), "A", "closed", "kind", "group")
          for i in range(5)]
    path = tmp_path / "task.jsonl"
    write_questions_jsonl(path, qs)
    lines = [json.dumps({"id": str(i), "text": "A" if i != 2 else "B"}) for i in range(5)]  # question 2 wrong
    return path, lines


def _eval(task: Path, pred: Path, out: Path, *extra: str) -> int:
    return main(["eval", "--task", "questions", "--data", str(task), "--predictions", str(pred), "--out", str(out),
                 "--no-progress", *extra])


def _overall(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["conditions"]["slide"]["closed"]["overall"]


def test_intact_file_scores_four_of_five(tmp_path):
    task, lines = _task(tmp_path)
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join(lines) + "\n")
    assert _eval(task, pred, tmp_path / "out") == 0
    assert _overall(tmp_path / "out") == {"n": 5, "correct": 4, "accuracy": pytest.approx(0.8), "failed": 0}


def test_a_torn_line_fails_naming_file_and_line_or_counts_as_failed(tmp_path, capsys):
    task, lines = _task(tmp_path)
    pred = tmp_path / "torn.jsonl"
    pred.write_text("\n".join(lines[:2] + [lines[2][:9]] + lines[3:]) + "\n")
    out = tmp_path / "out"
    assert _eval(task, pred, out) == 1
    err = capsys.readouterr().err
    assert f"{pred}: line 3: not valid JSON" in err and "Traceback" not in err
    assert not out.exists()  # a refused file leaves nothing behind
    assert _eval(task, pred, out, "--bad-predictions", "failed") == 0
    # the torn question is scored as FAILED: 4/5, never 4/4
    assert _overall(out) == {"n": 5, "correct": 4, "accuracy": pytest.approx(0.8), "failed": 1}
    results = json.loads((out / "results.json").read_text())
    assert results["coverage"]["failed_unanswered_questions"] == 1
    assert "line 3" in results["coverage"]["prediction_file_problems"][0]
    assert "Scored as FAILED: 1 questions" in (out / "results.md").read_text()


def test_duplicate_ids_fail_or_count_the_question_as_failed(tmp_path, capsys):
    task, lines = _task(tmp_path)
    pred = tmp_path / "dup.jsonl"
    pred.write_text("\n".join([*lines, json.dumps({"id": "2", "text": "A"})]) + "\n")  # a later, right answer
    assert _eval(task, pred, tmp_path / "a") == 1
    assert "line 6: id '2' is answered twice" in capsys.readouterr().err
    assert _eval(task, pred, tmp_path / "b", "--bad-predictions", "failed") == 0
    assert _overall(tmp_path / "b") == {"n": 5, "correct": 4, "accuracy": pytest.approx(0.8), "failed": 1}


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_an_empty_file_is_an_error_or_all_failed(tmp_path, capsys, content):
    task, _ = _task(tmp_path)
    pred = tmp_path / "empty.jsonl"
    pred.write_text(content)
    assert _eval(task, pred, tmp_path / "a") == 1
    assert str(pred) in capsys.readouterr().err
    assert _eval(task, pred, tmp_path / "b", "--bad-predictions", "failed") == 0
    assert _overall(tmp_path / "b") == {"n": 5, "correct": 0, "accuracy": 0.0, "failed": 5}


def test_a_failed_eval_leaves_no_run_config_that_refuses_the_corrected_rerun(tmp_path, capsys):
    task, lines = _task(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    bad = tmp_path / "first.jsonl"
    bad.write_text("not json\n")
    assert _eval(task, bad, out) == 1
    assert not (out / "run_config.json").exists()
    fixed = tmp_path / "fixed.jsonl"  # another file name: another setting, still accepted
    fixed.write_text("\n".join(lines) + "\n")
    assert _eval(task, fixed, out) == 0
    assert len(read_jsonl(out / "predictions.jsonl")) == 5
    capsys.readouterr()
