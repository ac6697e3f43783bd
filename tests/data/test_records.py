"""Conversation records: formats, aliases, errors that name the record, packing."""

from __future__ import annotations

import json

import pytest

from pathchat.data.records import RecordError, SkippedRecords, load_records, pack_by_slide, split_by_question


def _rec(rid, slide, *turns):
    conv = []
    for i, t in enumerate(turns):
        conv.append({"from": "human" if i % 2 == 0 else "gpt", "value": t})
    return {"id": rid, "slide": slide, "conversations": conv}


def test_slidechat_example_file_loads_with_aliases():
    from shared_data import TEXT

    recs = load_records(TEXT / "slideinstruction" / "train_data_example.json")
    raw = json.loads((TEXT / "slideinstruction" / "train_data_example.json").read_text())
    assert len(recs) == len(raw) == 3
    for r, src in zip(recs, raw, strict=True):
        assert r.id == src["id"]
        assert r.slide == src["image"][0].removesuffix(".csv")
        assert r.messages[0]["content"].count("<slide>") == 1 and "<image>" not in r.messages[0]["content"]
        assert r.messages[1]["content"] == src["conversations"][1]["value"]


def test_json_and_jsonl_give_the_same_records(tmp_path):
    rows = [_rec("a", "s1", "<slide>\nQ1", "A1"), _rec("b", "s2", "Q2", "A2", "Q3", "A3")]
    (tmp_path / "x.json").write_text(json.dumps(rows))
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, b = load_records(tmp_path / "x.json"), load_records(tmp_path / "x.jsonl")
    assert [(r.id, r.slide, r.messages) for r in a] == [(r.id, r.slide, r.messages) for r in b]
    assert b[1].num_answers == 2 and b[1].messages[0]["content"] == "<slide>\nQ2"  # marker added


def test_bad_record_error_names_file_line_and_record(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(_rec("ok", "s1", "Q", "A")) + "\n"
                 + json.dumps({"id": "broken", "slide": "s2", "conversations": [{"from": "human", "value": "Q"}]})
                 + "\n{not json\n" + json.dumps(_rec("ok", "s3", "Q", "A")) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: record 'broken'.*ends with a user message"):
        load_records(p)
    skipped = SkippedRecords()
    recs = load_records(p, skip_invalid=True, skipped=skipped)
    assert [r.id for r in recs] == ["ok"]
    assert skipped.count == 3
    assert "bad.jsonl:3: not valid JSON" in skipped.reasons[1]
    assert "duplicate record id 'ok'" in skipped.reasons[2]


def test_pack_by_slide_merges_questions_and_split_inverts_it():
    recs = load_records_from([_rec("q1", "s1", "<slide>\nWhat organ?", "Lung."),
                              _rec("q2", "s2", "<slide>\nGrade?", "2."),
                              _rec("q3", "s1", "<slide>\nNecrosis?", "No.")])
    packed = pack_by_slide(recs)
    assert [r.slide for r in packed] == ["s1", "s2"]
    s1 = packed[0]
    assert s1.source_ids == ["q1", "q3"] and s1.num_answers == 2
    assert [m["content"] for m in s1.messages] == ["<slide>\nWhat organ?", "Lung.", "Necrosis?", "No."]
    split = split_by_question(packed)
    assert [r.messages[0]["content"] for r in split] == ["<slide>\nWhat organ?", "<slide>\nNecrosis?",
                                                          "<slide>\nGrade?"]
    assert sum(r.num_answers for r in split) == 3


def load_records_from(rows):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.json"
        p.write_text(json.dumps(rows))
        return load_records(p)


def test_pack_by_slide_splits_into_near_equal_packs_of_at_most_max_records():
    rows = [_rec(f"a{i}", "s1", f"<slide>\nQ{i}?", f"A{i}.") for i in range(7)] + [_rec("b0", "s2", "<slide>\nQ?", "A.")]
    recs = load_records_from(rows)
    packed = pack_by_slide(recs, max_records=3)
    # 7 records, at most 3 a pack: 3 packs of 3, 2, 2 in file order; a single record stays as it is
    assert [r.source_ids for r in packed] == [["a0", "a1", "a2"], ["a3", "a4"], ["a5", "a6"], ["b0"]]
    assert [r.id for r in packed] == ["s1::packed3-1of3", "s1::packed2-2of3", "s1::packed2-3of3", "b0"]
    for r in packed[:3]:  # every pack shows the slide once, in its first turn, and keeps its records apart
        assert r.messages[0]["content"].startswith("<slide>\n")
        assert sum("<slide>" in m["content"] for m in r.messages) == 1
        assert r.segment_starts == list(range(0, 2 * len(r.source_ids), 2))
    assert [m["content"] for m in packed[1].messages] == ["<slide>\nQ3?", "A3.", "Q4?", "A4."]
    assert [r.id for r in pack_by_slide(recs, max_records=7)] == ["s1::packed7", "b0"]
    with pytest.raises(ValueError, match="max_records must be >= 1"):
        pack_by_slide(recs, max_records=0)
