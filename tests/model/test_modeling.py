"""PathChatForConditionalGeneration: tiny random Qwen2 and Llama, and one run around the real SmolLM2."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from tiny_models import CONNECTOR, FEATURE_DIM, K, build_tiny, text_config
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    TextIteratorStreamer,
    TextStreamer,
)

from pathchat.model.checkpoint import MANIFEST_NAME, ManifestError
from pathchat.model.configuration import PathChatConfig
from pathchat.model.conversation import render_conversation
from pathchat.model.modeling import PathChatForConditionalGeneration, build_pathchat
from pathchat.model.tokenizers import build_test_tokenizer

NUM_TILES = 12
QUESTION = [{"role": "user", "content": "<slide>\nWhat tissue is this?"}]
CHAT = QUESTION + [{"role": "assistant", "content": "Colon mucosa with a tubular adenoma."}]


@pytest.fixture(params=["qwen2", "llama"])
def tiny(request):
    """(model, tokenizer) of a tiny random PathChat, deterministic (seed 0)."""
    return build_tiny(request.param)


def _tiles(batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tile_features": torch.randn(batch, NUM_TILES, FEATURE_DIM, generator=g),
        "tile_coords": torch.rand(batch, NUM_TILES, 2, generator=g) * 5000.0,
        "tile_mask": torch.ones(batch, NUM_TILES, dtype=torch.bool),
    }


def _config_fields(config) -> dict:
    """The config as saved, minus what loading itself records (source path, resolved dtype)."""
    d = config.to_dict()
    for sub in (d, d["text_config"]):
        for key in ("_name_or_path", "dtype"):
            sub.pop(key, None)
    return d


def _prompt(tokenizer) -> dict[str, torch.Tensor]:
    rendered = render_conversation(QUESTION, tokenizer, K, add_generation_prompt=True)
    ids = torch.tensor([rendered.input_ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_config_derives_and_validates_k(tiny):
    model, tokenizer = tiny
    assert model.config.num_slide_tokens == K == model.connector.num_tokens
    assert model.config.slide_placeholder_id == tokenizer.convert_tokens_to_ids("<|slide_pad|>")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    with pytest.raises(ValueError, match="num_slide_tokens=3 but the 'resampler' connector outputs 8"):
        PathChatConfig(text_config=model.config.text_config.to_dict(), connector=CONNECTOR, num_slide_tokens=3)
    default = PathChatConfig()
    assert default.connector is not None and default.connector["type"] == "scale_invariant" and default.num_slide_tokens == 128


def test_forward_shapes_loss_and_inputs_untouched(tiny):
    model, tokenizer = tiny
    rows = [render_conversation(CHAT, tokenizer, K), render_conversation(CHAT, tokenizer, K)]
    input_ids = torch.tensor([r.input_ids for r in rows])
    labels = torch.tensor([r.labels for r in rows])
    tiles = _tiles(batch=2)
    before = {name: t.clone() for name, t in {"input_ids": input_ids, "labels": labels, **tiles}.items()}
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, **tiles)
    b, length = input_ids.shape
    assert out.logits.shape == (b, length, len(tokenizer))
    assert out.tile_relevance.shape == (b, NUM_TILES)
    assert out.token_relevance.shape == (b, K, NUM_TILES)
    torch.testing.assert_close(out.tile_relevance.sum(dim=1), torch.ones(b))
    assert torch.isfinite(out.loss) and 2.0 < out.loss.item() < 12.0  # ~ln(vocab) for a random model
    out.loss.backward()
    assert model.connector.latents.grad is not None and model.connector.latents.grad.abs().sum() > 0
    for name, tensor in {"input_ids": input_ids, "labels": labels, **tiles}.items():
        assert torch.equal(tensor, before[name]), name
    # Inputs given as embeddings: placeholders found by embedding; the caller's tensor is untouched.
    embeds = model.get_input_embeddings()(input_ids).detach()
    embeds_before = embeds.clone()
    out2 = model(inputs_embeds=embeds, **tiles)
    assert torch.equal(embeds, embeds_before)
    torch.testing.assert_close(out2.logits, out.logits.detach())
    # The slide changes the answer's logits.
    out3 = model(input_ids=input_ids, **_tiles(batch=2, seed=1))
    assert not torch.allclose(out3.logits, out.logits)


def test_logits_only_at_labels_gives_the_same_loss_and_gradients(tiny):
    model, tokenizer = tiny
    rows = [render_conversation(CHAT, tokenizer, K), render_conversation(CHAT, tokenizer, K)]
    input_ids = torch.tensor([r.input_ids for r in rows])
    labels = torch.tensor([r.labels for r in rows])
    labels[1, -4:] = -100  # the two rows differ in which positions carry a label
    tiles = _tiles(batch=2)
    labelled = int((labels[:, 1:] != -100).sum())
    assert 0 < labelled < labels.numel() // 2

    def run(only: bool, **loss_kwargs):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, labels=labels, logits_only_at_labels=only, **tiles, **loss_kwargs)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run(False)
    only, only_grads = run(True)
    assert only.logits.shape == (labelled, len(tokenizer))
    torch.testing.assert_close(only.logits, full.logits[:, :-1][labels[:, 1:] != -100], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(only.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert full_grads.keys() == only_grads.keys() and "connector.latents" in only_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(only_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The Trainer's token-count normalisation (gradient accumulation) goes through unchanged.
    summed, _ = run(False, num_items_in_batch=torch.tensor(7))
    summed_only, _ = run(True, num_items_in_batch=torch.tensor(7))
    torch.testing.assert_close(summed_only.loss, summed.loss, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(summed.loss, full.loss)


def test_count_mismatch_names_numbers_and_sample(tiny):
    model, tokenizer = tiny
    row = render_conversation(CHAT, tokenizer, K).input_ids
    placeholder = model.config.slide_placeholder_id
    short = list(row)
    short.remove(placeholder)  # sample 1 loses one placeholder
    short.append(tokenizer.eos_token_id or 0)
    input_ids = torch.tensor([row, short])
    with pytest.raises(ValueError, match=rf"holds {2 * K - 1} slide placeholder tokens .* need {2 * K}; "
                                         rf"sample 1 has {K - 1} placeholders, expected {K}"):
        model(input_ids=input_ids, **_tiles(batch=2))
    with pytest.raises(ValueError, match="tile_features hold 1 slides but the input batch has 2 samples"):
        model(input_ids=input_ids, **_tiles(batch=1))
    with pytest.raises(ValueError, match="no tile_features"):
        model(input_ids=input_ids)


def test_save_load_round_trip_and_manifest(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in names and MANIFEST_NAME in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())["sha256"]
    assert set(manifest) == set(names) - {MANIFEST_NAME}

    loaded = PathChatForConditionalGeneration.from_pretrained(tmp_path).eval()
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for name in sd:
        assert sd[name].dtype == sd2[name].dtype and torch.equal(sd[name], sd2[name]), name
    assert _config_fields(loaded.config) == _config_fields(model.config)
    inputs = {**_prompt(tokenizer), **_tiles()}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)

    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(auto, PathChatForConditionalGeneration)
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path), PathChatForConditionalGeneration)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PathChatConfig)

    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.safetensors: sha256"):
        PathChatForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ManifestError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_manifest_raises(tiny, tmp_path):
    model, _ = tiny
    model.save_pretrained(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match=f"no {MANIFEST_NAME}"):
        PathChatForConditionalGeneration.from_pretrained(tmp_path)


def test_generate_runs_connector_only_at_prefill(tiny):
    model, tokenizer = tiny
    calls: list[int] = []
    handle = model.connector.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    inputs = {**_prompt(tokenizer), **_tiles()}
    try:
        first = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert calls == [1]
        second = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        no_cache = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    finally:
        handle.remove()
    prompt_len = inputs["input_ids"].shape[1]
    assert first.shape == (1, prompt_len + 6)
    assert torch.equal(first, second)
    assert torch.equal(first, no_cache)  # the cache holds exactly what re-reading the prompt gives
    assert len(calls) == 2 + 6  # two cached runs: once each; without a cache: every step


def test_streaming_matches_non_streaming(tiny):
    model, tokenizer = tiny
    inputs = {**_prompt(tokenizer), **_tiles()}
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    expected = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    class Collect(TextStreamer):
        def __init__(self, tok):
            super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
            self.parts: list[str] = []

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.parts.append(text)

    collect = Collect(tokenizer)
    streamed = model.generate(**inputs, max_new_tokens=8, do_sample=False, streamer=collect)
    assert torch.equal(streamed, out)
    assert "".join(collect.parts) == expected

    iterator = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    thread = threading.Thread(target=model.generate,
                              kwargs={**inputs, "max_new_tokens": 8, "do_sample": False, "streamer": iterator})
    thread.start()
    text = "".join(iterator)
    thread.join()
    assert text == expected


def test_sampling_with_seed_is_reproducible(tiny):
    model, tokenizer = tiny
    inputs = {**_prompt(tokenizer), **_tiles()}
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        runs.append(model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=50, temperature=1.0))
    assert torch.equal(runs[0], runs[1])


def test_build_pathchat_keeps_pretrained_weights():
    tokenizer = build_test_tokenizer("qwen2")
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text_config("qwen2", len(tokenizer))))
    old = {name: t.clone() for name, t in lm.state_dict().items()}
    model = build_pathchat(lm, tokenizer, FEATURE_DIM, CONNECTOR)  # adds 2 tokens -> resizes
    assert model.language_model is lm
    new = lm.state_dict()
    vocab = old["model.embed_tokens.weight"].shape[0]
    assert new["model.embed_tokens.weight"].shape[0] == len(tokenizer) == vocab + 2
    assert lm.config.vocab_size == len(tokenizer) and model.config.text_config is lm.config
    for name, tensor in old.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(new[name][:vocab], tensor), name
        else:
            assert torch.equal(new[name], tensor), name


def test_build_pathchat_does_not_mutate_config():
    tokenizer = build_test_tokenizer("llama3")
    llama_config = AutoConfig.for_model(**text_config("llama", 100))
    snapshot = copy.deepcopy(llama_config.to_dict())
    model = build_pathchat(llama_config, tokenizer, FEATURE_DIM, CONNECTOR)
    assert llama_config.to_dict() == snapshot
    assert model.language_model.config.vocab_size == len(tokenizer)


@pytest.mark.slow
def test_real_smollm2_generates_and_sees_the_slide(smollm2):
    lm, tokenizer, _ = smollm2
    lm, tokenizer = copy.deepcopy(lm), copy.deepcopy(tokenizer)  # the session fixture stays pristine
    torch.manual_seed(0)
    model = build_pathchat(lm, tokenizer, feature_dim=192, connector={"type": "mlp", "max_tiles": 16}).eval()
    k = model.config.num_slide_tokens
    rendered = render_conversation([{"role": "user", "content": "<slide>\nDescribe this slide."}],
                                   tokenizer, k, add_generation_prompt=True)
    input_ids = torch.tensor([rendered.input_ids])
    g = torch.Generator().manual_seed(0)
    tiles = {"tile_features": torch.randn(1, 40, 192, generator=g),
             "tile_coords": torch.rand(1, 40, 2, generator=g) * 10000.0}
    other = {**tiles, "tile_features": torch.randn(1, 40, 192, generator=g) * 3.0}
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **tiles,
                         max_new_tokens=10, do_sample=False)
    text = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > input_ids.shape[1] and text.strip()
    with torch.no_grad():
        logits_a = model(input_ids=input_ids, **tiles, logits_to_keep=1).logits
        logits_b = model(input_ids=input_ids, **other, logits_to_keep=1).logits
    assert logits_a.shape == (1, 1, len(tokenizer))
    assert (logits_a - logits_b).abs().max() > 1e-3
