"""`pathchat eval` end to end on a tiny random checkpoint with stand-in features (a pipeline check:
scores on random features are never results), scoring of existing predictions, resume and controls."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from eval_fixtures import N_QUESTIONS, REPO, SLIDEBENCH

from pathchat.cli import main
from pathchat.evaluation.runner import option_order, slide_derangement
from pathchat.evaluation.tasks import Question, load_task, write_questions_jsonl
from pathchat.utils.atomic import read_jsonl

QUESTIONS = load_task("slidebench", SLIDEBENCH).questions


def _eval(*args: str | Path) -> int:
    return main(["eval", "--no-progress", *[str(a) for a in args]])


@pytest.mark.slow
def test_end_to_end_slidebench_with_controls_consistency_and_resume(
        tiny_checkpoint: Path, slidebench_features: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["--model", tiny_checkpoint, "--task", "slidebench", "--data", SLIDEBENCH, "--features",
            slidebench_features, "--out", out, "--limit", N_QUESTIONS, "--batch-size", 8, "--max-new-tokens", 6,
            "--consistency-repeats", 1]
    assert _eval(*args) == 0
    assert f"asked {N_QUESTIONS * 4}, already done 0" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["conditions"]) == {"slide", "shuffled_features", "zeroed_features"}
    for block in results["conditions"].values():
        closed = block["closed"]
        assert closed["overall"]["n"] == N_QUESTIONS
        assert sum(c["n"] for c in closed["categories"].values()) == N_QUESTIONS
        assert set(closed["groups"]) == {"Clinical", "Diagnosis", "Microscopy"}
        assert 0 <= closed["overall"]["failed"] <= N_QUESTIONS
    assert results["consistency"]["n"] == N_QUESTIONS
    assert results["coverage"]["missing_feature_questions"] == 0
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == N_QUESTIONS * 4  # slide, one option order, two controls
    by = {(r["id"], r["condition"]): r for r in rows}
    for q in QUESTIONS[:N_QUESTIONS]:
        assert by[(q.id, "shuffled_features")]["features_from"] != q.slide
        assert by[(q.id, "zeroed_features")]["features_from"] == q.slide
        assert by[(q.id, "option_order_1")]["order"] != [0, 1, 2, 3]
        assert by[(q.id, "slide")]["order"] == [0, 1, 2, 3]
        for cond in ("slide", "option_order_1", "shuffled_features", "zeroed_features"):
            row = by[(q.id, cond)]
            assert row["parsed"] in ("A", "B", "C", "D", "FAILED") and row["answer"] == q.answer
            assert isinstance(row["text"], str) and row["correct"] == (row["choice"] == q.answer)
    # The controls change what the model sees: some answers differ from the real-features ones.
    assert any(by[(q.id, "slide")]["text"] != by[(q.id, "zeroed_features")]["text"] for q in QUESTIONS[:N_QUESTIONS])
    md = (out / "results.md").read_text()
    assert f"| **overall** | {N_QUESTIONS} |" in md and "shuffled_features %" in md and "consistency" in md

    # Rerun: nothing asked again, same scores.
    assert _eval(*args) == 0
    assert f"asked 0, already done {N_QUESTIONS * 4}" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["conditions"] == results["conditions"]
    # Resume after losing the zeroed-control rows and a torn last line: only those are asked again.
    kept = [json.dumps(r) for r in rows if r["condition"] != "zeroed_features"]
    (out / "predictions.jsonl").write_text("\n".join(kept) + '\n{"id": "0", "cond')
    assert _eval(*args) == 0
    assert f"asked {N_QUESTIONS}, already done {N_QUESTIONS * 3}" in capsys.readouterr().out
    # Other settings into the same folder are refused.
    assert _eval(*[a if a != 6 else 7 for a in args]) == 1
    assert "holds a run with other settings" in capsys.readouterr().err


def test_missing_features_are_counted_or_fail_hard(tiny_checkpoint: Path, slidebench_features: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    features = tmp_path / "features"
    shutil.copytree(slidebench_features, features)
    (features / f"{QUESTIONS[0].slide}.h5").unlink()  # questions 0-3 are about this slide
    args = ["--model", tiny_checkpoint, "--task", "slidebench", "--data", SLIDEBENCH, "--features", features,
            "--limit", 6, "--max-new-tokens", 2, "--consistency-repeats", 0, "--no-controls"]
    assert _eval(*args, "--out", tmp_path / "a") == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["coverage"]["missing_feature_questions"] == 4
    assert results["coverage"]["missing_slides_sample"] == [QUESTIONS[0].slide]
    assert results["conditions"]["slide"]["closed"]["overall"]["n"] == 2
    assert set(results["conditions"]) == {"slide"} and "consistency" not in results
    assert "Not scored: 4 questions" in (tmp_path / "a" / "results.md").read_text()
    assert _eval(*args, "--out", tmp_path / "b", "--fail-on-missing") == 1
    assert "1 slides have no feature file" in capsys.readouterr().err


def test_score_jsonl_predictions_without_a_model(tmp_path: Path) -> None:
    qs = QUESTIONS[:10]
    texts = {q.id: f"The answer is {q.answer}" for q in qs[:5]}
    texts[qs[5].id] = qs[5].options[qs[5].answer_index]  # option text only
    texts[qs[6].id] = "D" if qs[6].answer != "D" else "A"  # wrong
    texts[qs[7].id] = "A or B"  # FAILED
    texts[qs[8].id] = f"({qs[8].answer})"
    pred = tmp_path / "pred.jsonl"  # question 9 has no prediction
    pred.write_text("".join(json.dumps({"id": int(k), "text": v}) + "\n" for k, v in texts.items()))
    assert _eval("--task", "slidebench", "--data", SLIDEBENCH, "--predictions", pred, "--out", tmp_path / "o",
                 "--limit", 10) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    overall = results["conditions"]["slide"]["closed"]["overall"]
    assert overall == {"n": 9, "correct": 7, "accuracy": pytest.approx(7 / 9), "failed": 1}
    assert results["coverage"]["missing_prediction_questions"] == 1
    assert set(results["conditions"]) == {"slide"}
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "o" / "predictions.jsonl")}
    assert rows[qs[7].id]["parsed"] == "FAILED" and rows[qs[7].id]["parse_reason"] == "ambiguous: A, B"
    assert rows[qs[5].id]["parse_method"] == "text" and rows[qs[5].id]["correct"]
    # A changed predictions file into the same folder is scored afresh (no stale rows).
    pred.write_text("".join(json.dumps({"id": k, "text": "I cannot tell"}) + "\n" for k in texts))
    assert _eval("--task", "slidebench", "--data", SLIDEBENCH, "--predictions", pred, "--out", tmp_path / "o",
                 "--limit", 10) == 0
    rescored = json.loads((tmp_path / "o" / "results.json").read_text())["conditions"]["slide"]["closed"]
    assert rescored["overall"] == {"n": 9, "correct": 0, "accuracy": 0.0, "failed": 9}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "99999", "text": "A"}) + "\n")
    assert _eval("--task", "slidebench", "--data", SLIDEBENCH, "--predictions", bad, "--out", tmp_path / "x") == 1


def _slidechat_csv(path: Path, questions: list[Question], outputs: list[str], slides: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Slide", "Tumor", "Broad Category", "Narrow Category", "Question", "A", "B", "C", "D", "Answer",
                    "Output"])
        for q, out, slide in zip(questions, outputs, slides, strict=True):
            assert q.options is not None
            w.writerow([slide, "X", q.group, q.category, q.question, *q.options, q.answer, out])


def test_score_slidechat_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qs = QUESTIONS[:6]
    outputs = [f"{q.answer}) {q.options[q.answer_index]}" for q in qs[:5]] + ["I cannot tell."]  # type: ignore[index]
    good = tmp_path / "slidechat.csv"
    _slidechat_csv(good, qs, outputs, [q.slide for q in qs])
    assert _eval("--task", "slidebench", "--data", SLIDEBENCH, "--predictions", good, "--out", tmp_path / "o",
                 "--limit", 6) == 0
    overall = json.loads((tmp_path / "o" / "results.json").read_text())["conditions"]["slide"]["closed"]["overall"]
    assert overall == {"n": 6, "correct": 5, "accuracy": pytest.approx(5 / 6), "failed": 1}
    shifted = tmp_path / "shifted.csv"
    _slidechat_csv(shifted, qs, outputs, [q.slide for q in qs[1:]] + ["TCGA-ZZ"])
    assert _eval("--task", "slidebench", "--data", SLIDEBENCH, "--predictions", shifted, "--out",
                 tmp_path / "p", "--limit", 6) == 1
    assert "row 3 is slide" in capsys.readouterr().err


@pytest.mark.slow
def test_mixed_questions_file_with_open_and_report_answers(tmp_path: Path) -> None:
    qs = [Question("c1", "s1", "Which grade?", ("grade 1", "grade 2"), "B", "closed", "grade", "synthetic"),
          Question("o1", "s1", "Is there necrosis?", None, "yes", "open", "yes/no", "synthetic"),
          Question("o2", "s2", "What stain?", None, "haematoxylin and eosin", "open", "stain", "synthetic"),
          Question("r1", "s2", "Report?", None, "Invasive ductal carcinoma, grade 2.", "report", "report", "report")]
    data = tmp_path / "questions.jsonl"
    write_questions_jsonl(data, qs)
    pred = tmp_path / "pred.jsonl"
    answers = {"c1": "grade 2", "o1": "Yes, there is.", "o2": "Haematoxylin and eosin.",
               "r1": "Invasive ductal carcinoma, grade 2."}
    pred.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in answers.items()))
    assert _eval("--task", "synthetic", "--data", data, "--predictions", pred, "--out", tmp_path / "o") == 0
    block = json.loads((tmp_path / "o" / "results.json").read_text())["conditions"]["slide"]
    assert block["closed"]["overall"]["accuracy"] == 1.0
    assert block["open"]["overall"]["yes_no_accuracy"] == 1.0 and block["open"]["overall"]["exact_match"] == 1.0
    assert block["report"]["BLEU-1"] == pytest.approx(1.0) and block["report"]["ROUGE-L"] == pytest.approx(1.0)
    assert "## Reports" in (tmp_path / "o" / "results.md").read_text()


def test_dry_run_prints_counts(slidebench_features: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _eval("--task", "slidebench", "--data", SLIDEBENCH, "--dry-run", "--features", slidebench_features) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (counts["questions"], counts["slides"], len(counts["categories"])) == (1494, 591, 13)
    assert counts["option_counts"] == {"4": 1494}
    assert counts["features"]["slides_with_features"] == 4 and counts["features"]["slides_missing"] == 587
    assert _eval("--task", "slidebench", "--dry-run") == 1  # no --data


def test_derangement_and_option_orders_are_fixed_and_valid() -> None:
    slides = [f"s{i}" for i in range(7)]
    d = slide_derangement(slides, seed=0)
    assert sorted(d) == sorted(d.values()) == slides and all(k != v for k, v in d.items())
    assert d == slide_derangement(list(reversed(slides)), seed=0) != slide_derangement(slides, seed=1)
    assert slide_derangement(["only"], 0) == {}
    orders = {option_order("q1", r, 4, 0) for r in range(1, 6)}
    assert all(sorted(o) == [0, 1, 2, 3] and o != (0, 1, 2, 3) for o in orders) and len(orders) > 1
    assert option_order("q1", 1, 4, 0) == option_order("q1", 1, 4, 0)
    assert option_order("q", 1, 2, 0) == (1, 0)


@pytest.mark.parametrize("config", sorted((REPO / "eval").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_eval_config_loads(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(REPO)
    shipped = yaml.safe_load(config.read_text())
    if shipped["data"]:
        assert _eval("--config", config, "--dry-run") == 0
        counts = json.loads(capsys.readouterr().out)
        assert counts["task"] == shipped["task"] and counts["questions"] > 0
    else:
        assert _eval("--config", config, "--dry-run") == 1
        assert "--data is required (or set data in the --config file)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # every key of the file is a typed setting; a flag overrides the file
        main(["eval", "--config", str(config), "--data", "given.jsonl", "--seed", "7", "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["seed"] == 7 and resolved["data"] == "given.jsonl"
    assert {k: resolved[k] for k in shipped if k not in ("seed", "data")} == \
        {k: v for k, v in shipped.items() if k not in ("seed", "data")}


def test_zeroed_control_shows_a_blank_slide(tiny_checkpoint: Path, slidebench_features: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Zeroing only the features would leave the tile positions and count (layout and amount of tissue
    stay readable); the control shows one all-zero tile at the origin, with no slide size."""
    import torch

    import pathchat.inference.engine as generation

    seen: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []

    def record(model, tokenizer, items, max_new_tokens=256, system_prompt=None, slide_sizes=None):
        seen.extend((f, c, s) for (f, c, _), s in zip(items, slide_sizes or [None] * len(items), strict=True))
        return ["A"] * len(items)

    monkeypatch.setattr(generation, "generate_batch", record)
    args = ["--model", tiny_checkpoint, "--task", "slidebench", "--data", SLIDEBENCH, "--features",
            slidebench_features, "--out", tmp_path / "run", "--limit", 4, "--consistency-repeats", 0]
    assert _eval(*args) == 0
    assert len(seen) >= 4 * 2  # slide and zeroed (shuffled too when the questions span several slides)
    blank = [(f, c, s) for f, c, s in seen if f.shape[0] == 1 and not f.any()]
    assert len(blank) == 4
    for _, c, s in blank:
        assert c is None or (c.shape == (1, 2) and not c.any())
        assert s is None
    assert all(f.shape[0] > 1 for f, _, _ in seen if not any(f is b for b, _, _ in blank))
