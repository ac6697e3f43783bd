"""Every `pathchat` command the README shows parses with today's flags, so the README cannot drift from the code.

Commands come from the README's code blocks (launcher prefixes such as `torchrun … -m pathchat.cli` and
`VAR=value` are dropped, `\\` continuations joined) and from inline code spans that start with `pathchat`.
Each is parsed by its verb's parser (flags, value types, config files), without running it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from pathchat.cli import VERBS, split_verb, verb_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
# Placeholders in the prose -> something that parses (a file the README names as an example).
PLACEHOLDERS = {"…": "slide.svs", "<task>": "slidebench", "CKPT": "runs/ckpt", "DIR": "out_dir"}


def _code_block_commands(text: str) -> list[str]:
    commands, in_block, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        line = pending + line.split(" #", 1)[0].strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        m = re.search(r"(?:^|\s)(?:-m pathchat\.cli|pathchat) ([a-z][a-z-]*)(\s.*|$)", line)
        if m and m[1] in VERBS:
            commands.append(f"{m[1]}{m[2]}".strip())
    return commands


def _inline_commands(text: str) -> list[str]:
    spans = re.findall(r"`pathchat ([a-z][a-z-]*)([^`]*)`", text)
    # a bare `pathchat tile` names the verb in prose; a synopsis with [...] shows a pattern, not a command
    return [f"{verb}{rest}".strip() for verb, rest in spans if verb in VERBS and rest.strip() and "[" not in rest]


COMMANDS = sorted(set(_code_block_commands(README) + _inline_commands(README)))


def test_the_readme_shows_commands_of_every_verb_that_has_them():
    verbs = {c.split()[0] for c in COMMANDS}
    assert {"tile", "extract", "encoders", "train", "convert-zero", "eval"} <= verbs
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # config files in the commands (train/align.yaml) are relative to the repository
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    _, name, rest = split_verb(shlex.split(command))
    assert name is not None
    parser, _ = verb_parser(name)
    if "--help" in rest:
        with pytest.raises(SystemExit) as e:
            parser.parse_args(rest)
        assert e.value.code == 0
        return
    parser.parse_args(rest)  # raises on an unknown flag, a bad value or a missing config file
