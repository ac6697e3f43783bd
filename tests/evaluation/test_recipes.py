"""The slidebench / wsi_vqa / pathvqa recipes convert the real files to evaluation-questions JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fixtures import PATHVQA, SLIDEBENCH, WSI_VQA_TRAIN

from pathchat.evaluation.tasks import load_task, read_questions_jsonl, recipe_main


@pytest.mark.parametrize(("task", "source", "n"), [
    ("slidebench", SLIDEBENCH, 1494), ("wsi-vqa", WSI_VQA_TRAIN, 7118), ("pathvqa", PATHVQA, 5429)])
def test_recipe_round_trip(task: str, source: Path, n: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"{task}.jsonl"
    assert recipe_main(task, "test", [str(source), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["questions"] == n
    converted = read_questions_jsonl(out).questions
    assert converted == load_task(task, source).questions
    assert len(out.read_text().splitlines()) == n
    if task == "wsi-vqa":
        assert printed["loading"]["answers_trailing_period"] == 8 and printed["loading"]["unmatched_dropped"] == 21


def test_recipe_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert recipe_main("pathvqa", "test", [str(tmp_path / "none.json"), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("package", ["slidebench", "wsi_vqa", "pathvqa"])
def test_recipe_folders_have_readme_with_commands(package: str) -> None:
    folder = Path(__file__).resolve().parents[2] / "data_recipes" / package
    readme = (folder / "README.md").read_text()
    assert f"python -m data_recipes.{package} " in readme and "Licence" in readme
    assert (folder / "__main__.py").is_file()
