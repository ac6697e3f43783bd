"""SlideInstruction recipe: SlideChat's real example records + stand-in CSVs in SlideChat's layout."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from shared_data import TEXT

from data_recipes.slideinstruction import (
    SlideInstructionConfig,
    SlideInstructionError,
    convert_record,
    convert_slideinstruction,
    main,
)
from pathchat.features.importers import read_feature_file
from pathchat.features.store import read_features_h5
from pathchat.model.conversation import messages_from_record

EXAMPLE = TEXT / "slideinstruction" / "train_data_example.json"
SLIDES = ["TCGA-A7-A0CJ-01Z-00-DX2", "TCGA-AR-A255-01Z-00-DX1", "TCGA-A7-A6VV-01Z-00-DX2"]


def _features(n: int, d: int, seed: int) -> np.ndarray:
    """Multiples of 1/1024: exact through CSV text and float32."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-4096, 4096, size=(n, d)) / 1024).astype(np.float32)


def _slidechat_csv(path: Path, n: int, seed: int, d: int = 512) -> np.ndarray:
    """SlideChat's layout: header `0..511,patch_name`, no index column, tile names `<col>_<row>.jpeg`."""
    feats = _features(n, d, seed)
    df = pd.DataFrame(feats, columns=[str(i) for i in range(d)])
    df["patch_name"] = [f"{40 + i % 5}_{7 + i // 5}.jpeg" for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return feats


@pytest.fixture(scope="module")
def example() -> list[dict]:
    if not EXAMPLE.is_file():
        raise RuntimeError(f"SlideChat's example not found at {EXAMPLE} (../shared/data/text)")
    return json.loads(EXAMPLE.read_text())


def test_real_example_converts_with_two_csvs_and_skips_the_missing_one(tmp_path, example):
    csvs = tmp_path / "csv"
    feats = {SLIDES[0]: _slidechat_csv(csvs / f"{SLIDES[0]}.csv", 12, 0),
             SLIDES[2]: _slidechat_csv(csvs / "BRCA" / f"{SLIDES[2]}.csv", 7, 2)}  # found by name below
    out_jsonl, out_feats = tmp_path / "conv.jsonl", tmp_path / "features"
    result = convert_slideinstruction(EXAMPLE, csvs, out_jsonl, out_feats,
                                      SlideInstructionConfig(progress=False, dtype="float32"))
    assert (result.records_in, result.records_out, result.slides_written) == (3, 2, 2)
    assert result.missing == [{"id": "train::1", "csv": f"{SLIDES[1]}.csv"}]
    assert result.skipped_ids == ["train::1"] and not result.ok

    rows = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["train::0", "train::2"]
    assert [r["slide"] for r in rows] == [SLIDES[0], SLIDES[2]]
    q0 = example[0]["conversations"][0]["value"].replace("\n<image>", "")
    assert rows[0]["conversations"][0] == {"from": "human", "value": "<slide>\n" + q0}
    assert rows[0]["conversations"][1] == example[0]["conversations"][1]  # answers untouched
    for row in rows:
        assert "<image>" not in json.dumps(row) and "image" not in row
        slide, messages = messages_from_record(row)
        assert slide == row["slide"] and messages[0]["content"].startswith("<slide>\n")
        assert [m["role"] for m in messages] == ["user", "assistant"]

    assert sorted(p.name for p in out_feats.iterdir()) == [f"{SLIDES[0]}.h5", f"{SLIDES[2]}.h5"]
    for slide, expected in feats.items():
        bag = read_features_h5(out_feats / f"{slide}.h5")
        np.testing.assert_array_equal(bag.features, expected)
        assert (bag.slide_id, bag.encoder, bag.dim, bag.coords, bag.mpp) == (slide, "conch_v1", 512, None, None)
        assert bag.attrs["imported_from"] == "slidechat-csv"
        with h5py.File(out_feats / f"{slide}.h5") as f:
            grid = f["tile_grid"][:]
        n = len(expected)
        np.testing.assert_array_equal(grid, [[40 + i % 5, 7 + i // 5] for i in range(n)])
        assert read_feature_file(out_feats / f"{slide}.h5").source_format == "pathchat"


def test_strict_fails_naming_the_record_and_writes_nothing(tmp_path):
    _slidechat_csv(tmp_path / "csv" / f"{SLIDES[0]}.csv", 4, 0)
    with pytest.raises(SlideInstructionError, match=r"2 record\(s\).*'train::1'.*TCGA-AR-A255-01Z-00-DX1\.csv.*'train::2'"):
        convert_slideinstruction(EXAMPLE, tmp_path / "csv", tmp_path / "c.jsonl", tmp_path / "f",
                                 SlideInstructionConfig(strict=True, progress=False))
    assert not (tmp_path / "c.jsonl").exists() and not (tmp_path / "f").exists()


def test_bad_csv_and_malformed_records_are_skipped_and_named(tmp_path):
    csvs = tmp_path / "csv"
    _slidechat_csv(csvs / "good.csv", 3, 5)
    (csvs / "bad.csv").write_text("0,1,patch_name\n0.5,x,0_0.jpeg\n")
    turns = [{"from": "human", "value": "<image>\nWhat is seen?"}, {"from": "gpt", "value": "Tumour."}]
    records = [
        {"id": "a", "image": ["good.csv"], "conversations": turns},
        {"id": "b", "image": ["bad.csv"], "conversations": turns},
        {"id": "c", "image": ["good.csv", "bad.csv"], "conversations": turns},
        {"id": "d", "image": ["good.csv"], "conversations": [turns[0]]},  # no answer
        {"id": "e", "image": ["good.csv"], "conversations": [{"from": "human", "value": "<image> x <image>"},
                                                             turns[1]]},
        {"id": "a", "image": ["good.csv"], "conversations": turns},  # duplicate id
        {"image": ["good.csv"], "conversations": turns},  # no id: named by its position
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = convert_slideinstruction(src, csvs, tmp_path / "c.jsonl", tmp_path / "f",
                                      SlideInstructionConfig(progress=False, dtype="float16"))
    assert (result.records_out, result.slides_written) == (2, 1)
    assert [(b["ids"], Path(b["path"]).name) for b in result.bad_features] == [(["b"], "bad.csv")]
    assert "non-numeric column 1" in result.bad_features[0]["problem"]
    assert [i["id"] for i in result.invalid] == ["c", "d", "e", "a"]
    assert "duplicate id (first at record 0)" in result.invalid[3]["problem"]
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "slideinstruction::6"]
    assert "exactly one feature CSV" in result.invalid[0]["problem"]
    assert "ends with a user message" in result.invalid[1]["problem"]
    assert "2 slide markers" in result.invalid[2]["problem"]
    with h5py.File(tmp_path / "f" / "good.h5") as f:
        assert f["features"].dtype == np.float16


def test_marker_placement(tmp_path):
    rec = {"id": "x", "image": "dir/s1.csv",
           "conversations": [{"from": "human", "value": "Describe\n<image>\nbriefly."},
                             {"from": "gpt", "value": "A tumour."}]}
    assert convert_record(rec)["conversations"][0]["value"] == "<slide>\nDescribe briefly."
    assert convert_record(rec, "keep")["conversations"][0]["value"] == "Describe\n<slide>\nbriefly."
    none = {**rec, "conversations": [{"from": "human", "value": "Grade?"}, {"from": "gpt", "value": "2"}]}
    out = convert_record(none)
    assert out["slide"] == "s1" and out["conversations"][0]["value"] == "<slide>\nGrade?"
    wrong = {**rec, "conversations": [{"from": "human", "value": "Grade?"}, {"from": "gpt", "value": "<image>"}]}
    with pytest.raises(ValueError, match=r"record 'x': turn 1 \(gpt\) holds the slide marker"):
        convert_record(wrong)


def test_cli_resumes_and_exit_codes(tmp_path, capsys):
    csvs = tmp_path / "csv"
    for i, slide in enumerate(SLIDES):
        _slidechat_csv(csvs / f"{slide}.csv", 3 + i, i)
    args = [str(EXAMPLE), "--csv-dir", str(csvs), "--out-conversations", str(tmp_path / "c.jsonl"),
            "--out-features", str(tmp_path / "f"), "--no-progress"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["records_out"], first["slides_written"], first["records_skipped"]) == (3, 3, 0)
    (csvs / f"{SLIDES[1]}.csv").unlink()
    assert main(args) == 2  # the h5 of the others is reused, the missing CSV is reported
    second = json.loads(capsys.readouterr().out)
    assert (second["records_out"], second["slides_existing"], second["slides_written"]) == (2, 2, 0)
    assert main([*args, "--strict"]) == 1
    assert "train::1" in capsys.readouterr().err
