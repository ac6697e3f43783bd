"""Rendered samples, tile caps, batches and the length-grouped order."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from toy_data import DIM, make_toy_dataset  # noqa: E402

from pathchat.data.collator import PathChatCollator  # noqa: E402
from pathchat.data.dataset import ConversationDataset, render_plain  # noqa: E402
from pathchat.data.records import load_records, pack_by_slide  # noqa: E402
from pathchat.data.sampler import LengthGroupedSampler  # noqa: E402
from pathchat.data.slide_features import MissingFeaturesError, SlideFeatureStore  # noqa: E402
from pathchat.features.store import read_features_h5  # noqa: E402
from pathchat.model.connectors.mlp import sample_tile_indices  # noqa: E402
from pathchat.model.conversation import IGNORE_INDEX, SLIDE_PLACEHOLDER, add_slide_tokens  # noqa: E402
from pathchat.model.tokenizers import build_test_tokenizer  # noqa: E402

K = 8


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def tok():
    t = build_test_tokenizer("qwen2")
    add_slide_tokens(t)
    return t


def test_chat_samples_train_only_answers(toy, tok):
    store = SlideFeatureStore(toy["features"])
    ds = ConversationDataset(load_records(toy["instruct"]), store, tok, K, progress=False)
    item = ds[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    placeholder = tok.convert_tokens_to_ids(SLIDE_PLACEHOLDER)
    assert ids.count(placeholder) == K
    trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    rec = json.loads(toy["instruct"].read_text().splitlines()[0])
    answers = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
    assert trained == "".join(a + "<|im_end|>" for a in answers)
    bag = read_features_h5(toy["features"] / "slide000.h5")
    assert torch.equal(item["tile_features"], torch.from_numpy(bag.features))
    assert torch.allclose(item["tile_coords"], torch.from_numpy(bag.coords * 0.5).float())


def test_plain_format_is_slide_then_report(toy, tok):
    ids, labels = render_plain("The tissue is red.", tok, K)
    placeholder = tok.convert_tokens_to_ids(SLIDE_PLACEHOLDER)
    assert ids[:K] == [placeholder] * K and labels[:K] == [IGNORE_INDEX] * K
    assert ids[K:] == labels[K:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[K:-1]) == "The tissue is red."
    ids2, _ = render_plain("The tissue is red.", tok, K, max_length=K + 3)
    assert len(ids2) == K + 3


def test_missing_features_are_named_or_skipped(toy, tok, tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"id": "lost", "slide": "ghost", "conversations": [
        {"from": "human", "value": "<slide>\nQ"}, {"from": "gpt", "value": "A"}]}) + "\n"
        + toy["instruct"].read_text().splitlines()[0] + "\n")
    store = SlideFeatureStore(toy["features"])
    with pytest.raises(MissingFeaturesError, match=r"slide 'ghost' \(record 'lost'\).*ghost.h5"):
        ConversationDataset(load_records(p), store, tok, K, progress=False)
    ds = ConversationDataset(load_records(p), store, tok, K, skip_invalid=True, progress=False)
    assert len(ds) == 1 and ds.skipped.count == 1


def test_tile_cap_uses_the_inference_sampler(toy):
    full = SlideFeatureStore(toy["features"]).load("slide001")
    capped = SlideFeatureStore(toy["features"], max_tiles=3, sample_seed=7).load("slide001")
    idx = sample_tile_indices(full.num_tiles_in_file, 3, 7)
    assert capped.sampled and capped.features.shape == (3, DIM)
    assert torch.equal(capped.features, full.features[idx])
    assert torch.equal(capped.coords_um, full.coords_um[idx])


def test_collator_pads_tokens_and_tiles(toy, tok):
    ds = ConversationDataset(load_records(toy["instruct"]), SlideFeatureStore(toy["features"]), tok, K,
                             progress=False)
    items = [ds[0], ds[1]]
    batch = PathChatCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=8)(items)
    L = batch["input_ids"].shape[1]
    assert L % 8 == 0 and max(len(i["input_ids"]) for i in items) <= L
    n0, n1 = (int(i["tile_features"].shape[0]) for i in items)
    assert batch["tile_features"].shape == (2, max(n0, n1), DIM)
    assert batch["tile_mask"].sum(1).tolist() == [n0, n1]
    assert batch["attention_mask"].sum(1).tolist() == [len(i["input_ids"]) for i in items]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["sample_ids"] == [items[0]["id"], items[1]["id"]]
    # Slide sizes in µm (level-0 size x mpp 0.5) where the file records them, NaN rows where not.
    sizes = {sid: SlideFeatureStore(toy["features"]).load(sid).slide_size_um for sid in ("slide000", "slide001")}
    assert sizes["slide000"] is not None and sizes["slide000"].tolist() == [2560.0, 2048.0]
    assert sizes["slide001"] is None
    of = {s.slide: ds[j] for j, s in enumerate(ds.samples)}
    mixed = PathChatCollator(pad_token_id=tok.pad_token_id)([of["slide000"], of["slide001"]])
    assert mixed["slide_size_um"][0].tolist() == [2560.0, 2048.0] and mixed["slide_size_um"][1].isnan().all()
    assert PathChatCollator(pad_token_id=tok.pad_token_id)([of["slide001"]])["slide_size_um"] is None


def test_length_grouped_order_is_seeded_and_groups_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, size=400).tolist()
    s = LengthGroupedSampler(lengths, batch_size=4, seed=3, megabatch_mult=10)
    s.set_epoch(1)
    a = list(s)
    assert sorted(a) == list(range(400))
    assert a == LengthGroupedSampler(lengths, 4, seed=3, megabatch_mult=10).order(1)
    assert a != s.order(2)
    assert lengths[a[0]] == max(lengths)  # the longest batch first: OOM shows at step 1
    # padding waste per batch of 4: grouped << random
    def waste(order):
        return sum(max(lengths[j] for j in order[i:i + 4]) * 4 - sum(lengths[j] for j in order[i:i + 4])
                   for i in range(0, 400, 4))
    assert waste(a) < 0.25 * waste(LengthGroupedSampler(lengths, 4, seed=3, group=False).order(1))


def test_packing_one_sequence_per_slide(toy, tok, tmp_path):
    from pathchat.data.records import split_by_question

    recs = load_records(toy["instruct"])
    split = split_by_question(recs)
    assert len(split) == 2 * len(recs)
    packed = pack_by_slide(split)
    assert len(packed) == len(recs) and sum(r.num_answers for r in packed) == len(split)


def test_slide_token_labels_in_plain_chat_and_isolated_packs(toy, tok):
    from pathchat.data.records import split_by_question
    from pathchat.model.conversation import slide_block

    labels = [f" cell {i}:" for i in range(K)]
    block = slide_block(tok, K, labels)
    ids, plain_labels = render_plain("The tissue is red.", tok, K, slide_token_labels=labels)
    assert ids[:len(block)] == block and plain_labels[:len(block)] == [IGNORE_INDEX] * len(block)
    assert tok.decode(ids[len(block):-1]) == "The tissue is red."
    store = SlideFeatureStore(toy["features"])
    packed = pack_by_slide(split_by_question(load_records(toy["instruct"])))
    for isolate in (False, True):
        ds = ConversationDataset(packed, store, tok, K, progress=False, isolate_records=isolate,
                                 slide_token_labels=labels)
        sample = ds[0]["input_ids"].tolist()
        start = sample.index(block[0])
        # the slide, with its labels, once per pack; labels never trained
        assert sample[start:start + len(block)] == block
        assert sample.count(tok.convert_tokens_to_ids(SLIDE_PLACEHOLDER)) == K
        assert all(lab == IGNORE_INDEX for lab in ds[0]["labels"].tolist()[start:start + len(block)])
