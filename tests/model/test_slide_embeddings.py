"""The added tokens `<slide>` / `<|slide_pad|>`: mean-initialised rows that never reach the language model.

`<slide>` is expanded into placeholders at render time, every placeholder is overwritten by a
connector output, and generation suppresses both ids, so their embedding rows cannot change
any logit: that is why they need no training under LoRA.
"""

from __future__ import annotations

import pytest
import torch
from test_modeling import CHAT, _prompt, _tiles  # pytest puts tests/model on sys.path
from tiny_models import CONNECTOR, FEATURE_DIM, K, build_tiny, text_config
from transformers import AutoConfig, AutoModelForCausalLM

from pathchat.inference.engine import ChatSession, generate_batch_ids
from pathchat.model.conversation import render_conversation
from pathchat.model.lora import LoraSettings, apply_lora
from pathchat.model.modeling import build_pathchat
from pathchat.model.tokenizers import build_test_tokenizer


@pytest.fixture(params=["qwen2", "llama"])
def tiny(request):
    return build_tiny(request.param)


def _slide_ids(model) -> list[int]:
    return [model.config.slide_token_id, model.config.slide_placeholder_id]


def _assert_mean_rows(weight: torch.Tensor, ids: list[int]) -> None:
    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    keep[ids] = False
    mean = weight[keep].mean(dim=0)
    for i in ids:
        torch.testing.assert_close(weight[i], mean, atol=1e-6, rtol=0)
    assert weight[keep].std(dim=0).mean() > 1e-3  # the other rows are not all the mean


def test_rows_are_the_mean_embedding(tiny):
    model, _ = tiny
    ids = _slide_ids(model)
    _assert_mean_rows(model.get_input_embeddings().weight.detach(), ids)
    _assert_mean_rows(model.get_output_embeddings().weight.detach(), ids)  # untied (qwen2) or tied (llama)


def test_rows_are_the_mean_after_resizing_a_pretrained_lm():
    tokenizer = build_test_tokenizer("qwen2")
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text_config("qwen2", len(tokenizer))))
    model = build_pathchat(lm, tokenizer, FEATURE_DIM, CONNECTOR)  # adds 2 rows
    ids = _slide_ids(model)
    assert ids == [len(tokenizer) - 2, len(tokenizer) - 1]
    _assert_mean_rows(model.get_input_embeddings().weight.detach(), ids)
    assert model.generation_config.suppress_tokens == ids


def test_slide_token_never_reaches_input_ids(tiny):
    model, tokenizer = tiny
    rendered = render_conversation(CHAT, tokenizer, K)
    assert model.config.slide_token_id not in rendered.input_ids
    assert rendered.input_ids.count(model.config.slide_placeholder_id) == K


@pytest.mark.parametrize("with_lora", [False, True])
def test_placeholder_rows_have_no_effect_on_logits(tiny, with_lora):
    model, tokenizer = tiny
    if with_lora:
        apply_lora(model, LoraSettings(r=4, dropout=0.0))
        model.eval()
    inputs = {**_prompt(tokenizer), **_tiles()}
    ids = _slide_ids(model)
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        before = model(**inputs).logits
        embeddings[ids] = torch.randn(2, embeddings.shape[1]) * 100.0  # wildly different rows
        after = model(**inputs).logits
    assert torch.equal(before[..., :ids[0]], after[..., :ids[0]])  # bit-identical (tied heads aside)
    if with_lora:
        assert not embeddings.requires_grad  # frozen by peft, and nothing to learn there anyway


def test_generation_never_emits_slide_ids(tiny):
    """Even with output rows that would win every argmax, no path generates `<slide>` or a placeholder."""
    model, tokenizer = tiny
    ids = _slide_ids(model)
    head = model.get_output_embeddings().weight
    inputs = {**_prompt(tokenizer), **_tiles()}
    with torch.no_grad():  # point the placeholder's output row along the last hidden state
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        head[ids[1]] = hidden / hidden.norm() * 1000.0
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(new) == 5 and not set(new) & set(ids)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    assert int(logits.argmax()) == ids[1]  # the placeholder really would have won
    features = _tiles()["tile_features"][0]
    session = ChatSession(model, tokenizer, features, max_new_tokens=5)
    session.ask("What is this?")
    assert len(session.answer_ids[0]) >= 1 and not set(session.answer_ids[0]) & set(ids)
    batch = generate_batch_ids(model, tokenizer, [(features, None, "What is this?")], max_new_tokens=5)
    assert not set(batch.sequences[0, -5:].tolist()) & set(ids)
