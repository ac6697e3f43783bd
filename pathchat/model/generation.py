"""Chatting about slides: a KV-cached multi-turn session, left-padded batch answers, answer evidence.

`ChatSession` keeps the KV cache of everything the model has read or written (system prompt,
slide tokens, earlier questions and its own answers), so a follow-up question prefills only its
own new tokens and the connector runs once per session. The new tokens of a turn are the
difference between the chat template's rendering of the whole conversation and the token ids
already in the cache; when the cached ids are not a prefix of that rendering (a template that
is not prefix-stable, or an answer that re-tokenises differently), the cache is cropped to the
longest common prefix (or dropped, when that prefix does not cover the slide) and a log line
says so.

`generate_batch` answers many (slide, question) items greedily with left padding (tiles padded
to the longest slide with `tile_mask`), and `answer_relevance` turns the connector's per-token
tile weights into one per-tile map per answer, weighted by the answer's attention to the slide
tokens.

Context length: a turn whose prompt plus `max_new_tokens` exceeds the language model's
`max_position_embeddings` is refused before anything runs, with both numbers in the error
(`check_context`); old turns are never dropped silently. `<slide>` and the placeholder are never
generated (their logits are masked), so their embeddings never reach the language model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor
from transformers import DynamicCache, PretrainedConfig, PreTrainedTokenizerBase

from pathchat.model.connectors.positions import stack_slide_sizes
from pathchat.model.conversation import SLIDE_TOKEN, render_conversation
from pathchat.model.modeling import PathChatForConditionalGeneration

__all__ = [
    "ChatSession",
    "BatchGeneration",
    "answer_relevance",
    "check_context",
    "end_of_turn_ids",
    "generate_batch",
    "generate_batch_ids",
    "max_context",
    "suppressed_ids",
]

logger = logging.getLogger(__name__)

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>",
                       "<end_of_turn>", "</s>")


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, model: Any | None = None) -> set[int]:
    """Token ids that end an answer: eos, the model's generation eos, and known end-of-turn tokens."""
    ids: set[int] = set()
    candidates: list[Any] = [tokenizer.eos_token_id]
    gen_config = getattr(model, "generation_config", None)
    if gen_config is not None:
        candidates.append(gen_config.eos_token_id)
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab)
    return ids


def _next_token(logits: Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int,
                generator: torch.Generator | None) -> Tensor:
    """`[b, V]` float logits -> `[b]` next ids (greedy, or temperature / top-k / top-p sampling)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the first token always
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def max_context(model: PathChatForConditionalGeneration) -> int | None:
    """The language model's `max_position_embeddings` (None when its config has none)."""
    value = getattr(model.config.text_config, "max_position_embeddings", None)
    return int(value) if value is not None else None


def check_context(model: PathChatForConditionalGeneration, prompt_tokens: int, max_new_tokens: int,
                  where: str) -> None:
    """Raise when prompt + answer budget cannot fit the language model's positions.

    The policy is to refuse, never to truncate silently: old turns hold the slide tokens (on the
    first turn) and the context the answer depends on, so the caller decides what to drop
    (start a new `ChatSession`, ask shorter, lower `max_new_tokens`).

    Raises:
        ValueError: naming the prompt length, max_new_tokens, their sum and the model's limit.
    """
    limit = max_context(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"{where}: the prompt is {prompt_tokens} tokens (slide tokens included) and "
                         f"max_new_tokens is {max_new_tokens}, {prompt_tokens + max_new_tokens} in all, "
                         f"but the language model's max_position_embeddings is {limit}; start a new "
                         "session, shorten the conversation or lower max_new_tokens")


def suppressed_ids(model: PathChatForConditionalGeneration) -> list[int]:
    """Ids never generated: `<slide>` and the placeholder (their embeddings must not reach the LM)."""
    return [int(i) for i in (model.config.slide_token_id, model.config.slide_placeholder_id) if i is not None]


def _text_delta(tokenizer: PreTrainedTokenizerBase, ids: list[int], emitted: str, final: bool) -> str:
    """What decoding `ids` adds after `emitted`; holds back an unfinished UTF-8 character."""
    text = str(tokenizer.decode(ids, skip_special_tokens=True))
    if not text.startswith(emitted):
        return ""  # decoding changed earlier text (rare); the rest comes out when it settles
    if not final and text.endswith("\ufffd"):
        return ""
    return text[len(emitted):]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """Multi-turn chat about one slide that keeps the KV cache of the whole conversation so far.

    Args:
        model: a `PathChatForConditionalGeneration` (put it in eval mode; it is not changed).
        tokenizer: its tokenizer, with a chat template and the slide tokens.
        tile_features: `[n, d_enc]` or `[1, n, d_enc]` cached tile features of the slide.
        tile_coords: `[n, 2]` / `[1, n, 2]` tile positions in micrometres (None: the connector's default).
        tile_mask: `[n]` / `[1, n]` bool, True for real tiles (None: all real).
        slide_size_um: `[2]` / `[1, 2]` (width, height) of the slide in µm, for connectors that place
            tiles on the glass (`FeatureBag.slide_size_um()`); None when unknown.
        system_prompt: first message; None keeps the template's default.
        max_new_tokens, do_sample, temperature, top_p, top_k: defaults for `ask`.
        generator: RNG for sampling (None: torch's global RNG).
        keep_prefill_logits: keep each turn's `[new, V]` prefill logits in `last_logits` (for
            tests and debugging; off, the prefill computes only the last position's logits).

    Attributes:
        messages: the conversation so far (the first user message carries `<slide>`).
        prefill_lengths: per turn, how many tokens `ask` had to run through the model before
            generating (the whole prompt on the first turn, only the new tokens afterwards).
        full_recomputes: turns whose cache could not be reused (0 for a prefix-stable template).
        connector_runs: how many times the connector ran (1 per session unless recomputed).
    """

    def __init__(
        self,
        model: PathChatForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        tile_features: Tensor,
        tile_coords: Tensor | None = None,
        tile_mask: Tensor | None = None,
        slide_size_um: Tensor | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        keep_prefill_logits: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tiles: dict[str, Tensor | None] = {
            "tile_features": _batch1(tile_features, 3),
            "tile_coords": None if tile_coords is None else _batch1(tile_coords, 3),
            "tile_mask": None if tile_mask is None else _batch1(tile_mask, 2),
            "slide_size_um": None if slide_size_um is None else _batch1(slide_size_um, 2),
        }
        self.system_prompt = system_prompt
        self.defaults: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                         "temperature": temperature, "top_p": top_p, "top_k": top_k}
        self.generator = generator
        self.messages: list[dict[str, str]] = []
        if system_prompt is not None:
            self.messages.append({"role": "system", "content": system_prompt})
        self.prefill_lengths: list[int] = []
        self.full_recomputes = 0
        self.connector_runs = 0
        self.stop_ids = end_of_turn_ids(tokenizer, model)
        self.suppress_ids = suppressed_ids(model)
        self.cache: DynamicCache | None = None
        self.cached_ids: list[int] = []  # exactly the ids whose keys/values are in self.cache
        self.answer_ids: list[list[int]] = []  # generated ids per turn (end-of-turn token included)
        self.keep_prefill_logits = keep_prefill_logits
        self.last_logits: list[Tensor] = []  # per turn: `[new, V]` logits of the prefilled tokens
        self._busy = False

    @property
    def k(self) -> int:
        return int(self.model.config.num_slide_tokens or 0)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of `messages` (ending with a user message) plus the assistant header."""
        return render_conversation(messages, self.tokenizer, self.k, add_generation_prompt=True).input_ids

    def _prefill(self, target: list[int]) -> Tensor:
        """Run the uncached part of `target` into the cache; return the last position's logits."""
        reuse = _common_prefix(self.cached_ids, target)
        placeholder = self.model.config.slide_placeholder_id
        last_placeholder = max((i for i, t in enumerate(target) if t == placeholder), default=-1)
        if self.cache is not None and reuse < len(self.cached_ids):
            if reuse > last_placeholder and reuse > 0:
                logger.info("ChatSession: cached ids are not a prefix of the rendered conversation "
                            "(template not prefix-stable or answer re-tokenised differently); "
                            "recomputing from token %d of %d", reuse, len(target))
                _crop_to(self.cache, reuse)
                self.cached_ids = self.cached_ids[:reuse]
            else:
                logger.info("ChatSession: cached ids diverge before the slide tokens; full recompute "
                            "of %d tokens", len(target))
                self.cache, self.cached_ids = None, []
            self.full_recomputes += 1
        if self.cache is not None and len(self.cached_ids) >= len(target):
            # Nothing new (cannot happen with a generation prompt): re-run the last token.
            _crop_to(self.cache, len(target) - 1)
            self.cached_ids = self.cached_ids[: len(target) - 1]
        new = target[len(self.cached_ids):]
        device = self._device()
        kwargs: dict[str, Any] = {}
        if self.cache is None:
            self.cache = _new_cache(self.model)
            kwargs = {name: (None if t is None else t.to(device)) for name, t in self.tiles.items()}
            self.connector_runs += 1
        input_ids = torch.tensor([new], device=device)
        total = len(self.cached_ids) + len(new)
        out = self.model(input_ids=input_ids, attention_mask=torch.ones(1, total, dtype=torch.long,
                                                                        device=device),
                         cache=self.cache, use_cache=True,
                         logits_to_keep=0 if self.keep_prefill_logits else 1, **kwargs)
        self.cached_ids = self.cached_ids + new
        self.prefill_lengths.append(len(new))
        if self.keep_prefill_logits:
            self.last_logits.append(out.logits[0].detach())
        return out.logits[0, -1]

    @overload
    def ask(self, question: str, max_new_tokens: int | None = ..., do_sample: bool | None = ...,
            temperature: float | None = ..., top_p: float | None = ..., top_k: int | None = ...,
            stream: Literal[False] = ...) -> str: ...

    @overload
    def ask(self, question: str, max_new_tokens: int | None = ..., do_sample: bool | None = ...,
            temperature: float | None = ..., top_p: float | None = ..., top_k: int | None = ...,
            *, stream: Literal[True]) -> Iterator[str]: ...

    def ask(self, question: str, max_new_tokens: int | None = None, do_sample: bool | None = None,
            temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
            stream: bool = False) -> str | Iterator[str]:
        """Answer `question` about the slide, reusing the cache of the conversation so far.

        The first question gets `<slide>\\n` in front unless it already has `<slide>`; later
        questions must not contain it (the slide is shown once). Generation stops at an
        end-of-turn token or after `max_new_tokens`.

        Returns:
            The answer text, or with `stream=True` an iterator of text pieces whose concatenation
            is the same text (the session is updated when the iterator ends or is closed).

        Raises:
            ValueError: the conversation so far plus this question plus `max_new_tokens` exceeds
                the language model's `max_position_embeddings` (both numbers named; checked before
                anything runs). Old turns are never dropped silently: start a new session.
        """
        settings = dict(self.defaults)
        for name, value in (("max_new_tokens", max_new_tokens), ("do_sample", do_sample),
                            ("temperature", temperature), ("top_p", top_p), ("top_k", top_k)):
            if value is not None:
                settings[name] = value
        pieces = self._ask(question, **settings)
        if stream:
            return pieces
        return "".join(pieces)

    def _ask(self, question: str, max_new_tokens: int, do_sample: bool, temperature: float,
             top_p: float, top_k: int) -> Iterator[str]:
        if self._busy:
            raise RuntimeError("ChatSession: finish (or close) the previous streamed answer first")
        first = not any(m["role"] == "user" for m in self.messages)
        if first and SLIDE_TOKEN not in question:
            question = f"{SLIDE_TOKEN}\n{question}"
        if not first and SLIDE_TOKEN in question:
            raise ValueError(f"ChatSession: only the first question may contain {SLIDE_TOKEN}")
        prompt = self.render([*self.messages, {"role": "user", "content": question}])  # raise early
        check_context(self.model, len(prompt), max_new_tokens, "ChatSession")
        return self._generate(question, (len(self.messages), prompt), max_new_tokens, do_sample, temperature,
                              top_p, top_k)

    @torch.no_grad()
    def _generate(self, question: str, rendered: tuple[int, list[int]], max_new_tokens: int, do_sample: bool,
                  temperature: float, top_p: float, top_k: int) -> Iterator[str]:
        if self._busy:
            raise RuntimeError("ChatSession: finish (or close) the previous streamed answer first")
        self._busy = True
        messages = [*self.messages, {"role": "user", "content": question}]
        generated: list[int] = []
        emitted = ""
        device = self._device()
        try:
            # `_ask` rendered the prompt already; render again only if the conversation moved on
            # since (another answer finished between creating this stream and starting it).
            history_length, target = rendered
            if history_length != len(self.messages):
                target = self.render(messages)
                check_context(self.model, len(target), max_new_tokens, "ChatSession")
            suppress = torch.tensor(self.suppress_ids, dtype=torch.long, device=device)
            logits = self._prefill(target)
            for _ in range(max_new_tokens):
                logits = logits.index_fill(0, suppress, float("-inf"))  # a copy: last_logits keep theirs
                token = int(_next_token(logits.unsqueeze(0), do_sample, temperature, top_p, top_k,
                                        self.generator)[0])
                generated.append(token)
                if token in self.stop_ids:
                    break
                piece = _text_delta(self.tokenizer, generated, emitted, final=False)
                if piece:
                    emitted += piece
                    yield piece
                if len(generated) == max_new_tokens:
                    break
                assert self.cache is not None
                # One unpadded sequence: no attention mask (the causal mask follows the cache),
                # which spares the language model its per-step mask checks.
                out = self.model(input_ids=torch.tensor([[token]], device=device), cache=self.cache,
                                 use_cache=True)
                self.cached_ids.append(token)
                logits = out.logits[0, -1]
            piece = _text_delta(self.tokenizer, generated, emitted, final=True)
            if piece:
                emitted += piece
                yield piece
        finally:
            # Also on close(): the cache holds the answer so far, so record it as the answer.
            self._busy = False
            if len(self.prefill_lengths) > len(self.answer_ids):  # the prefill happened
                self.messages = [*messages, {"role": "assistant", "content": emitted}]
                self.answer_ids.append(generated)

    def relevance(self, turn: int = -1) -> Tensor:
        """`[n]` per-tile relevance of one answer (default the last), see `answer_relevance`."""
        if not self.answer_ids:
            raise ValueError("ChatSession: no answer yet")
        turns = len(self.answer_ids)
        turn = turn % turns
        # The conversation up to and including that answer, as the model saw it: rendered prompt
        # of that turn (prefix of the cache by construction when no recompute happened) + answer.
        msgs = self.messages[: self._message_index(turn) + 1]
        prompt = self.render(msgs)
        answer = self.answer_ids[turn]
        ids = torch.tensor([prompt + answer])
        answer_mask = torch.zeros_like(ids, dtype=torch.bool)
        answer_mask[0, len(prompt):] = True
        return answer_relevance(self.model, ids, answer_mask, **self.tiles)[0]  # type: ignore[arg-type]

    def _message_index(self, turn: int) -> int:
        """Index in `messages` of the user message of `turn`."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        return users[turn]


def _new_cache(model: PathChatForConditionalGeneration) -> DynamicCache:
    text_config = model.config.text_config
    assert isinstance(text_config, PretrainedConfig)
    return DynamicCache(config=text_config)


def _crop_to(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of the cache (transformers 5 `crop` takes minus the count to drop)."""
    drop = cache.get_seq_length() - length
    if drop > 0:
        cache.crop(-drop)


def _batch1(t: Tensor, dims: int) -> Tensor:
    if t.dim() == dims - 1:
        t = t.unsqueeze(0)
    if t.dim() != dims or t.shape[0] != 1:
        raise ValueError(f"expected one slide ({dims - 1} dims, or {dims} with batch 1), got {tuple(t.shape)}")
    return t


def _pad_tiles(items: Sequence[tuple[Tensor, Tensor | None]], device: torch.device,
               slide_sizes: Sequence[Tensor | None] | None = None) -> dict[str, Tensor | None]:
    """Right-pad `[n_i, d]` features (and `[n_i, 2]` coords) to `[b, n_max, ...]` with a tile_mask;
    slide sizes become `[b, 2]` (NaN rows where unknown)."""
    feats = [f.squeeze(0) if f.dim() == 3 else f for f, _ in items]
    n_max = max(f.shape[0] for f in feats)
    b, d = len(feats), feats[0].shape[-1]
    features = feats[0].new_zeros(b, n_max, d)
    mask = torch.zeros(b, n_max, dtype=torch.bool)
    has_coords = [c is not None for _, c in items]
    if any(has_coords) and not all(has_coords):
        raise ValueError("give tile_coords for every item or for none")
    coords = features.new_zeros(b, n_max, 2) if all(has_coords) else None
    for i, (f, (_, c)) in enumerate(zip(feats, items, strict=True)):
        features[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = True
        if coords is not None and c is not None:
            coords[i, : f.shape[0]] = c.squeeze(0) if c.dim() == 3 else c
    if slide_sizes is not None and len(slide_sizes) != b:
        raise ValueError(f"{len(slide_sizes)} slide sizes for {b} items")
    sizes = None if slide_sizes is None else stack_slide_sizes(list(slide_sizes))
    return {"tile_features": features.to(device), "tile_mask": mask.to(device),
            "tile_coords": None if coords is None else coords.to(device),
            "slide_size_um": None if sizes is None else sizes.to(device)}


@dataclass
class BatchGeneration:
    """What `generate_batch_ids` produced, ready for `answer_relevance(model, **result.relevance_inputs())`.

    Attributes:
        answers: one text per item.
        sequences: `[b, L]` left-padded prompts followed by the generated ids (pad after a stop).
        attention_mask: `[b, L]` 1 on real prompt tokens and generated answer tokens.
        answer_mask: `[b, L]` True at each item's generated tokens (its end-of-turn token included).
        tiles: the padded `tile_features` / `tile_coords` / `tile_mask` / `slide_size_um` the batch ran with.
    """

    answers: list[str]
    sequences: Tensor
    attention_mask: Tensor
    answer_mask: Tensor
    tiles: dict[str, Tensor | None]

    def relevance_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.sequences, "answer_mask": self.answer_mask,
                "attention_mask": self.attention_mask, **self.tiles}


def generate_batch(
    model: PathChatForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[tuple[Tensor, Tensor | None, str]],
    max_new_tokens: int = 256,
    system_prompt: str | None = None,
    slide_sizes: Sequence[Tensor | None] | None = None,
) -> list[str]:
    """Greedy answers to many (tile_features, tile_coords, question) items; see `generate_batch_ids`."""
    if not items:
        return []
    return generate_batch_ids(model, tokenizer, items, max_new_tokens, system_prompt, slide_sizes).answers


@torch.no_grad()
def generate_batch_ids(
    model: PathChatForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[tuple[Tensor, Tensor | None, str]],
    max_new_tokens: int = 256,
    system_prompt: str | None = None,
    slide_sizes: Sequence[Tensor | None] | None = None,
) -> BatchGeneration:
    """Greedy answers to many (tile_features, tile_coords, question) items in one left-padded batch.

    Each question gets `<slide>\\n` in front unless it has `<slide>`. Prompts are left-padded
    (position ids follow the attention mask, so padding does not shift positions) and tiles are
    right-padded to the longest slide with `tile_mask`. `slide_sizes` gives each item's slide size in
    µm (`[2]`, or None when unknown) for connectors that place tiles on the glass; None for all
    unknown. An item stops at its first end-of-turn
    token; the batch stops when all have stopped or after `max_new_tokens`.

    Returns:
        A `BatchGeneration`: the answer texts, plus the ids, masks and padded tiles for
        `answer_relevance`.

    Raises:
        ValueError: the longest prompt plus `max_new_tokens` exceeds the language model's
            `max_position_embeddings` (both numbers named), before anything runs.
    """
    if not items:
        raise ValueError("generate_batch_ids: no items")
    device = next(model.parameters()).device
    k = int(model.config.num_slide_tokens or 0)
    prompts = []
    for _, _, question in items:
        q = question if SLIDE_TOKEN in question else f"{SLIDE_TOKEN}\n{question}"
        prompts.append(render_conversation([{"role": "user", "content": q}], tokenizer, k,
                                           system_prompt=system_prompt,
                                           add_generation_prompt=True).input_ids)
    b, width = len(prompts), max(len(p) for p in prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = int(pad_id or 0)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1
    check_context(model, width, max_new_tokens, "generate_batch")
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    tiles = _pad_tiles([(f, c) for f, c, _ in items], device, slide_sizes)
    stop_ids = torch.tensor(sorted(end_of_turn_ids(tokenizer, model)), device=device)

    cache = _new_cache(model)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, use_cache=True, **tiles)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    generated: list[Tensor] = []
    alive: list[Tensor] = []  # per step, which rows were still answering when it was generated
    next_pos = position_ids[:, -1] + 1
    suppress = torch.tensor(suppressed_ids(model), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = out.logits[:, -1].index_fill(1, suppress, float("-inf")).argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        generated.append(token)
        alive.append(~done)
        done = done | torch.isin(token, stop_ids)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        # Rows that have stopped keep decoding pad ids; their outputs are discarded.
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(input_ids=token.unsqueeze(1), attention_mask=attention_mask,
                    position_ids=next_pos.unsqueeze(1), cache=cache, use_cache=True)
        next_pos = next_pos + 1
    gen = torch.stack(generated, dim=1)  # [b, T]
    live = torch.stack(alive, dim=1)
    answers = []
    for i in range(b):
        ids = gen[i][live[i]].tolist()
        answers.append(str(tokenizer.decode(ids, skip_special_tokens=True)))
    sequences = torch.cat([input_ids, gen], dim=1)
    full_mask = torch.cat([attention_mask[:, :width], live.long()], dim=1)
    answer_mask = torch.cat([torch.zeros_like(input_ids, dtype=torch.bool), live], dim=1)
    return BatchGeneration(answers=answers, sequences=sequences, attention_mask=full_mask,
                           answer_mask=answer_mask, tiles=tiles)


@torch.no_grad()
def answer_relevance(
    model: PathChatForConditionalGeneration,
    input_ids: Tensor,
    answer_mask: Tensor,
    tile_features: Tensor,
    tile_coords: Tensor | None = None,
    tile_mask: Tensor | None = None,
    attention_mask: Tensor | None = None,
    slide_size_um: Tensor | None = None,
) -> Tensor:
    """Per answer, how much each tile supports it: `[b, n]`, >= 0, summing to 1 over valid tiles.

    One eager forward with attentions over the whole sequence (prompt + answer). For each
    answer, w[j] is the attention paid to slide token j, averaged over layers, heads and the
    query positions that produced the answer's tokens (position p-1 for answer token p);
    the map is `w @ token_relevance` (`[k] @ [k, n]`), zeroed on padding tiles and normalised.
    A connector without `token_relevance` falls back to its `tile_relevance`.

    Args:
        input_ids: `[b, L]` prompt (k placeholders each) followed by the answer tokens.
        answer_mask: `[b, L]` bool, True at answer tokens (at least one per row).
        tile_features, tile_coords, tile_mask: the slides, as for `forward`.
        attention_mask: `[b, L]` (None: all ones); left padding is handled with position ids.
        slide_size_um: `[b, 2]` slide sizes in µm, as for `forward`.
    """
    device = next(model.parameters()).device
    input_ids, answer_mask = input_ids.to(device), answer_mask.to(device).bool()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if not bool(answer_mask.any(dim=1).all()):
        raise ValueError("answer_mask: every row needs at least one answer token")
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    lm = model.language_model
    previous = lm.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    tile_features=tile_features.to(device),
                    tile_coords=None if tile_coords is None else tile_coords.to(device),
                    tile_mask=None if tile_mask is None else tile_mask.to(device),
                    slide_size_um=None if slide_size_um is None else slide_size_um.to(device),
                    use_cache=False, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    if not out.attentions:
        raise RuntimeError("the language model returned no attentions (needs eager attention)")
    attn = torch.stack([a.float() for a in out.attentions]).mean(dim=(0, 2))  # [b, L(q), L(k)]
    queries = torch.zeros_like(answer_mask)
    queries[:, :-1] = answer_mask[:, 1:]  # the position that predicted each answer token
    placeholder: Tensor = input_ids.eq(int(model.config.slide_placeholder_id or -1))
    b, n = tile_features.shape[0], tile_features.shape[1]
    valid = (torch.ones(b, n, dtype=torch.bool, device=device) if tile_mask is None
             else tile_mask.to(device).bool())
    result = torch.zeros(b, n, device=device)
    for i in range(b):
        to_slide = attn[i][queries[i]][:, placeholder[i]].mean(dim=0)  # [k], slide-token order
        if out.token_relevance is not None:
            rel = to_slide @ out.token_relevance[i].float()
        else:
            assert out.tile_relevance is not None
            rel = out.tile_relevance[i].float() * to_slide.sum()
        rel = rel.clamp(min=0) * valid[i]
        total = rel.sum()
        result[i] = rel / total if total > 0 else valid[i].float() / valid[i].sum().clamp(min=1)
    return result
