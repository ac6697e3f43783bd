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
