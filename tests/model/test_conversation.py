"""Chat rendering: slide placeholders, loss labels, truncation, record conversion, test tokenizers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shared_data import TEXT

from pathchat.model.conversation import (
    IGNORE_INDEX,
    SLIDE_PLACEHOLDER,
    SLIDE_TOKEN,
    add_slide_tokens,
    format_token_mask,
    messages_from_record,
    render_conversation,
    slide_block,
    vocab_id,
)
from pathchat.model.tokenizers import build_test_tokenizer

SLIDECHAT_EXAMPLE = TEXT / "slideinstruction" / "train_data_example.json"
K = 8

QA = [
    ("What is the diagnosis?", "Invasive ductal carcinoma of the breast."),
    ("What is the grade?", "The histological grade is high."),
    ("Is there vascular invasion?", "Yes, there is lymphovascular invasion."),
]


def _conversation(turns: int = 3) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    for i, (q, a) in enumerate(QA[:turns]):
        msgs.append({"role": "user", "content": f"{SLIDE_TOKEN}\n{q}" if i == 0 else q})
        msgs.append({"role": "assistant", "content": a})
    return msgs


def _label_runs(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of trained label ids."""
    runs: list[list[int]] = []
    prev = False
    for lab in labels:
        if lab != IGNORE_INDEX:
            if not prev:
                runs.append([])
            runs[-1].append(lab)
        prev = lab != IGNORE_INDEX
    return runs


def _placeholder_runs(ids: list[int], placeholder_id: int) -> list[int]:
    runs: list[int] = []
    prev = False
    for tok in ids:
        if tok == placeholder_id:
            if not prev:
                runs.append(0)
            runs[-1] += 1
        prev = tok == placeholder_id
    return runs


def test_placeholders_and_labels_cover_assistant_turns(chat_tokenizer):
    tok = chat_tokenizer
    msgs = _conversation(3)
    r = render_conversation(msgs, tok, K, record_id="r1")
    _, placeholder_id = add_slide_tokens(tok)
    assert r.num_slides == 1 and r.dropped_turns == 0 and r.record_id == "r1"
    assert len(r.input_ids) == len(r.labels) == len(r.attention_mask) and set(r.attention_mask) == {1}
    assert _placeholder_runs(r.input_ids, placeholder_id) == [K]
    assert all(lab == IGNORE_INDEX for t, lab in zip(r.input_ids, r.labels, strict=True) if t == placeholder_id)
    # every labelled token is the input token at that position (shifting happens in the loss)
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(r.input_ids, r.labels, strict=True))
    decoded = [tok.decode(run) for run in _label_runs(r.labels)]
    assert decoded == [a + tok.eos_token for _, a in QA]
    # the assistant header and user text carry no loss
    mask_view = format_token_mask(r, tok)
    assert f"<slide x{K}>" in mask_view and f"[[{QA[0][1]}{tok.eos_token}]]" in mask_view
    assert SLIDE_PLACEHOLDER not in mask_view


def test_two_slides_expand_to_k_each(chat_tokenizer):
    msgs = [{"role": "user", "content": f"Compare {SLIDE_TOKEN} with {SLIDE_TOKEN}."},
            {"role": "assistant", "content": "Both show carcinoma."}]
    r = render_conversation(msgs, chat_tokenizer, 5)
    _, placeholder_id = add_slide_tokens(chat_tokenizer)
    assert r.num_slides == 2
    assert r.input_ids.count(placeholder_id) == 2 * 5
    assert _placeholder_runs(r.input_ids, placeholder_id) == [5, 5]


def test_system_prompt_inserted_once(chat_tokenizer):
    tok = chat_tokenizer
    r = render_conversation(_conversation(1), tok, K, system_prompt="You are PathChat, a pathology assistant.")
    text = tok.decode(r.input_ids)
    assert text.count("You are PathChat, a pathology assistant.") == 1
    assert "You are a helpful" not in text  # the template's default system prompt is replaced
    # a record's own system message wins over the argument
    own = [{"role": "system", "content": "Answer briefly."}, *_conversation(1)]
    text = tok.decode(render_conversation(own, tok, K, system_prompt="Ignored prompt.").input_ids)
    assert "Answer briefly." in text and "Ignored prompt." not in text
    decoded = [tok.decode(run) for run in _label_runs(render_conversation(own, tok, K).labels)]
    assert decoded == [QA[0][1] + tok.eos_token]


def test_generation_prompt_has_no_labels_and_ends_with_header(chat_tokenizer):
    tok = chat_tokenizer
    msgs = [*_conversation(1), {"role": "user", "content": "What is the grade?"}]
    r = render_conversation(msgs, tok, K, add_generation_prompt=True)
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    bare = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    header = prompt[len(bare):]
    assert header and tok.decode(r.input_ids).endswith(header)
    assert [tok.decode(run) for run in _label_runs(r.labels)] == [QA[0][1] + tok.eos_token]
    with pytest.raises(ValueError, match="last message to be a user"):
        render_conversation(_conversation(1), tok, K, add_generation_prompt=True)
    with pytest.raises(ValueError, match="'g'.*without dropping the question"):
        render_conversation(msgs, tok, K, add_generation_prompt=True, max_length=len(r) - 1, record_id="g")


def test_truncation_drops_whole_later_turns(chat_tokenizer):
    tok = chat_tokenizer
    full = render_conversation(_conversation(3), tok, K, record_id="t")
    two = render_conversation(_conversation(2), tok, K)
    one = render_conversation(_conversation(1), tok, K)
    assert len(one) < len(two) < len(full)

    r = render_conversation(_conversation(3), tok, K, max_length=len(full) - 1, record_id="t")
    assert r.dropped_turns == 1 and r.input_ids == two.input_ids and r.labels == two.labels
    r = render_conversation(_conversation(3), tok, K, max_length=len(one), record_id="t")
    assert r.dropped_turns == 2 and r.input_ids == one.input_ids
    _, placeholder_id = add_slide_tokens(tok)
    assert r.input_ids.count(placeholder_id) == K
    assert render_conversation(_conversation(3), tok, K, max_length=len(full)).dropped_turns == 0

    with pytest.raises(ValueError, match=rf"'t'.*first turn alone is {len(one)} tokens.*max_length is {len(one) - 1}"):
        render_conversation(_conversation(3), tok, K, max_length=len(one) - 1, record_id="t")
    # a huge k never gets cut: it raises instead
    with pytest.raises(ValueError, match="'big'"):
        render_conversation(_conversation(3), tok, 4096, max_length=4000, record_id="big")


def test_malformed_messages_raise_naming_record():
    tok = build_test_tokenizer("qwen2")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="'m1'.*alternate"):
        render_conversation(bad, tok, K, record_id="m1")
    with pytest.raises(ValueError, match="'m2'.*assistant.*<slide>"):
        render_conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<slide>"}],
                            tok, K, record_id="m2")
    with pytest.raises(ValueError, match="ends with a user message"):
        render_conversation([{"role": "user", "content": "q"}], tok, K)
    no_template = build_test_tokenizer("qwen2")
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        render_conversation(_conversation(1), no_template, K)


def test_messages_from_record_llava_and_slidechat_forms():
    slide, msgs = messages_from_record({"id": "a", "slide": "S1", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<slide>\nWhat is it?"}, {"from": "gpt", "value": "Carcinoma."}]})
    assert slide == "S1"
    assert msgs == [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "<slide>\nWhat is it?"},
                    {"role": "assistant", "content": "Carcinoma."}]
    slide, msgs = messages_from_record({"id": "b", "image": ["dir/TCGA-X.csv"], "conversations": [
        {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "Carcinoma."}]})
    assert slide == "TCGA-X" and msgs[0]["content"] == "What is it?\n<slide>"
    # a slide without a marker: the marker goes before the first user message
    slide, msgs = messages_from_record({"id": "c", "slide": "S2", "conversations": [
        {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "Carcinoma."}]})
    assert msgs[0]["content"] == "<slide>\nWhat is it?"
    # text-only record
    assert messages_from_record({"id": "d", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})[0] is None


@pytest.mark.parametrize(("record", "match"), [
    ({"id": "e1", "slide": "S"}, "'e1'.*conversations"),
    ({"id": "e2", "slide": "S", "conversations": []}, "'e2'.*conversations"),
    ({"id": "e3", "slide": "S", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
     "'e3'.*alternate"),
    ({"id": "e4", "slide": "S", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
     "'e4'.*turn 1.*empty"),
    ({"id": "e5", "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]},
     "'e5'.*names no slide"),
    ({"id": "e6", "slide": "S", "conversations": [{"from": "bot", "value": "q"}]}, "'e6'.*unknown role"),
    ({"id": "e7", "image": ["a.csv", "b.csv"], "conversations": [{"from": "human", "value": "q"}]},
     "'e7'.*exactly one slide"),
])
def test_malformed_records_raise_naming_record(record, match):
    with pytest.raises(ValueError, match=match):
        messages_from_record(record)


def test_slidechat_examples_render(chat_tokenizer):
    records = json.loads(SLIDECHAT_EXAMPLE.read_text())
    assert len(records) == 3
    _, placeholder_id = add_slide_tokens(chat_tokenizer)
    for record in records:
        slide, msgs = messages_from_record(record)
        assert slide == Path(record["image"][0]).stem
        r = render_conversation(msgs, chat_tokenizer, K, max_length=2048, record_id=record["id"])
        assert r.num_slides == 1 and r.dropped_turns == 0
        assert r.input_ids.count(placeholder_id) == K
        answers = [c["value"] for c in record["conversations"] if c["from"] == "gpt"]
        decoded = [chat_tokenizer.decode(run) for run in _label_runs(r.labels)]
        assert len(decoded) == len(answers)
        for got, want in zip(decoded, answers, strict=True):
            assert got.endswith(chat_tokenizer.eos_token)
            # Llama 3's template trims contents; ChatML keeps SlideChat's trailing space
            assert got.removesuffix(chat_tokenizer.eos_token).strip() == want.strip()


def test_add_slide_tokens_idempotent(chat_tokenizer):
    before = len(chat_tokenizer)
    ids = add_slide_tokens(chat_tokenizer)
    assert len(chat_tokenizer) == before + 2
    assert add_slide_tokens(chat_tokenizer) == ids and len(chat_tokenizer) == before + 2
    # both are single, unsplittable tokens
    assert chat_tokenizer(f"a{SLIDE_TOKEN}b{SLIDE_PLACEHOLDER}", add_special_tokens=False)["input_ids"].count(ids[0]) == 1
    assert chat_tokenizer.convert_ids_to_tokens(list(ids)) == [SLIDE_TOKEN, SLIDE_PLACEHOLDER]


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_build_test_tokenizer_deterministic(style):
    text = "The slide shows invasive ductal carcinoma, grade 3. What is 2+2?"
    a, b = build_test_tokenizer(style), build_test_tokenizer(style)
    assert a.get_vocab() == b.get_vocab()
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert ids == b(text, add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == text
    assert 900 <= len(a) <= 2048 and len(ids) < len(text) / 2  # real merges, not bytes
    # and across processes with a different hash seed
    code = ("import json; from pathchat.model.tokenizers import build_test_tokenizer as b; "
            f"print(json.dumps(b({style!r})({text!r}, add_special_tokens=False)['input_ids']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ids


@pytest.mark.parametrize(("style", "eos", "bos"), [("qwen2", "<|im_end|>", None),
                                                   ("llama3", "<|eot_id|>", "<|begin_of_text|>")])
def test_test_tokenizer_template_family(style, eos, bos):
    tok = build_test_tokenizer(style)
    assert tok.eos_token == eos and tok.bos_token == bos and tok.pad_token is not None
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    if style == "qwen2":
        assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    else:
        assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="unknown tokenizer style"):
        build_test_tokenizer("gpt2")


@pytest.mark.parametrize("style", ["qwen2", "llama3"])
def test_vocab_id_finds_held_tokens_and_never_answers_with_the_unknown_id(style):
    tokenizer = build_test_tokenizer(style)
    vocab = tokenizer.get_vocab()
    eos = str(tokenizer.eos_token)
    assert vocab_id(tokenizer, eos) == vocab[eos] == tokenizer.eos_token_id
    assert vocab_id(tokenizer, "<|no_such_token|>") is None
    tokenizer.add_special_tokens({"unk_token": "<unk>"})  # absent tokens now convert to this id
    assert tokenizer.convert_tokens_to_ids("<|no_such_token|>") == tokenizer.unk_token_id
    assert vocab_id(tokenizer, "<|no_such_token|>") is None
    assert vocab_id(tokenizer, "<unk>") == tokenizer.unk_token_id


def test_slide_token_labels_precede_each_placeholder(chat_tokenizer):
    labels = [f" cell {i}:" for i in range(K)]
    plain = render_conversation(_conversation(1), chat_tokenizer, K)
    named = render_conversation(_conversation(1), chat_tokenizer, K, slide_token_labels=labels)
    _, placeholder = add_slide_tokens(chat_tokenizer)
    block = slide_block(chat_tokenizer, K, labels)
    label_ids = [chat_tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    assert block == [i for ids in label_ids for i in [*ids, placeholder]]
    # The block replaces the k placeholders; everything else, labels included, is unchanged.
    start = plain.input_ids.index(placeholder)
    assert named.input_ids == plain.input_ids[:start] + block + plain.input_ids[start + K:]
    assert named.labels == plain.labels[:start] + [IGNORE_INDEX] * len(block) + plain.labels[start + K:]
    assert named.input_ids.count(placeholder) == K
    with pytest.raises(ValueError, match="3 slide token labels for 8 slide tokens"):
        render_conversation(_conversation(1), chat_tokenizer, K, slide_token_labels=labels[:3])
    with pytest.raises(ValueError, match="has no tokens"):
        slide_block(chat_tokenizer, 2, ["a", ""])
