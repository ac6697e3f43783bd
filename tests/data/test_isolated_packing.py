"""Isolated packing: one slide encoding, many records, each trained exactly as if asked alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from tiny_models import K, build_tiny  # noqa: E402
from toy_data import DIM, make_toy_dataset  # noqa: E402

from pathchat.data.collator import PathChatCollator, isolated_attention  # noqa: E402
from pathchat.data.dataset import ConversationDataset  # noqa: E402
from pathchat.data.records import ConversationRecord, pack_by_slide  # noqa: E402
from pathchat.data.slide_features import SlideFeatureStore  # noqa: E402
from pathchat.model.conversation import IGNORE_INDEX  # noqa: E402

QUESTIONS = [("What colour is the tissue?", "red"), ("How many pieces are there?", "three pieces"),
             ("Is there necrosis?", "no")]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"))


def _records(slide: str) -> list[ConversationRecord]:
    return [ConversationRecord(f"{slide}-q{i}", slide, [{"role": "user", "content": f"<slide>\n{q}"},
                                                       {"role": "assistant", "content": a}])
            for i, (q, a) in enumerate(QUESTIONS)]


@pytest.mark.slow
def test_each_packed_record_computes_as_if_alone(toy):
    model, tok = build_tiny("qwen2", feature_dim=DIM)
    store = SlideFeatureStore(toy["features"])
    records = _records("slide000")
    packed = pack_by_slide(records)
    assert len(packed) == 1 and packed[0].segment_starts == [0, 2, 4]
    iso = ConversationDataset(packed, store, tok, K, isolate_records=True, progress=False)
    alone = ConversationDataset(records, store, tok, K, progress=False)
    collate = PathChatCollator(pad_token_id=tok.pad_token_id)
    # The isolated sample sits in a batch with a plain (one-record) sample of another slide: padding
    # and a mixed batch must change nothing.
    other = ConversationDataset(_records("slide001")[:1], store, tok, K, progress=False)[0]
    batch = collate([iso[0], other])
    assert batch["attention_mask"].shape[:2] == (2, 1) and batch["attention_mask"].dtype == torch.bool
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "sample_ids"}).logits
        seg = iso[0]["segment_ids"]
        prefix = int((seg == 0).sum())
        assert prefix > K and seg[:prefix].eq(0).all()
        for r in range(len(QUESTIONS)):
            single = collate([alone[r]])
            ref = model(**{k: v for k, v in single.items() if k != "sample_ids"}).logits[0]
            where = (seg == r + 1).nonzero().squeeze(1)
            assert torch.equal(batch["input_ids"][0, where], single["input_ids"][0, prefix:])
            assert torch.equal(batch["labels"][0, where], single["labels"][0, prefix:])
            assert batch["position_ids"][0, where].tolist() == list(range(prefix, prefix + len(where)))
            torch.testing.assert_close(logits[0, where], ref[prefix:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits[0, :prefix], ref[:prefix], atol=1e-5, rtol=1e-5)
        plain = collate([other])
        ref_other = model(**{k: v for k, v in plain.items() if k != "sample_ids"}).logits[0]
        n = plain["input_ids"].shape[1]
        torch.testing.assert_close(logits[1, :n], ref_other, atol=1e-5, rtol=1e-5)
    assert iso.samples[0].num_answers == 3
    answers = (batch["labels"][0] != IGNORE_INDEX).sum()
    assert answers == sum(int((collate([alone[r]])["labels"] != IGNORE_INDEX).sum()) for r in range(3))


def test_the_mask_hides_other_records_and_truncation_drops_whole_records(toy):
    _, tok = build_tiny("qwen2")
    store = SlideFeatureStore(toy["features"])
    packed = pack_by_slide(_records("slide000"))
    full = ConversationDataset(packed, store, tok, K, isolate_records=True, progress=False).samples[0]
    seg = full.segment_ids
    assert seg is not None
    mask, _ = isolated_attention([torch.tensor(seg)], torch.ones(1, len(seg), dtype=torch.long))
    first, last = seg.index(1), len(seg) - 1  # a token of record 1, the last token of record 3
    assert mask[0, 0, last, :first].all()  # sees the prefix (system prompt and slide)
    assert not mask[0, 0, last, first:seg.index(3)].any()  # not records 1 and 2
    assert mask[0, 0, last, seg.index(3): last + 1].all()  # its own record, causally
    # A budget that fits the prefix and two records drops the third whole, and counts its answer.
    budget = len(seg) - seg.count(3)
    cut = ConversationDataset(packed, store, tok, K, isolate_records=True, max_length=budget, progress=False)
    assert cut.samples[0].num_answers == 2 and cut.samples[0].dropped_turns == 1
    assert len(cut.samples[0]) == budget
