"""The console script: flags, defaults and help from the typed verb functions; errors that say where; exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pathchat.cli import VERBS, main, verb_parser

REPO = Path(__file__).resolve().parents[1]


def _help(verb: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_comes_from_the_library_docstring(capsys):
    out = _help("tile", capsys)
    assert "Tile every slide under `slides`" in out and "--min-tissue" in out and "--default-slide-mpp" in out
    assert "minimum tissue share of a tile (0 keeps all). (type: float, default: 0.25)" in " ".join(out.split())


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_help_shows_only_real_flags_each_with_its_default(verb, capsys):
    parser, _ = verb_parser(verb)
    real = {s for a in parser._actions for s in a.option_strings}
    out = _help(verb, capsys)
    shown = set(re.findall(r"(?<![\w-])--[a-z][\w.-]*[a-z0-9]", out))
    assert shown <= real, f"help names flags that do not exist: {sorted(shown - real)}"
    options = out.split("\noptions:\n", 1)[1]
    entries = {e.split()[0].rstrip(","): " ".join(e.split()) for e in re.split(r"\n  (?=-)", options)}
    for action in parser._actions:
        if not action.option_strings or "Config" in type(action).__name__ or action.dest == "help":
            continue  # positionals, `--config FILE` (and per-section files), --print_config: no default
        entry = entries[action.option_strings[0]]
        # jsonargparse prints "(type: …, default: …)" after each flag's help line
        assert "default:" in entry, f"{verb} {action.option_strings[0]}: no default shown"
    # Python parameter names that are not flags never appear as "name:" lines (the old argparse help did)
    assert not re.search(r"^\s*(config|timeout_s|tiling):", out, re.M)


@pytest.mark.slow  # starts the console script in fresh interpreters (seconds each)
def test_console_script_is_installed_and_a_missing_verb_exits_1():
    result = subprocess.run([sys.executable, "-m", "pathchat.cli"], capture_output=True, text=True)
    assert result.returncode == 1 and "required" in result.stderr
    bad_flag = subprocess.run([sys.executable, "-m", "pathchat.cli", "tile", "x", "--out", "y", "--mag", "zero"],
                              capture_output=True, text=True)
    assert bad_flag.returncode == 1
    assert "flag --mag: invalid value for mag: expected float | null, got 'zero'" in bad_flag.stderr


def test_a_value_refused_by_a_config_check_is_one_line_naming_the_flag(tmp_path, capsys):
    assert main(["tile", str(tmp_path), "--out", str(tmp_path / "job"), "--tile-size", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pathchat tile: error: --tile-size must be at least 8 px, got 4"]
    assert main(["tile", str(tmp_path), "--out", str(tmp_path / "job"), "--mag", "20", "--mpp", "0.5"]) == 1
    assert "give --mag or --mpp, not both" in capsys.readouterr().err


def test_an_unknown_key_names_the_flag_or_the_file_and_the_valid_keys(tmp_path, capsys):
    align = str(REPO / "train" / "tiny_align.yaml")
    assert main(["train", align, "--training.lr", "1"]) == 1
    err = capsys.readouterr().err
    assert "flag --training.lr: unknown key 'training.lr' (valid in 'training': batch_size," in err
    assert "learning_rate" in err and "lr_scheduler" in err  # and no silent abbreviation to lr_scheduler
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: align\ntraining:\n  lr: 1\n")
    assert main(["train", str(bad)]) == 1
    assert f"file {bad}: unknown key 'training.lr' (valid in 'training': " in capsys.readouterr().err
    bad.write_text("stage: align\ntrainig:\n  batch_size: 2\n")
    assert main(["train", str(bad)]) == 1
    assert f"file {bad}: unknown key 'trainig' (valid: data, lora, model, output_dir, stage, training)" in \
        capsys.readouterr().err
    assert main(["tile", "x", "--out", "y", "--tile-sise", "3"]) == 1
    err = capsys.readouterr().err
    assert "flag --tile-sise: unknown key 'tile-sise' (valid: " in err and "--tile-size" in err
    task = tmp_path / "task.yaml"
    task.write_text("task: slidebench\nbatch_sise: 4\n")
    assert main(["eval", "--config", str(task), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert f"file {task}: unknown key 'batch_sise' (valid: " in err and "batch_size" in err


def test_a_bad_value_names_its_origin_and_the_expected_type(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  batch_size: many\n")
    assert main(["train", str(bad)]) == 1
    assert f"file {bad}: invalid value for training.batch_size: expected int, got 'many'" in capsys.readouterr().err
    assert main(["train", str(REPO / "train" / "tiny_align.yaml"), "--training.batch_size", "many"]) == 1
    assert "flag --training.batch_size: invalid value for training.batch_size: expected int" in capsys.readouterr().err
    assert main(["tile", "x", "--out", "y", "--low-res", "blurry"]) == 1
    assert "expected one of ['native', 'error'], got 'blurry'" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml" in capsys.readouterr().err


def test_eval_settings_come_from_the_yaml_and_flags_override_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--config", "eval/slidebench.yaml", "--batch-size", "3", "--no-controls", "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "task: slidebench" in printed and "batch_size: 3" in printed and "controls: false" in printed
    assert "consistency_repeats: 2" in printed  # from the file
    assert main(["eval", "--config", "eval/report.yaml", "--dry-run"]) == 1
    assert "--data is required (or set data in the --config file)" in capsys.readouterr().err


def test_encoders_verb_lists_the_registry_with_offline_availability(capsys, tmp_path, monkeypatch):
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
