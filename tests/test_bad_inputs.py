"""Bad input, tried as a hostile user would: every verb answers with one line naming the value or file.

`BAD_INVOCATIONS` is the table: each row is an argv (placeholders in braces name the fixture files of
`bad_env`), the exit code it must give, and a text the error must contain (the offending value or
file). Every row also asserts that no traceback is printed (no `-v`) and that nothing half-written is
left (no temporaries anywhere, no output folder for a refused run, no eval `run_config.json`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shared_data import SLIDES

from pathchat.cli import main
from pathchat.evaluation.tasks import Question, write_questions_jsonl

# --------------------------------------------------------------------------------------------- fixtures

N_Q = 5
SLIDE_FLAGS = ("--no-progress",)
ENC = ("--encoder", "random-vit-tiny", "--random-weights")


def _questions() -> list[Question]:
    return [Question(str(i), f"slide{i % 2}", f"Which class dominates region {i}?", ("tumor", "stroma", "fat"),
                     "ABC"[i % 3], "closed", "dominant class", "synthetic") for i in range(N_Q)]


@pytest.fixture(scope="module")
def bad_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files for the table: a real slide folder, empty and odd folders, eval tasks and broken predictions,
    damaged checkpoints and configs."""
    root = tmp_path_factory.mktemp("bad_env")
    env: dict[str, Path] = {"root": root}
    slides = root / "slides"
    slides.mkdir()
    (slides / "small.svs").symlink_to(SLIDES / "aperio" / "small.svs")
    env["slides"] = slides
    (root / "empty").mkdir()
    env["empty"] = root / "empty"
    odd = root / "no_slides"
    odd.mkdir()
    (odd / "notes.txt").write_text("not a slide\n")
    (odd / "scan.czi").write_bytes(b"ZISRAWFILE" + bytes(100))
    env["no_slides"] = odd
    env["file"] = root / "exists.txt"
    env["file"].write_text("a file, not a folder\n")
    loop = root / "loop.svs"
    loop.symlink_to(loop)
    env["loop"] = loop

    # eval: a 5-question closed task and predictions files with every kind of flaw
    qs = _questions()
    env["task"] = root / "task.jsonl"
    write_questions_jsonl(env["task"], qs)
    good = [json.dumps({"id": q.id, "text": q.answer}) for q in qs]
    flaws = {
        "torn": good[:2] + ['{"id": "2", "te'] + good[3:],
        "nonobject": good[:1] + ['["2", "A"]'] + good[1:],
        "dup": good + [good[0]],
        "empty": [],
        "blank": ["", "   ", ""],
        "unknown_id": good + [json.dumps({"id": "999", "text": "A"})],
        "no_text": good[:4] + [json.dumps({"id": "4"})],
        "number": good[:3] + ["42"],
    }
    for name, lines in flaws.items():
        env[f"pred_{name}"] = root / f"pred_{name}.jsonl"
        env[f"pred_{name}"].write_text("".join(line + "\n" for line in lines))
    env["pred_binary"] = root / "pred_binary.jsonl"
    env["pred_binary"].write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    env["pred_good"] = root / "pred_good.jsonl"
    env["pred_good"].write_text("".join(line + "\n" for line in good))
    env["csv_no_output"] = root / "no_output.csv"
    env["csv_no_output"].write_text("Slide,Answer\nslide0,A\n")
    env["csv_wrong_slide"] = root / "wrong_slide.csv"
    env["csv_wrong_slide"].write_text("Slide,Output\nslideX,A\n")
    env["csv_too_long"] = root / "too_long.csv"
    env["csv_too_long"].write_text("Output\n" + "A\n" * (N_Q + 2))
    env["slidechat_as_task"] = root / "slidechat_output.csv"
    env["slidechat_as_task"].write_text("ID,Slide,Question,Answer,Output\n0,s0,q,A,A\n")
    env["task_torn"] = root / "task_torn.jsonl"
    env["task_torn"].write_text(env["task"].read_text()[:-30] + "\n")
    env["yaml_bad"] = root / "bad.yaml"
    env["yaml_bad"].write_text("task: [unclosed\n")
    env["yaml_unknown"] = root / "unknown.yaml"
    env["yaml_unknown"].write_text("task: questions\nbogus_setting: 3\n")
    env["yaml_list"] = root / "list.yaml"
    env["yaml_list"].write_text("- a\n- b\n")
    env["features_empty"] = root / "features_empty"
    env["features_empty"].mkdir()
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent / "evaluation"))
    from eval_fixtures import write_standin_features

    env["features"] = write_standin_features(root / "features", ["slide0", "slide1"])

    # checkpoints that look right and are not
    ckpt_garbage = root / "ckpt_garbage"
    ckpt_garbage.mkdir()
    (ckpt_garbage / "config.json").write_text("{not json")
    (ckpt_garbage / "model.safetensors").write_bytes(b"x" * 64)
    env["ckpt_garbage"] = ckpt_garbage
    ckpt_foreign = root / "ckpt_foreign"
    ckpt_foreign.mkdir()
    (ckpt_foreign / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (ckpt_foreign / "model.safetensors").write_bytes(b"x" * 64)
    env["ckpt_foreign"] = ckpt_foreign
    ckpt_trunc = root / "ckpt_trunc"
    ckpt_trunc.mkdir()
    (ckpt_trunc / "config.json").write_text(json.dumps({"model_type": "pathchat",
                                                        "text_config": {"model_type": "qwen2"}}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (ckpt_trunc / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(100))
    from pathchat.model.checkpoint import write_manifest

    write_manifest(ckpt_trunc)  # re-hashed: the sha256 check passes, the file is still truncated
    env["ckpt_trunc"] = ckpt_trunc
    env["ckpt_empty"] = root / "ckpt_empty"
    env["ckpt_empty"].mkdir()

    # training configs
    env["train_yaml_bad"] = root / "train_bad.yaml"
    env["train_yaml_bad"].write_text("stage: align\ndata: {train: [unclosed\n")
    env["weights_map_bad"] = root / "weights_bad.yaml"
    env["weights_map_bad"].write_text("uni_v1: [1, 2\n")
    return env


# ------------------------------------------------------------------------------------------------ table

T = ("tile", "{slides}", "--out", "{out}", *SLIDE_FLAGS)
X = ("extract", "{slides}", "--out", "{out}", *ENC, *SLIDE_FLAGS)
E = ("eval", "--task", "questions", "--data", "{task}", "--out", "{out}", "--no-progress")
P = (*E, "--predictions", "{pred_good}")
TR_ALIGN = ("train", "train/tiny_align.yaml", "--output_dir", "{out}")
TR_INSTRUCT = ("train", "train/tiny_instruct.yaml", "--output_dir", "{out}")

#: (id, argv, exit code, text the error names)
BAD_INVOCATIONS: list[tuple[str, tuple[str, ...], int, str]] = []


def _add(prefix: str, base: tuple[str, ...], rows: list[tuple[tuple[str, ...], str]]) -> None:
    for extra, needle in rows:
        BAD_INVOCATIONS.append((f"{prefix}{' '.join(extra)}", (*base, *extra), 1, needle))


_NUMERIC = [
    (("--mag", "inf"), "inf"), (("--mag", "nan"), "nan"), (("--mag", "0"), "--mag"), (("--mag", "-5"), "-5"),
    (("--mag", "1e400"), "--mag"), (("--mpp", "0"), "--mpp"), (("--mpp", "nan"), "nan"), (("--mpp", "-1"), "-1"),
    (("--mpp", "inf"), "inf"), (("--slide-mpp", "0"), "--slide-mpp"), (("--slide-mpp", "nan"), "nan"),
    (("--slide-mpp", "-0.25"), "-0.25"), (("--slide-mpp", "inf"), "inf"),
    (("--default-slide-mpp", "0"), "--default-slide-mpp"), (("--default-slide-mpp", "nan"), "nan"),
    (("--default-slide-mpp", "-1"), "-1"), (("--default-slide-mpp", "inf"), "inf"),
    (("--tissue-threshold", "-1"), "-1"), (("--tissue-threshold", "256"), "256"),
    (("--tissue-threshold", "nan"), "nan"), (("--tissue-threshold", "inf"), "inf"),
    (("--min-tissue", "1.5"), "1.5"), (("--min-tissue", "-0.1"), "-0.1"), (("--min-tissue", "nan"), "nan"),
    (("--tile-size", "0"), "--tile-size"), (("--tile-size", "-256"), "-256"), (("--tile-size", "4"), "--tile-size"),
    (("--overlap", "-1"), "--overlap"), (("--timeout", "0"), "--timeout"), (("--timeout", "-5"), "-5"),
    (("--timeout", "nan"), "nan"), (("--timeout", "inf"), "inf"), (("--mag", "twenty"), "twenty"),
    (("--tile-size", "12.5"), "12.5"), (("--low-res", "bogus"), "bogus"), (("--bogus-flag", "1"), "--bogus-flag"),
]
_add("tile ", T, [*_NUMERIC, (("--overlap", "256"), "--overlap"), (("--workers", "0"), "--workers"),
                  (("--workers", "-1"), "--workers"), (("--mag", "20", "--mpp", "0.5"), "--mpp")])
_add("extract ", X, [*_NUMERIC[:24], (("--extra-mag", "0"), "--extra-mag"), (("--extra-mag", "-5"), "-5"),
                     (("--extra-mag", "nan"), "nan"), (("--extra-mag", "inf"), "inf"),
                     (("--batch-size", "0"), "--batch-size"), (("--batch-size", "-1"), "-1"),
                     (("--workers", "-1"), "--workers"), (("--workers", "-3"), "-3"),
                     (("--timeout", "0"), "--timeout"), (("--timeout", "nan"), "nan"),
                     (("--dtype", "fp64"), "fp64"), (("--feature-dtype", "int8"), "int8")])
BAD_INVOCATIONS += [
    ("tile out is a file", ("tile", "{slides}", "--out", "{file}", *SLIDE_FLAGS), 1, "exists.txt"),
    ("tile out under a file", ("tile", "{slides}", "--out", "{file}/job", *SLIDE_FLAGS), 1, "exists.txt"),
    ("tile missing slide", ("tile", "{root}/nowhere.svs", "--out", "{out}", *SLIDE_FLAGS), 1, "nowhere.svs"),
    ("tile empty folder", ("tile", "{empty}", "--out", "{out}", *SLIDE_FLAGS), 1, "looked for"),
    ("tile folder without slides", ("tile", "{no_slides}", "--out", "{out}", *SLIDE_FLAGS), 1, "scan.czi"),
    ("tile symlink loop", ("tile", "{loop}", "--out", "{out}", *SLIDE_FLAGS), 1, "loop.svs"),
    ("tile no out", ("tile", "{slides}", *SLIDE_FLAGS), 1, "--out"),
    ("extract out is a file", ("extract", "{slides}", "--out", "{file}", *ENC, *SLIDE_FLAGS), 1, "exists.txt"),
    ("extract empty folder", ("extract", "{empty}", "--out", "{out}", *ENC, *SLIDE_FLAGS), 1, "looked for"),
    ("extract unknown encoder", ("extract", "{slides}", "--out", "{out}", "--encoder", "no-such-encoder",
                                 *SLIDE_FLAGS), 1, "no-such-encoder"),
    ("extract weights map missing", (*X, "--weights-map", "{root}/absent.yaml"), 1, "absent.yaml"),
    ("extract weights map bad yaml", (*X, "--weights-map", "{weights_map_bad}"), 1, "weights_bad.yaml"),
    ("encoders weights map missing", ("encoders", "--weights-map", "{root}/absent.yaml"), 1, "absent.yaml"),
    ("encoders weights map bad yaml", ("encoders", "--weights-map", "{weights_map_bad}"), 1, "weights_bad.yaml"),
]
_add("eval predictions ", E, [
    (("--predictions", "{pred_torn}"), "line 3"), (("--predictions", "{pred_nonobject}"), "line 2"),
    (("--predictions", "{pred_dup}"), "answered twice"), (("--predictions", "{pred_empty}"), "empty"),
    (("--predictions", "{pred_blank}"), "pred_blank.jsonl"), (("--predictions", "{pred_unknown_id}"), "'999'"),
    (("--predictions", "{pred_no_text}"), "line 5"), (("--predictions", "{pred_number}"), "line 4"),
    (("--predictions", "{pred_binary}"), "pred_binary.jsonl"), (("--predictions", "{root}/absent.jsonl"), "absent"),
    (("--predictions", "{csv_no_output}"), "Output"), (("--predictions", "{csv_wrong_slide}"), "slideX"),
    (("--predictions", "{csv_too_long}"), "row 5"),
])
_add("eval ", P, [
    (("--bad-predictions", "bogus"), "bogus"), (("--batch-size", "0"), "--batch-size"),
    (("--batch-size", "-1"), "-1"), (("--max-new-tokens", "0"), "--max-new-tokens"),
    (("--consistency-repeats", "-1"), "--consistency-repeats"), (("--limit", "0"), "--limit"),
    (("--model", "{ckpt_garbage}"), "--model"), (("--seed", "x"), "'x'"),
])
BAD_INVOCATIONS += [
    ("eval out is a file", ("eval", "--task", "questions", "--data", "{task}", "--out", "{file}",
                            "--predictions", "{pred_good}"), 1, "exists.txt"),
    ("eval unknown task", ("eval", "--task", "bogus-task", "--data", "{task}", "--out", "{out}",
                           "--predictions", "{pred_good}"), 1, "bogus-task"),
    ("eval missing data", ("eval", "--task", "questions", "--data", "{root}/absent_task.jsonl", "--out", "{out}",
                           "--predictions", "{pred_good}"), 1, "absent_task.jsonl"),
    ("eval torn task file", ("eval", "--task", "questions", "--data", "{task_torn}", "--out", "{out}",
                             "--predictions", "{pred_good}"), 1, "task_torn.jsonl"),
    ("eval slidechat csv as slidebench", ("eval", "--task", "slidebench", "--data", "{slidechat_as_task}",
                                          "--out", "{out}", "--predictions", "{pred_good}"), 1, "Narrow Category"),
    ("eval neither model nor predictions", E, 1, "--predictions"),
    ("eval model without features", (*E, "--model", "{ckpt_garbage}"), 1, "--features"),
    ("eval garbage checkpoint", (*E, "--model", "{ckpt_garbage}", "--features", "{features}"), 1, "config.json"),
    ("eval foreign checkpoint", (*E, "--model", "{ckpt_foreign}", "--features", "{features}"), 1, "bert"),
    ("eval truncated checkpoint", (*E, "--model", "{ckpt_trunc}", "--features", "{features}"), 1,
     "model.safetensors"),
    ("eval empty checkpoint folder", (*E, "--model", "{ckpt_empty}", "--features", "{features}"), 1, "ckpt_empty"),
    ("eval missing checkpoint", (*E, "--model", "{root}/absent_ckpt", "--features", "{features}"), 1, "absent_ckpt"),
    ("eval missing features", (*E, "--model", "{ckpt_trunc}", "--features", "{root}/absent_feats"), 1,
     "absent_feats"),
    ("eval no feature files", (*E, "--model", "{ckpt_trunc}", "--features", "{features_empty}"), 1,
     "features_empty"),
    ("eval missing config", (*P, "--config", "{root}/absent.yaml"), 1, "absent.yaml"),
    ("eval bad yaml config", (*P, "--config", "{yaml_bad}"), 1, "bad.yaml"),
    ("eval unknown config key", (*P, "--config", "{yaml_unknown}"), 1, "bogus_setting"),
    ("eval config not a mapping", (*P, "--config", "{yaml_list}"), 1, "list.yaml"),
    ("train missing config", ("train", "{root}/absent_train.yaml"), 1, "absent_train.yaml"),
    ("train bad yaml", ("train", "{train_yaml_bad}"), 1, "train_bad.yaml"),
    ("train output_dir is a file", ("train", "train/tiny_align.yaml", "--output_dir", "{file}"), 1, "exists.txt"),
    ("train init_from garbage", (*TR_INSTRUCT, "--model.init_from", "{ckpt_garbage}"), 1, "ckpt_garbage"),
    ("train init_from foreign", (*TR_INSTRUCT, "--model.init_from", "{ckpt_foreign}"), 1, "bert"),
    ("train init_from missing", (*TR_INSTRUCT, "--model.init_from", "{root}/absent_ckpt"), 1, "absent_ckpt"),
    ("train init_from empty", (*TR_INSTRUCT, "--model.init_from", "{ckpt_empty}"), 1, "ckpt_empty"),
    ("train deepspeed json missing", (*TR_ALIGN, "--training.deepspeed", "{root}/absent_ds.json"), 1,
     "absent_ds.json"),
    ("train unknown key", (*TR_ALIGN, "--training.bogus_key", "3"), 1, "bogus_key"),
    ("train bad stage", (*TR_ALIGN, "--stage", "pretrain"), 1, "pretrain"),
    ("convert-zero missing folder", ("convert-zero", "{root}/absent_zero", "--out", "{out}"), 1, "absent_zero"),
    ("convert-zero not a zero checkpoint", ("convert-zero", "{empty}", "--out", "{out}"), 1, "empty"),
    ("unknown verb", ("frobnicate",), 1, "frobnicate"),
]


def _fill(argv: tuple[str, ...], env: dict[str, Path], out: Path) -> list[str]:
    values = {k: str(v) for k, v in env.items()} | {"out": str(out)}
    return [a.format(**values) for a in argv]


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_the_table_holds_at_least_100_bad_invocations_over_every_verb():
    assert len(BAD_INVOCATIONS) >= 100
    verbs = {argv[0] for _, argv, _, _ in BAD_INVOCATIONS}
    assert {"tile", "extract", "encoders", "eval", "train", "convert-zero"} <= verbs
    assert len({case_id for case_id, *_ in BAD_INVOCATIONS}) == len(BAD_INVOCATIONS)


@pytest.mark.parametrize(("case_id", "argv", "code", "needle"), BAD_INVOCATIONS,
                         ids=[c[0] for c in BAD_INVOCATIONS])
def test_bad_invocation_is_one_clear_line(case_id, argv, code, needle, bad_env, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # train/*.yaml are relative to the repository
    out = tmp_path / "out"
    args = _fill(argv, bad_env, out)
    try:
        result = main(args)
    except SystemExit as e:  # --help-style exits; a refused value must not end here with code 0
        result = e.code
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert result == code, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    assert _fill((needle,), bad_env, out)[0] in captured.err, captured.err[-2000:]
    errors = [line for line in captured.err.splitlines() if "error" in line.lower()]
    assert errors, captured.err  # the refusal says it is an error
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))  # a refused run writes nothing
    assert not _temporaries(bad_env["root"]) and not _temporaries(tmp_path)


# ------------------------------------------------------------------------------- the console script itself


@pytest.mark.slow  # starts the console script in fresh interpreters (seconds each)
def test_the_console_script_prints_no_traceback_for_bad_values(bad_env, tmp_path):
    exe = Path(sys.executable).parent / "pathchat"
    cases = [
        ([str(exe), "tile", str(bad_env["slides"]), "--out", str(tmp_path / "a"), "--mag", "inf"], "inf"),
        ([str(exe), "eval", "--task", "questions", "--data", str(bad_env["task"]), "--out", str(tmp_path / "b"),
          "--predictions", str(bad_env["pred_torn"])], "line 3"),
        ([str(exe), "tile", str(bad_env["loop"]), "--out", str(tmp_path / "c")], "loop.svs"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv, needle in cases:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and needle in result.stderr, result.stderr
        assert len([ln for ln in result.stderr.splitlines() if "error" in ln]) == 1, result.stderr
    verbose = subprocess.run([str(exe), "-v", "eval", "--task", "questions", "--data", str(bad_env["task"]),
                              "--out", str(tmp_path / "d"), "--model", str(bad_env["ckpt_trunc"]), "--features",
                              str(bad_env["features"]), "--no-progress"], capture_output=True, text=True,
                             timeout=120, env=env)
    assert verbose.returncode == 1 and "model.safetensors" in verbose.stderr
