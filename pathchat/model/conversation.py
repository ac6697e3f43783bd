"""Conversation records → token ids, loss labels and slide placeholders, via the tokenizer's own template.

Rendering never hand-writes a prompt format: the chat template of the tokenizer renders the
text, with ``<slide>`` kept as one special token, and each ``<slide>`` id is then expanded into
``num_slide_tokens`` placeholder ids that the model fills with connector outputs (each after its
label's text when the model names its slide tokens: `slide_block`). Assistant
spans are found by rendering prefixes (messages[:i] with a generation prompt vs messages[:i+1])
and diffing characters, so any prefix-stable template works, not only ones with ``{% generation %}``.
Truncation drops whole later turns and never cuts the slide tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "SLIDE_PLACEHOLDER",
    "SLIDE_TOKEN",
    "RenderedConversation",
    "add_slide_tokens",
    "format_token_mask",
    "messages_from_record",
    "render_conversation",
    "slide_block",
    "vocab_id",
]

SLIDE_TOKEN = "<slide>"
"""Marks where the slide goes in a user message; one special token in the rendered text."""
SLIDE_PLACEHOLDER = "<|slide_pad|>"
"""Repeated ``num_slide_tokens`` times in ``input_ids``; the model scatters slide embeddings there."""
IGNORE_INDEX = -100
"""Label of tokens that carry no loss (PyTorch cross-entropy's default ignore_index)."""

_IMAGE_ALIASES = ("<image>",)  # SlideChat / LLaVA spelling of the slide marker
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system"}


def vocab_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of `token` when the vocabulary holds it, else None (never the unknown token's id).

    A lookup, not `get_vocab()`: that builds a dict of the whole vocabulary (37 ms for SmolLM2's 49k).
    """
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return token_id


def add_slide_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Add ``<slide>`` and the placeholder as special tokens (idempotent).

    The caller must resize the model's embeddings to ``len(tokenizer)`` afterwards.

    Returns:
        (slide_token_id, placeholder_id).
    """
    # Every rendered conversation comes here: `vocab_id` looks two tokens up, not the whole vocabulary.
    missing = [t for t in (SLIDE_TOKEN, SLIDE_PLACEHOLDER) if vocab_id(tokenizer, t) is None]
    if missing:
        # Extend, never replace, the checkpoint's extra special tokens (renamed in transformers 5).
        key = "extra" if hasattr(tokenizer, "extra_special_tokens") else "additional"
        replace_flag: dict[str, Any] = {f"replace_{key}_special_tokens": False}
        tokenizer.add_special_tokens({f"{key}_special_tokens": missing}, **replace_flag)
    slide_id = tokenizer.convert_tokens_to_ids(SLIDE_TOKEN)
    placeholder_id = tokenizer.convert_tokens_to_ids(SLIDE_PLACEHOLDER)
    assert isinstance(slide_id, int) and isinstance(placeholder_id, int)
    return slide_id, placeholder_id


def slide_block(tokenizer: PreTrainedTokenizerBase, num_slide_tokens: int,
                labels: Sequence[str] | None = None) -> list[int]:
    """The ids one ``<slide>`` expands to.

    Without labels: ``k`` placeholders. With labels (one per slide token, tokenized as written, e.g.
    " upper left:"), each placeholder follows its label's tokens, so the LLM can name where a slide
    token's content lies by copying text it already reads, instead of learning what each position means.

    Raises:
        ValueError: a label count other than ``k``, or an empty label.
    """
    _, placeholder_id = add_slide_tokens(tokenizer)
    if labels is None:
        return [placeholder_id] * num_slide_tokens
    if len(labels) != num_slide_tokens:
        raise ValueError(f"{len(labels)} slide token labels for {num_slide_tokens} slide tokens; give one per token")
    ids: list[int] = []
    for label in labels:
        label_ids = list(tokenizer(label, add_special_tokens=False)["input_ids"])
        if not label_ids:
            raise ValueError(f"slide token label {label!r} has no tokens")
        ids += label_ids + [placeholder_id]
    return ids


def _where(record_id: str | None) -> str:
    return f"record {record_id!r}" if record_id is not None else "conversation"


def messages_from_record(record: Mapping[str, Any]) -> tuple[str | None, list[dict[str, str]]]:
    """Convert a LLaVA/SlideChat record into (slide_id, OpenAI-style messages).

    Accepts ``"slide": "<id>"`` or SlideChat's ``"image": ["<id>.csv"]`` (slide id = file stem),
    ``from`` human/gpt/system (or user/assistant) and ``<image>`` as an alias of ``<slide>``.
    A record with a slide but no ``<slide>`` marker gets ``"<slide>\\n"`` put before its first
    user message, the LLaVA convention, so the slide is never silently ignored.

    Raises:
        ValueError: naming the record id, for missing/empty conversations, unknown roles, empty
            values, roles that do not alternate user/assistant, or a marker without a slide.
    """
    record_id = record.get("id")
    where = _where(None if record_id is None else str(record_id))
    slide_id: str | None = None
    if record.get("slide") is not None:
        slide_id = str(record["slide"])
    elif record.get("image") is not None:
        images = record["image"]
        images = [images] if isinstance(images, str) else list(images)
        if len(images) != 1:
            raise ValueError(f"{where}: expected exactly one slide in 'image', got {len(images)}")
        slide_id = PurePath(str(images[0])).stem

    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: missing or empty 'conversations' list")
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{where}: turn {i} must be an object with 'from' and 'value'")
        role = _ROLE_ALIASES.get(str(turn["from"]))
        if role is None:
            raise ValueError(f"{where}: turn {i} has unknown role {turn['from']!r}")
        value = turn["value"]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: turn {i} ({turn['from']}) has an empty value")
        for alias in _IMAGE_ALIASES:
            value = value.replace(alias, SLIDE_TOKEN)
        messages.append({"role": role, "content": value})
    _check_roles(messages, where, allow_trailing_user=False)

    has_marker = any(SLIDE_TOKEN in m["content"] for m in messages)
    if has_marker and slide_id is None:
        raise ValueError(f"{where}: conversation mentions {SLIDE_TOKEN} but the record names no slide")
    if slide_id is not None and not has_marker:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = f"{SLIDE_TOKEN}\n{first_user['content']}"
    return slide_id, messages


def _check_roles(messages: Sequence[Mapping[str, str]], where: str, allow_trailing_user: bool) -> None:
    """Optional leading system, then strictly user/assistant pairs (a final lone user when allowed)."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise ValueError(f"{where}: no user message")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"{where}: roles must alternate user/assistant after an optional system "
                             f"message; message {i + len(messages) - len(body)} is {m['role']!r}, "
                             f"expected {expected!r}")
    if body[-1]["role"] == "user" and not allow_trailing_user:
        raise ValueError(f"{where}: conversation ends with a user message and no assistant answer")


@dataclass
class RenderedConversation:
    """One conversation as model inputs; all lists have the same length."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except assistant contents and their end-of-turn tokens
    attention_mask: list[int]
    num_slides: int  # how many <slide> markers were expanded into placeholders
    dropped_turns: int  # user/assistant turns removed from the end by truncation
    record_id: str | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def render_conversation(
    messages: Sequence[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    num_slide_tokens: int,
    max_length: int | None = None,
    system_prompt: str | None = None,
    add_generation_prompt: bool = False,
    record_id: str | None = None,
    slide_token_labels: Sequence[str] | None = None,
) -> RenderedConversation:
    """Render messages with the tokenizer's chat template, expand slides, and build loss labels.

    Args:
        messages: ``{"role": "system"|"user"|"assistant", "content": str}``; an optional system
            message first, then alternating user/assistant. With ``add_generation_prompt`` the
            last message must be a user message (inference); otherwise an assistant one (training).
        tokenizer: a tokenizer with a ``chat_template``; ``add_slide_tokens`` is applied to it.
        num_slide_tokens: ``k``, placeholders per ``<slide>`` (the connector's output length).
        max_length: token budget. Whole user/assistant turns are dropped from the end until
            the rest fits; slide placeholders are never cut.
        system_prompt: inserted as the first message when the messages have no system message.
        add_generation_prompt: end with the template's assistant header, for generation.
        record_id: named in errors and kept on the result.
        slide_token_labels: text before each placeholder (`slide_block`); the model config's
            ``slide_token_labels``.

    Returns:
        A ``RenderedConversation``; labels are ``IGNORE_INDEX`` except each assistant message's
        content tokens and the end-of-turn token that closes it (assistant headers and template
        separators after the end-of-turn token are not trained).

    Raises:
        ValueError: malformed roles, no chat template, a template whose renders of shorter
            prefixes are not prefixes of longer ones, ``<slide>`` in a non-user message, or a
            first turn that alone exceeds ``max_length`` (both lengths named); or, with a
            generation prompt, a conversation that does not fit (dropping the question would
            answer the wrong thing).
    """
    where = _where(record_id)
    if num_slide_tokens < 1:
        raise ValueError(f"{where}: num_slide_tokens must be >= 1, got {num_slide_tokens}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: the tokenizer has no chat_template; save one with the checkpoint")
    msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if system_prompt is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    _check_roles(msgs, where, allow_trailing_user=add_generation_prompt)
    if add_generation_prompt and msgs[-1]["role"] != "user":
        raise ValueError(f"{where}: add_generation_prompt needs the last message to be a user message")
    for i, m in enumerate(msgs):
        if m["role"] != "user" and SLIDE_TOKEN in m["content"]:
            raise ValueError(f"{where}: message {i} ({m['role']}) contains {SLIDE_TOKEN}; "
                             "only user messages may show the slide")
    slide_id, placeholder_id = add_slide_tokens(tokenizer)
    block = slide_block(tokenizer, num_slide_tokens, slide_token_labels)

    head = 1 if msgs[0]["role"] == "system" else 0
    num_turns = (len(msgs) - head + 1) // 2  # a trailing lone user message counts as a turn
    for keep in range(num_turns, 0, -1):
        kept = msgs[: head + 2 * keep] if not add_generation_prompt else msgs
        rendered = _render(kept, tokenizer, slide_id, placeholder_id, block, add_generation_prompt, where)
        if max_length is None or len(rendered[0]) <= max_length:
            input_ids, labels, num_slides = rendered
            return RenderedConversation(
                input_ids=input_ids,
                labels=labels,
                attention_mask=[1] * len(input_ids),
                num_slides=num_slides,
                dropped_turns=num_turns - keep,
                record_id=record_id,
            )
        if add_generation_prompt:
            raise ValueError(f"{where}: the prompt is {len(rendered[0])} tokens but max_length is "
                             f"{max_length}; it cannot be truncated without dropping the question")
        if keep == 1:
            raise ValueError(f"{where}: the first turn alone is {len(rendered[0])} tokens (slide "
                             f"placeholders included) but max_length is {max_length}")
    raise AssertionError("unreachable: a conversation has at least one turn")


def _template_text(tokenizer: PreTrainedTokenizerBase, msgs: list[dict[str, str]], gen: bool) -> str:
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert isinstance(text, str)
    return text


def _render(
    msgs: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    slide_id: int,
    placeholder_id: int,
    block: list[int],
    add_generation_prompt: bool,
    where: str,
) -> tuple[list[int], list[int], int]:
    """Token ids, labels and slide count for exactly these messages (no truncation)."""
    text = _template_text(tokenizer, msgs, add_generation_prompt)

    # Character spans of assistant messages: what the i-th message adds after its header.
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _template_text(tokenizer, msgs[:i], True)
        after = _template_text(tokenizer, msgs[: i + 1], False)
        if not (after.startswith(before) and text.startswith(after)):
            raise ValueError(f"{where}: the chat template is not prefix-stable at message {i} "
                             "(rendering fewer messages is not a prefix of rendering more), so "
                             "assistant spans cannot be located")
        spans.append((len(before), len(after)))

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    special_ids = set(tokenizer.all_special_ids) | {
        i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}

    trained = [False] * len(ids)
    for start, end in spans:
        inside = [j for j, (s, _) in enumerate(offsets) if start <= s < end]
        # Train through the last special token of the span (the end-of-turn token); what the
        # template writes after it (ChatML's "\n") is a separator, not the answer.
        last_special = max((j for j in inside if ids[j] in special_ids), default=None)
        for j in inside:
            if last_special is None or j <= last_special:
                trained[j] = True

    input_ids: list[int] = []
    labels: list[int] = []
    num_slides = 0
    for tok, train in zip(ids, trained, strict=True):
        if tok == slide_id:
            num_slides += 1
            input_ids.extend(block)
            labels.extend([IGNORE_INDEX] * len(block))
        else:
            input_ids.append(tok)
            labels.append(tok if train else IGNORE_INDEX)
    if placeholder_id in ids:
        raise ValueError(f"{where}: the text contains {SLIDE_PLACEHOLDER} literally; use {SLIDE_TOKEN}")
    return input_ids, labels, num_slides


def format_token_mask(rendered: RenderedConversation, tokenizer: PreTrainedTokenizerBase,
                      width: int = 100) -> str:
    """A readable view of what trains: trained runs in ``[[...]]``, slides as ``<slide xK>``.

    For debugging templates and masks (like nanochat's ``render_conversation`` visualiser);
    lines are wrapped at ``width`` characters.
    """
    placeholder_id = tokenizer.convert_tokens_to_ids(SLIDE_PLACEHOLDER)
    pieces: list[str] = []
    i, n = 0, len(rendered.input_ids)
    while i < n:
        tok = rendered.input_ids[i]
        if tok == placeholder_id:
            j = i
            while j < n and rendered.input_ids[j] == placeholder_id:
                j += 1
            pieces.append(f"<slide x{j - i}>")
        else:
            train = rendered.labels[i] != IGNORE_INDEX
            j = i
            while (j < n and rendered.input_ids[j] != placeholder_id
                   and (rendered.labels[j] != IGNORE_INDEX) == train):
                j += 1
            text = str(tokenizer.decode(rendered.input_ids[i:j]))
            pieces.append(f"[[{text}]]" if train else text)
        i = j
    flat = "".join(pieces)
    lines: list[str] = []
    for raw in flat.split("\n"):
        while len(raw) > width:
            lines.append(raw[:width])
            raw = raw[width:]
        lines.append(raw)
    return "\n".join(lines)
