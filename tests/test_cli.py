"""The console script: help text from the library docstrings, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pathchat.cli import main


def test_help_comes_from_the_library_docstring(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tile", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Tile every slide under `slides`" in out and "--min-tissue" in out and "--default-slide-mpp" in out


def test_console_script_is_installed_and_a_missing_verb_exits_1():
    result = subprocess.run([sys.executable, "-m", "pathchat.cli"], capture_output=True, text=True)
    assert result.returncode == 1 and "required" in result.stderr
    bad_flag = subprocess.run([sys.executable, "-m", "pathchat.cli", "tile", "x", "--out", "y", "--mag", "zero"],
                              capture_output=True, text=True)
    assert bad_flag.returncode == 1 and "invalid float value" in bad_flag.stderr


def test_encoders_verb_lists_the_registry_with_offline_availability(capsys, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: no real weights here
    monkeypatch.delenv("PATHCHAT_ENCODER_WEIGHTS", raising=False)
    assert main(["encoders", "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert {"uni_v1", "uni_v2", "conch_v1", "conch_v15", "virchow2", "hoptimus0", "hoptimus1", "gigapath",
            "phikon", "phikon_v2", "plip", "midnight", "resnet50", "random-vit-tiny"} <= set(rows)
    assert rows["virchow2"]["dim"] == 2560 and rows["uni_v1"]["dim"] == 1024
    assert rows["random-vit-tiny"]["offline"] is True and rows["uni_v1"]["offline"] is False
    assert main(["encoders"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["name", "dim", "tile"]
