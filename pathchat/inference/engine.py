"""The decode engine: one sampler and one token loop, under a KV-cached chat session and batch answers.

`decode` is the only generation loop: it samples (greedy or temperature / top-k / top-p) from
`[b, V]` logits, masks the tokens that must never be generated, stops each row at its end-of-turn
token and feeds the chosen tokens back through the model's KV cache. `ChatSession` streams one
slide's answers through it (batch 1), `generate_batch_ids` many slides' answers at once (left
padding); both are thin wrappers, so a streamed greedy answer equals the batched one, and both
equal transformers' `generate` token for token (tested).

`ChatSession` keeps the KV cache of everything the model has read or written (system prompt,
slide tokens, earlier questions and its own answers), so a follow-up question prefills only its
own new tokens and the connector runs once per session. The new tokens of a turn are the
difference between the chat template's rendering of the whole conversation and the token ids
already in the cache; when the cached ids are not a prefix of that rendering (a template that
is not prefix-stable, or an answer that re-tokenises differently), the cache is cropped to the
longest common prefix (or dropped, when that prefix does not cover the slide) and a log line
says so.

Every session of a model begins with the same tokens before its first slide token (system
prompt, user header, the first slide-token name). Their keys and values do not depend on the
slide, so `PrefixCache` keeps them per model and a new session copies them instead of running
them again: its first prefill runs only the slide tokens and the question (the time to the first
token falls with the tokens prefilled).

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

import copy
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor
from transformers import DynamicCache, PretrainedConfig, PreTrainedTokenizerBase

from pathchat.data.collator import pad_tiles
from pathchat.model.connectors.positions import stack_slide_sizes
from pathchat.model.conversation import SLIDE_TOKEN, render_conversation, vocab_id
from pathchat.model.modeling import PathChatForConditionalGeneration

__all__ = [
    "SamplingParams",
    "decode",
    "sample_next",
    "ChatSession",
    "PrefixCache",
    "BatchGeneration",
    "check_context",
    "end_of_turn_ids",
    "generate_batch",
    "generate_batch_ids",
    "max_context",
    "prime_prefix",
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
    # Token by token (`vocab_id`): `get_vocab()` took 37 ms for SmolLM2, a fifth of a session's
    # time to first token.
    ids.update(i for i in (vocab_id(tokenizer, t) for t in _END_OF_TURN_TOKENS) if i is not None)
    return ids


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token: greedy (default) or sampled, and the answer's length budget."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0  # > 0; only when sampling
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 keeps all
    top_k: int = 0  # 0 keeps all

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """`[b, V]` logits -> `[b]` next ids (greedy, or temperature / top-k / top-p sampling)."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs > params.top_p  # keep the first token always
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(
    model: PathChatForConditionalGeneration,
    logits: Tensor,
    cache: DynamicCache,
    params: SamplingParams,
    stop_ids: Sequence[int],
    pad_id: int,
    attention_mask: Tensor | None = None,
    next_positions: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """The token loop: yields `(tokens [b], alive [b])` per step, `alive` False for rows already stopped.

    `logits` `[b, V]` are the last prompt position's. A row stops at its first token in `stop_ids`
    (that token is yielded, with alive True); stopped rows get `pad_id`. Each yielded token is fed
    through the model (extending `cache`) only when the consumer asks for the next one, so the
    cache always holds every yielded token except the last: closing the iterator early (a stop
    button) leaves a consistent cache.

    Args:
        attention_mask: `[b, L]` of the cached positions for left-padded batches (None for one
            unpadded row: the causal mask follows the cache); extended by one column per step.
        next_positions: `[b]` position id of each row's next token (with `attention_mask`).
    """
    device = logits.device
    suppress = torch.tensor(suppressed_ids(model), dtype=torch.long, device=device)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    for step in range(params.max_new_tokens):
        logits = logits.index_fill(-1, suppress, float("-inf"))  # a copy: callers keep their logits
        token = sample_next(logits, params, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        alive = ~done
        done = done | torch.isin(token, stops)
        yield token, alive
        if bool(done.all()) or step == params.max_new_tokens - 1:
            return
        kwargs: dict[str, Tensor] = {}
        if attention_mask is not None:
            assert next_positions is not None
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            kwargs = {"attention_mask": attention_mask, "position_ids": next_positions.unsqueeze(1)}
            next_positions = next_positions + 1
        # Rows that have stopped keep decoding pad ids; their outputs are discarded.
        out = model(input_ids=token.unsqueeze(1), cache=cache, use_cache=True, **kwargs)
        logits = out.logits[:, -1]


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


class PrefixCache:
    """Keys and values of slide-independent prompt prefixes, shared by the sessions of one model.

    An entry is valid only for the weights it was computed with: it is keyed by the parameters'
    identities and in-place versions (and their device and dtype), so training, `load_state_dict`
    or merging an adapter after an entry was made turns it into a miss, never a stale hit. At most
    `max_entries` prefixes (system prompts) are kept, least recently used first out. Thread-safe:
    the web UI runs sessions on worker threads.
    """

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], tuple[tuple[Any, ...] | None, DynamicCache]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def weights_key(model: torch.nn.Module) -> tuple[Any, ...] | None:
        """What the weights are now (None when it cannot be told: inference tensors keep no versions)."""
        params = list(model.parameters())
        try:
            versions = tuple((id(p), p._version) for p in params)
        except RuntimeError:
            return None
        return versions, None if not params else (params[0].device, params[0].dtype)

    def get(self, model: torch.nn.Module, ids: Sequence[int]) -> DynamicCache | None:
        """A private copy of the cache of `ids` (None when absent or made with other weights)."""
        key = tuple(ids)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] is None or entry[0] != self.weights_key(model):
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return copy.deepcopy(entry[1])

    def put(self, model: torch.nn.Module, ids: Sequence[int], cache: DynamicCache) -> None:
        """Keep a copy of the first `len(ids)` positions of `cache` (which holds `ids` first)."""
        weights = self.weights_key(model)
        if weights is None:
            return
        kept = copy.deepcopy(cache)
        _crop_to(kept, len(ids))
        with self._lock:
            self._entries[tuple(ids)] = (weights, kept)
            self._entries.move_to_end(tuple(ids))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


def shareable_prefix(ids: Sequence[int], placeholder: int | None) -> list[int]:
    """The ids before the first slide placeholder: the same for every slide ([] without one)."""
    ids = list(ids)
    return ids[: ids.index(placeholder)] if placeholder is not None and placeholder in ids else []


_PREFIX_CACHES: weakref.WeakKeyDictionary[torch.nn.Module, PrefixCache] = weakref.WeakKeyDictionary()
_PREFIX_CACHES_LOCK = threading.Lock()


def prefix_cache_for(model: torch.nn.Module) -> PrefixCache:
    """The model's shared `PrefixCache` (made on first use; freed with the model)."""
    with _PREFIX_CACHES_LOCK:
        cache = _PREFIX_CACHES.get(model)
        if cache is None:
            cache = _PREFIX_CACHES[model] = PrefixCache()
        return cache


@torch.no_grad()
def prime_prefix(model: PathChatForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                 system_prompt: str | None = None) -> int:
    """Put the text before the slide of a first question into the model's `PrefixCache` now (at load
    time), so that the first session prefills no more than the later ones.

    Returns:
        Its length in tokens (0 for a model without slide tokens: nothing to share).
    """
    k = int(model.config.num_slide_tokens or 0)
    placeholder = model.config.slide_placeholder_id
    if not k or placeholder is None:
        return 0
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    ids = render_conversation([*messages, {"role": "user", "content": f"{SLIDE_TOKEN}\n"}], tokenizer, k,
                              add_generation_prompt=True,
                              slide_token_labels=model.config.slide_token_labels).input_ids
    prefix = shareable_prefix(ids, placeholder)
    if not prefix:
        return 0
    cache = _new_cache(model)
    device = next(model.parameters()).device
    model(input_ids=torch.tensor([prefix], device=device), cache=cache, use_cache=True, logits_to_keep=1)
    prefix_cache_for(model).put(model, prefix, cache)
    return len(prefix)


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
        share_prefix: start from the model's shared keys and values of the tokens before the first
            slide token (`PrefixCache`) when they are there, and leave them there when not.

    Attributes:
        messages: the conversation so far (the first user message carries `<slide>`).
        prefill_lengths: per turn, how many tokens `ask` had to run through the model before
            generating (the whole prompt on the first turn, less `shared_prefix_tokens`; only the
            new tokens afterwards).
        shared_prefix_tokens: how many tokens the first turn took from the model's `PrefixCache`.
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
        share_prefix: bool = True,
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
        self.cache: DynamicCache | None = None
        self.cached_ids: list[int] = []  # exactly the ids whose keys/values are in self.cache
        self.answer_ids: list[list[int]] = []  # generated ids per turn (end-of-turn token included)
        self.keep_prefill_logits = keep_prefill_logits
        self.share_prefix = share_prefix
        self.shared_prefix_tokens = 0
        self.last_logits: list[Tensor] = []  # per turn: `[new, V]` logits of the prefilled tokens
        self._busy = False

    @property
    def k(self) -> int:
        return int(self.model.config.num_slide_tokens or 0)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of `messages` (ending with a user message) plus the assistant header."""
        return render_conversation(messages, self.tokenizer, self.k, add_generation_prompt=True,
                                   slide_token_labels=self.model.config.slide_token_labels).input_ids

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
        prefix: list[int] = []
        if self.cache is None:
            if self.share_prefix:
                prefix = shareable_prefix(target, placeholder)
            shared = prefix_cache_for(self.model).get(self.model, prefix) if prefix else None
            if shared is not None:
                self.cache, self.cached_ids, self.shared_prefix_tokens = shared, list(prefix), len(prefix)
                new, prefix = target[len(prefix):], []
            else:
                self.cache = _new_cache(self.model)
            kwargs = {name: (None if t is None else t.to(device)) for name, t in self.tiles.items()}
            self.connector_runs += 1
        input_ids = torch.tensor([new], device=device)
        total = len(self.cached_ids) + len(new)
        out = self.model(input_ids=input_ids, attention_mask=torch.ones(1, total, dtype=torch.long,
                                                                        device=device),
                         cache=self.cache, use_cache=True,
                         logits_to_keep=0 if self.keep_prefill_logits else 1, **kwargs)
        if prefix:  # a miss: share this prompt's prefix with the sessions to come
            prefix_cache_for(self.model).put(self.model, prefix, self.cache)
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
        params = SamplingParams(max_new_tokens, do_sample, temperature, top_p, top_k)
        self._busy = True
        messages = [*self.messages, {"role": "user", "content": question}]
        generated: list[int] = []
        emitted = ""
        try:
            # `_ask` rendered the prompt already; render again only if the conversation moved on
            # since (another answer finished between creating this stream and starting it).
            history_length, target = rendered
            if history_length != len(self.messages):
                target = self.render(messages)
                check_context(self.model, len(target), max_new_tokens, "ChatSession")
            logits = self._prefill(target)
            assert self.cache is not None
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            for token, _ in decode(self.model, logits.unsqueeze(0), self.cache, params, sorted(self.stop_ids),
                                   int(pad_id), generator=self.generator):
                generated.append(int(token[0]))
                if generated[-1] in self.stop_ids:
                    break
                piece = _text_delta(self.tokenizer, generated, emitted, final=False)
                if piece:
                    emitted += piece
                    yield piece
            piece = _text_delta(self.tokenizer, [t for t in generated if t not in self.stop_ids], emitted,
                                final=True)
            if piece:
                emitted += piece
                yield piece
        finally:
            # Also on close(): the cache holds every generated token but the last (see `decode`).
            self._busy = False
            self.cached_ids += generated[:-1]
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
        from pathchat.inference.relevance import answer_relevance

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
    """The batch's tiles as the model takes them (`pad_tiles`, as in training); slide sizes `[b, 2]`."""
    feats = [f.squeeze(0) if f.dim() == 3 else f for f, _ in items]
    coords = [None if c is None else (c.squeeze(0) if c.dim() == 3 else c) for _, c in items]
    if any(c is not None for c in coords) and not all(c is not None for c in coords):
        raise ValueError("give tile_coords for every item or for none")
    features, padded_coords, mask = pad_tiles(feats, coords)
    if slide_sizes is not None and len(slide_sizes) != len(items):
        raise ValueError(f"{len(slide_sizes)} slide sizes for {len(items)} items")
    sizes = None if slide_sizes is None else stack_slide_sizes(list(slide_sizes))
    return {"tile_features": features.to(device), "tile_mask": mask.to(device),
            "tile_coords": None if padded_coords is None else padded_coords.to(device),
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
                                           system_prompt=system_prompt, add_generation_prompt=True,
                                           slide_token_labels=model.config.slide_token_labels).input_ids)
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

    cache = _new_cache(model)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, use_cache=True, logits_to_keep=1, **tiles)
    generated: list[Tensor] = []
    alive: list[Tensor] = []  # per step, which rows were still answering when it was generated
    params = SamplingParams(max_new_tokens=max_new_tokens)
    for token, live in decode(model, out.logits[:, -1], cache, params, sorted(end_of_turn_ids(tokenizer, model)),
                              pad_id, attention_mask=attention_mask, next_positions=position_ids[:, -1] + 1):
        generated.append(token)
        alive.append(live)
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
