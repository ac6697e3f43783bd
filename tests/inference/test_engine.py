"""ChatSession (KV-cache reuse across turns), generate_batch (left padding) and answer_relevance."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import FEATURE_DIM, K, build_tiny

from pathchat.inference.engine import (
    ChatSession,
    PrefixCache,
    end_of_turn_ids,
    generate_batch,
    generate_batch_ids,
    prime_prefix,
    suppressed_ids,
)
from pathchat.inference.relevance import answer_relevance
from pathchat.model.conversation import render_conversation


@pytest.fixture(params=["qwen2", "llama"])
def tiny(request):
    return (request.param, *build_tiny(request.param))


def _slide(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEATURE_DIM, generator=g), torch.rand(n, 2, generator=g) * 5000.0


def _full_logits(model, session: ChatSession, ids: list[int]) -> torch.Tensor:
    """Whole conversation in one forward from scratch, with the slide."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), **session.tiles)
    return out.logits[0]


def test_follow_up_reuses_cache_and_matches_full_recompute(tiny, caplog):
    kind, model, tokenizer = tiny
    features, coords = _slide(12, 0)
    calls: list[int] = []
    handle = model.connector.register_forward_hook(lambda mod, args, out: calls.append(1))
    try:
        session = ChatSession(model, tokenizer, features, coords, keep_prefill_logits=True)
        session.ask("What tissue is this?", max_new_tokens=6)
        cached_after_1 = list(session.cached_ids)
        first_prompt = session.render(session.messages[:1])
        assert session.shared_prefix_tokens == 0  # the model's first session: nothing shared yet
        assert session.prefill_lengths == [len(first_prompt)]
        assert cached_after_1[: len(first_prompt)] == first_prompt
        assert session.cache is not None and len(cached_after_1) == session.cache.get_seq_length()
        with caplog.at_level(logging.INFO, logger="pathchat.inference.engine"):
            session.ask("Is there lymphovascular invasion?", max_new_tokens=4)
    finally:
        handle.remove()
    assert calls == [1]  # the connector ran once for the whole session
    assert session.connector_runs == 1
    target = session.render(session.messages[:3])
    new = session.prefill_lengths[1]
    if kind == "qwen2":
        # The ChatML answer re-renders to the same ids: only the new tokens are prefilled.
        assert session.full_recomputes == 0 and not caplog.records
        assert target[: len(cached_after_1)] == cached_after_1
        assert new == len(target) - len(cached_after_1)
    else:
        # Llama 3's template trims the whitespace answer of the random model, so the cached ids
        # are not a prefix: the cache is cropped to the common prefix (slide kept) and logged.
        assert session.full_recomputes == 1
        assert "not a prefix" in caplog.text
        assert len(first_prompt) <= len(target) - new < len(cached_after_1)
    assert new < len(first_prompt)  # never the slide again
    full = _full_logits(model, session, target)
    reused = session.last_logits[1]
    assert reused.shape == (new, len(tokenizer))
    diff = (reused - full[-new:]).abs().max().item()
    print(f"{kind}: prefill_lengths={session.prefill_lengths} cache-reuse max|dlogit|={diff:.2e}")
    assert diff < 1e-4


def test_three_turns_cache_matches_recompute():
    model, tokenizer = build_tiny("qwen2")
    features, coords = _slide(12, 0)
    session = ChatSession(model, tokenizer, features, coords, system_prompt="Answer briefly.",
                          keep_prefill_logits=True)
    for q in ("What tissue is this?", "What is the grade?", "Margins?"):
        session.ask(q, max_new_tokens=5)
    assert len(session.prefill_lengths) == 3 and session.connector_runs == 1
    target = session.render(session.messages[:-1])
    full = _full_logits(model, session, target)
    new = session.prefill_lengths[2]
    assert (session.last_logits[2] - full[-new:]).abs().max().item() < 1e-4
    assert session.messages[0] == {"role": "system", "content": "Answer briefly."}


def test_stream_concatenates_to_answer(tiny):
    _, model, tokenizer = tiny
    features, coords = _slide(10, 1)
    plain = ChatSession(model, tokenizer, features, coords)
    streamed = ChatSession(model, tokenizer, features, coords)
    for q in ("Describe the slide.", "Any necrosis?"):
        text = plain.ask(q, max_new_tokens=7)
        pieces = list(streamed.ask(q, max_new_tokens=7, stream=True))
        assert isinstance(text, str) and "".join(pieces) == text
    # the second session takes the text before the slide from the first one's
    assert plain.shared_prefix_tokens == 0 and streamed.shared_prefix_tokens > 0
    assert plain.prefill_lengths[0] == streamed.prefill_lengths[0] + streamed.shared_prefix_tokens
    assert plain.prefill_lengths[1:] == streamed.prefill_lengths[1:]
    assert plain.answer_ids == streamed.answer_ids


def test_shared_prefix_matches_full_recompute_and_follows_the_weights():
    model, tokenizer = build_tiny("qwen2")
    first = ChatSession(model, tokenizer, *_slide(12, 0), system_prompt="Answer briefly.")
    first.ask("What tissue is this?", max_new_tokens=5)
    features, coords = _slide(9, 5)  # another slide: the prefix holds nothing of the slide
    shared = ChatSession(model, tokenizer, features, coords, system_prompt="Answer briefly.",
                         keep_prefill_logits=True)
    alone = ChatSession(model, tokenizer, features, coords, system_prompt="Answer briefly.", share_prefix=False)
    for q in ("Is there necrosis?", "Margins?"):
        assert shared.ask(q, max_new_tokens=6) == alone.ask(q, max_new_tokens=6)
    assert shared.answer_ids == alone.answer_ids
    prompt = shared.render(shared.messages[:2])
    placeholder = model.config.slide_placeholder_id
    assert shared.shared_prefix_tokens == prompt.index(placeholder) > 10  # system prompt + user header
    assert shared.prefill_lengths[0] == len(prompt) - shared.shared_prefix_tokens
    assert alone.prefill_lengths[0] == len(prompt) and alone.shared_prefix_tokens == 0
    full = _full_logits(model, shared, prompt)
    assert (shared.last_logits[0] - full[shared.shared_prefix_tokens:]).abs().max().item() < 1e-4

    # another system prompt is another prefix: a miss
    other = ChatSession(model, tokenizer, features, coords, system_prompt="Be thorough.")
    other.ask("Is there necrosis?", max_new_tokens=2)
    assert other.shared_prefix_tokens == 0

    # weights changed in place (training, merging an adapter): the old keys are never reused
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)
    changed = ChatSession(model, tokenizer, features, coords, system_prompt="Answer briefly.",
                          keep_prefill_logits=True)
    changed.ask("Is there necrosis?", max_new_tokens=2)
    assert changed.shared_prefix_tokens == 0 and changed.prefill_lengths[0] == len(prompt)
    assert (changed.last_logits[0] - _full_logits(model, changed, prompt)).abs().max().item() < 1e-4


def test_primed_prefix_serves_the_first_session():
    model, tokenizer = build_tiny("qwen2")
    n = prime_prefix(model, tokenizer, "Answer briefly.")
    features, coords = _slide(9, 5)
    first = ChatSession(model, tokenizer, features, coords, system_prompt="Answer briefly.")
    alone = ChatSession(model, tokenizer, features, coords, system_prompt="Answer briefly.", share_prefix=False)
    assert first.ask("Is there necrosis?", max_new_tokens=6) == alone.ask("Is there necrosis?", max_new_tokens=6)
    prompt = first.render(first.messages[:2])
    assert first.shared_prefix_tokens == n == prompt.index(model.config.slide_placeholder_id) > 10
    assert first.prefill_lengths[0] == len(prompt) - n and first.answer_ids == alone.answer_ids


def test_prefix_cache_keeps_the_most_recent_prefixes_as_private_copies():
    model, _ = build_tiny("qwen2")
    cache = PrefixCache(max_entries=2)
    kv = {}
    for name, ids in (("a", [1, 2, 3, 4, 5]), ("b", [6, 7, 8]), ("c", [9, 10])):
        with torch.no_grad():
            kv[name] = model(input_ids=torch.tensor([ids + [11, 12]]), use_cache=True).cache
        cache.put(model, ids[:-1] if name == "a" else ids, kv[name])
    assert cache.get(model, [1, 2, 3, 4]) is None  # the oldest went when the third came
    got = cache.get(model, [6, 7, 8])
    assert got is not None and got.get_seq_length() == 3  # cropped to the prefix
    assert kv["b"].get_seq_length() == 5  # the caller's cache is untouched
    got.crop(-1)
    again = cache.get(model, [6, 7, 8])
    assert again is not None and again.get_seq_length() == 3  # a copy each time
    assert (cache.hits, cache.misses) == (2, 1)


def test_sampling_is_seeded_and_slide_marker_checked():
    model, tokenizer = build_tiny("qwen2")
    features, coords = _slide(10, 2)
    answers = []
    for _ in range(2):
        session = ChatSession(model, tokenizer, features, coords,
                              generator=torch.Generator().manual_seed(7))
        answers.append(session.ask("Describe.", max_new_tokens=6, do_sample=True, temperature=0.8,
                                   top_p=0.9))
    assert answers[0] == answers[1]
    with pytest.raises(ValueError, match="only the first question"):
        session.ask("<slide>\nAgain?")


def test_batch_equals_single(tiny):
    _, model, tokenizer = tiny
    questions = ["What tissue is this?", "Is there invasion of the lymph nodes by carcinoma?", "Grade?"]
    items = [(*_slide(n, seed), q) for n, seed, q in zip((12, 5, 9), (3, 4, 5), questions, strict=True)]
    batched = generate_batch(model, tokenizer, items, max_new_tokens=6)
    singles = [generate_batch(model, tokenizer, [item], max_new_tokens=6)[0] for item in items]
    assert batched == singles
    # ... and a single answer equals the ChatSession's greedy answer.
    session = ChatSession(model, tokenizer, items[0][0], items[0][1])
    assert session.ask(questions[0], max_new_tokens=6) == singles[0]


def test_greedy_batch_equals_transformers_generate_token_for_token(tiny):
    """The engine's loop and transformers' `generate` pick the same ids, padded rows included."""
    _, model, tokenizer = tiny
    questions = ["What tissue is this?", "Is there invasion of the lymph nodes by carcinoma?"]
    items = [(*_slide(n, seed), q) for n, seed, q in zip((12, 5), (3, 4), questions, strict=True)]
    result = generate_batch_ids(model, tokenizer, items, max_new_tokens=8)
    width = result.sequences.shape[1] - result.answer_mask.sum(dim=1).max().item()
    prompt_ids = result.sequences[:, :width]
    prompt_mask = result.attention_mask[:, :width]
    stop = sorted(end_of_turn_ids(tokenizer, model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        reference = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=8,
                                   do_sample=False, eos_token_id=stop, pad_token_id=pad,
                                   suppress_tokens=suppressed_ids(model), **result.tiles)
    ours = result.sequences[:, width:]
    theirs = reference[:, width:]
    assert theirs.shape[1] >= 1
    for i in range(len(items)):
        mine = ours[i][result.answer_mask[i, width:]].tolist()
        assert mine == theirs[i, : len(mine)].tolist(), f"row {i}"
        assert len(mine) >= 1


def test_answer_relevance_shape_sum_and_padding(tiny):
    _, model, tokenizer = tiny
    items = [(*_slide(n, seed), "What tissue is this?") for n, seed in ((12, 3), (5, 4))]
    result = generate_batch_ids(model, tokenizer, items, max_new_tokens=5)
    assert result.answers == generate_batch(model, tokenizer, items, max_new_tokens=5)
    sequences, mask, answer_mask = result.sequences, result.attention_mask, result.answer_mask
    features = torch.zeros(2, 12, FEATURE_DIM)
    coords = torch.zeros(2, 12, 2)
    tile_mask = torch.zeros(2, 12, dtype=torch.bool)
    for i, (f, c, _) in enumerate(items):
        features[i, : len(f)], coords[i, : len(f)], tile_mask[i, : len(f)] = f, c, True
    before = model.language_model.config._attn_implementation
    rel = answer_relevance(model, sequences, answer_mask, features, coords, tile_mask, attention_mask=mask)
    assert rel.shape == (2, 12)
    torch.testing.assert_close(answer_relevance(model, **result.relevance_inputs()), rel)
    assert (rel >= 0).all()
    torch.testing.assert_close(rel.sum(dim=1), torch.ones(2))
    assert (rel[1, 5:] == 0).all() and (rel[1, :5] > 0).all()
    assert model.language_model.config._attn_implementation == before  # eager only for that forward
    # The session's map for its last answer has the same properties.
    session = ChatSession(model, tokenizer, items[1][0], items[1][1])
    session.ask("What tissue is this?", max_new_tokens=5)
    single = session.relevance()
    assert single.shape == (5,)
    torch.testing.assert_close(single.sum(), torch.tensor(1.0))
    # Left padding does not change the map of the padded item.
    torch.testing.assert_close(single, rel[1, :5], atol=1e-5, rtol=1e-4)


def test_render_prompt_matches_conversation_module():
    model, tokenizer = build_tiny("llama")
    features, coords = _slide(6, 0)
    session = ChatSession(model, tokenizer, features, coords)
    session.ask("Hi", max_new_tokens=1)
    expected = render_conversation([{"role": "user", "content": "<slide>\nHi"}], tokenizer, K,
                                   add_generation_prompt=True).input_ids
    assert session.cached_ids[: len(expected)] == expected


# ----------------------------------------------------------------- context length (refuse, never truncate)


def test_session_refuses_a_turn_beyond_max_positions(tiny):
    _, model, tokenizer = tiny
    limit = model.config.text_config.max_position_embeddings  # 512 in the tiny configs
    features, coords = _slide(6, 3)
    session = ChatSession(model, tokenizer, features, coords)
    first = session.render([{"role": "user", "content": "<slide>\nWhat tissue is this?"}])
    with pytest.raises(ValueError, match=rf"ChatSession: the prompt is {len(first)} tokens .* max_new_tokens "
                                         rf"is {limit - len(first) + 1}, {limit + 1} in all, but the language "
                                         rf"model's max_position_embeddings is {limit}"):
        session.ask("What tissue is this?", max_new_tokens=limit - len(first) + 1)
    assert session.cache is None and session.prefill_lengths == [] and session.messages == []  # nothing ran
    session.ask("What tissue is this?", max_new_tokens=3)
    follow = session.render([*session.messages, {"role": "user", "content": "And the grade?"}])
    assert len(follow) > len(first)
    with pytest.raises(ValueError, match=rf"the prompt is {len(follow)} tokens"):
        session.ask("And the grade?", max_new_tokens=limit - len(follow) + 1)
    assert len(session.messages) == 2  # the refused turn left the conversation as it was
    session.ask("And the grade?", max_new_tokens=2)  # fits: the session is still usable
    assert len(session.prefill_lengths) == 2 and len(session.messages) == 4


def test_batch_refuses_beyond_max_positions(tiny):
    _, model, tokenizer = tiny
    limit = model.config.text_config.max_position_embeddings
    items = [(*_slide(5, 0), "Short?"), (*_slide(9, 1), "A much longer question about this slide?")]
    with pytest.raises(ValueError, match=rf"generate_batch: the prompt is \d+ tokens .* max_new_tokens is "
                                         rf"{limit}, .* max_position_embeddings is {limit}"):
        generate_batch(model, tokenizer, items, max_new_tokens=limit)


def test_slide_size_reaches_the_connector_on_every_path():
    """With a slide-frame connector the slide's size changes the answer's logits, and batch, single
    and session generation all pass it through (and agree)."""
    from tiny_models import SLIDE_FRAME_CONNECTOR

    model, tokenizer = build_tiny("qwen2", SLIDE_FRAME_CONNECTOR)
    features, coords = _slide(12, 3)
    small, large = torch.tensor([5000.0, 5000.0]), torch.tensor([40_000.0, 40_000.0])
    question = "Where is the tissue?"
    prompt = render_conversation([{"role": "user", "content": f"<slide>\n{question}"}], tokenizer, K,
                                 add_generation_prompt=True).input_ids
    with torch.no_grad():
        logits = {name: model(input_ids=torch.tensor([prompt]), tile_features=features[None], tile_coords=coords[None],
                              slide_size_um=size[None]).logits[0, -1]
                  for name, size in (("small", small), ("large", large))}
    assert (logits["small"] - logits["large"]).abs().max() > 1e-3
    items = [(features, coords, question), (features, coords, question)]
    batched = generate_batch(model, tokenizer, items, max_new_tokens=6, slide_sizes=[small, large])
    singles = [generate_batch(model, tokenizer, [items[0]], max_new_tokens=6, slide_sizes=[s])[0] for s in (small, large)]
    assert batched == singles
    session = ChatSession(model, tokenizer, features, coords, slide_size_um=large, keep_prefill_logits=True)
    assert session.ask(question, max_new_tokens=6) == singles[1]
    torch.testing.assert_close(session.last_logits[0][-1], logits["large"], atol=1e-5, rtol=1e-5)
    result = generate_batch_ids(model, tokenizer, items, max_new_tokens=4, slide_sizes=[small, None])
    assert result.tiles["slide_size_um"] is not None and result.tiles["slide_size_um"][1].isnan().all()
    assert answer_relevance(model, **result.relevance_inputs()).shape == (2, 12)
    with pytest.raises(ValueError, match="1 slide sizes for 2 items"):
        generate_batch(model, tokenizer, items, max_new_tokens=2, slide_sizes=[small])


def test_end_of_turn_ids_are_the_family_tokens_present_and_never_the_unknown_id(tiny):
    kind, model, tokenizer = tiny
    vocab = tokenizer.get_vocab()
    expected = {vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>",
                                   "<end_of_turn>", "</s>") if t in vocab}
    expected.add(tokenizer.eos_token_id)
    gen_eos = model.generation_config.eos_token_id
    expected.update(gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos])
    ids = end_of_turn_ids(tokenizer, model)
    assert ids == expected and len(ids) >= 2, (kind, ids, expected)  # eos plus the family's end-of-turn


def test_labelled_slide_tokens_in_session_batch_and_checkpoint(tmp_path):
    """A model that names its slide tokens renders each name before its token on every path, keeps the
    cache exact, and keeps the names through save_pretrained / load_pathchat."""
    from tiny_models import CONNECTOR, text_config

    from pathchat.model.conversation import add_slide_tokens, slide_block
    from pathchat.model.modeling import build_pathchat
    from pathchat.model.pretrained import load_pathchat
    from pathchat.model.tokenizers import build_test_tokenizer

    labels = [f" token {i}:" for i in range(K)]
    tokenizer = build_test_tokenizer("qwen2")
    add_slide_tokens(tokenizer)
    torch.manual_seed(0)
    model = build_pathchat(text_config("qwen2", len(tokenizer)), tokenizer, FEATURE_DIM, CONNECTOR,
                           slide_token_labels=labels).eval()
    block = slide_block(tokenizer, K, labels)
    features, coords = _slide(12, 0)
    session = ChatSession(model, tokenizer, features, coords, keep_prefill_logits=True)
    first = session.ask("What tissue is this?", max_new_tokens=5)
    prompt = session.render(session.messages[:1])
    start = prompt.index(block[0])
    assert prompt[start:start + len(block)] == block
    session.ask("Any necrosis?", max_new_tokens=4)
    target = session.render(session.messages[:3])
    new = session.prefill_lengths[1]
    assert (session.last_logits[1] - _full_logits(model, session, target)[-new:]).abs().max().item() < 1e-4
    assert generate_batch(model, tokenizer, [(features, coords, "What tissue is this?")], max_new_tokens=5) == [first]

    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded, loaded_tokenizer = load_pathchat(tmp_path / "ckpt")
    assert loaded.config.slide_token_labels == labels
    again = ChatSession(loaded.eval(), loaded_tokenizer, features, coords)
    assert again.render([{"role": "user", "content": "<slide>\nWhat tissue is this?"}]) == prompt


def test_slide_token_labels_must_name_every_token():
    from tiny_models import CONNECTOR, text_config

    from pathchat.model.configuration import PathChatConfig

    with pytest.raises(ValueError, match=f"slide_token_labels needs {K} non-empty labels"):
        PathChatConfig(text_config=text_config("qwen2", 300), connector=CONNECTOR, feature_dim=FEATURE_DIM,
                       slide_token_labels=["a", "b"])
