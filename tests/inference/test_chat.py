"""`pathchat chat`: scripted --ask / --json, the interactive loop's commands, the notice, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pathchat.inference import NO_TISSUE_ANSWER, RESEARCH_NOTICE
from pathchat.inference.chat import chat, run_chat_loop
from pathchat.wsi.synthetic import SyntheticSlideSpec, write_synthetic_slide


def test_ask_json_answers_in_one_session(checkpoint: Path, slide_file: Path, tmp_path: Path, capsys):
    code = chat(str(slide_file), model=str(checkpoint), ask=["What tissue is this?", "And the margins?"], json=True,
                max_new_tokens=5, features=str(tmp_path / "f"), progress=False)
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [a["question"] for a in out["answers"]] == ["What tissue is this?", "And the margins?"]
    assert out["tiles"] == 96 and out["no_tissue"] is False and out["notice"] == RESEARCH_NOTICE
    assert out["feature_recipe"]["encoder"] == "random-cnn-tiny" and out["model"].startswith(checkpoint.name + "@")
    top = out["answers"][0]["top_tiles"]
    assert len(top) == 5 and all(t["size"] == 256 and 0 <= t["score"] <= 1 for t in top)


def test_ask_streams_text_and_no_tissue_gets_the_fixed_answer(checkpoint: Path, tmp_path: Path, capsys):
    blank = write_synthetic_slide(tmp_path / "blank.svs", SyntheticSlideSpec(1024, 1024, mpp=0.5))
    assert chat(str(blank), model=str(checkpoint), ask=["What is this?"], features=str(tmp_path / "f"),
                progress=False) == 0
    out = capsys.readouterr().out
    assert "you> What is this?" in out and f"pathchat> {NO_TISSUE_ANSWER}" in out


def test_json_without_ask_is_a_usage_error(checkpoint: Path, slide_file: Path, capsys):
    assert chat(str(slide_file), model=str(checkpoint), json=True) == 1
    assert "--json needs at least one --ask" in capsys.readouterr().err


def test_interactive_commands(pipe, slide_file: Path, tmp_path: Path):
    slide = pipe.prepare(slide_file)
    state = {"pipe": pipe, "slide": slide, "session": pipe.session(slide), "max_new_tokens": 4}
    saved = tmp_path / "conversation.json"
    script = "\n".join([
        "What tissue is this?", "Is it the same on the right?", f"/save {saved}",
        "/region 0 0 1536 2048", "What is in this region?", "/region 1 2", "/region off",
        "/reset", "/bogus", "/quit", "never asked",
    ]) + "\n"
    out = io.StringIO()
    run_chat_loop(state, io.StringIO(script), out, interactive=False)
    text = out.getvalue()
    record = json.loads(saved.read_text())
    assert [m["content"] for m in record["messages"] if m["role"] == "user"] == [
        "What tissue is this?", "Is it the same on the right?"]
    assert record["model"] == pipe.model_id and record["feature_recipe"]["tile_px"] == 256
    assert "saved 2 turns" in text
    assert "region (0, 0, 1536, 2048): 48 tiles (new conversation)" in text
    assert "usage: /region X Y W H" in text and "whole slide (new conversation)" in text
    assert "conversation reset" in text and "unknown command /bogus" in text
    assert text.count("pathchat> ") == 3  # "never asked" came after /quit
    assert state["session"].messages == [] and state["session"].region is None


def test_report_command_writes_the_report_files(pipe, slide_file: Path, tmp_path: Path):
    slide = pipe.prepare(slide_file)
    state = {"pipe": pipe, "slide": slide, "session": pipe.session(slide), "max_new_tokens": 4}
    out = io.StringIO()
    run_chat_loop(state, io.StringIO(f"/report {tmp_path / 'r'}\n"), out, interactive=False)
    files = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert files == sorted(f"{slide.slide_id}{s}" for s in (".json", ".md", ".heatmap.png", ".evidence.geojson"))
    assert RESEARCH_NOTICE in out.getvalue()


def test_ask_is_repeatable_plain_text_on_the_command_line():
    from pathchat.cli import verb_parser

    parser, _ = verb_parser("chat")
    ns = parser.parse_args(["slide.svs", "--ask", "Is there tumour: yes or no?", "--ask", "[1, 2]"])
    assert ns.ask == ["Is there tumour: yes or no?", "[1, 2]"]  # never parsed as YAML
    assert parser.parse_args(["slide.svs"]).ask is None


@pytest.mark.parametrize("argv, message", [
    (["chat", "/nonexistent/slide.svs"], "/nonexistent/slide.svs: no such slide"),
    (["chat", "SLIDE", "--model", "/nonexistent/ckpt"], "--model /nonexistent/ckpt: no such checkpoint folder"),
    (["chat", "SLIDE", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["chat", "SLIDE", "--mag", "inf", "--model", "CKPT"], "flag --mag: invalid value"),
    (["chat", "SLIDE", "--mag", "-20", "--model", "CKPT"], "--mag must be a positive number, got -20"),
    (["chat", "SLIDE", "--tile-size", "4", "--model", "CKPT"], "--tile-size must be at least 8 px, got 4"),
    (["chat", "SLIDE", "--ask", " ", "--model", "CKPT"], "--ask: a question is empty"),
    (["chat", "SLIDE", "--json"], "--json needs at least one --ask"),
])
def test_bad_chat_invocations_fail_at_once_in_one_line(argv, message, slide_file: Path, checkpoint: Path, capsys,
                                                       monkeypatch):
    from pathchat import cli
    from pathchat.inference import pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a bad invocation")

    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", no_model)
    argv = [str(slide_file) if a == "SLIDE" else str(checkpoint) if a == "CKPT" else a for a in argv]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
