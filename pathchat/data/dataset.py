"""Conversation records → rendered token ids with loss labels, paired with their slide's tiles.

Token ids are rendered once, up front: that catches template and length problems before training
starts and gives exact lengths for length-grouped batching without touching a feature file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pathchat.data.records import ConversationRecord, RecordError, SkippedRecords
from pathchat.data.slide_features import MissingFeaturesError, SlideFeatureStore
from pathchat.model.conversation import IGNORE_INDEX, SLIDE_PLACEHOLDER, render_conversation, slide_block

__all__ = ["ConversationDataset", "RenderedSample", "render_plain"]

logger = logging.getLogger(__name__)

PromptFormat = Literal["chat", "plain"]


@dataclass
class RenderedSample:
    record_id: str
    slide: str | None
    input_ids: list[int]
    labels: list[int]
    num_answers: int
    dropped_turns: int = 0
    source_ids: list[str] = field(default_factory=list)
    # Isolated packing: per token, 0 for the shared prefix (system prompt + slide) and r + 1 for
    # the r-th packed record; None when every token may see every earlier one.
    segment_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def render_plain(text: str, tokenizer: PreTrainedTokenizerBase, num_slide_tokens: int,
                 max_length: int | None = None,
                 slide_token_labels: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """LLaVA's "plain" alignment format: the slide tokens, then the text and EOS; loss on the text.

    Stage 1 only teaches the connector to speak the LLM's language, so no chat template or
    question is needed. Text beyond ``max_length`` is cut (the slide tokens never are).
    """
    block = slide_block(tokenizer, num_slide_tokens, slide_token_labels)
    text_ids = list(tokenizer(text.strip(), add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None:
        text_ids.append(int(eos))
    if max_length is not None:
        if max_length <= len(block):
            raise ValueError(f"max_length {max_length} leaves no room after {len(block)} slide tokens")
        text_ids = text_ids[: max_length - len(block)]
    ids = block + text_ids
    labels = [IGNORE_INDEX] * len(block) + text_ids
    return ids, labels


class ConversationDataset(Dataset[dict[str, Any]]):
    """Items: ``input_ids``, ``labels`` (lists), ``tile_features`` / ``tile_coords`` / ``slide_size_um`` tensors, ``id``.

    Args:
        records: conversation records (one slide each).
        store: the slide feature store.
        tokenizer: with a chat template; slide tokens are added if missing.
        num_slide_tokens: ``k`` of the model's connector.
        max_length: token budget per sample; later turns are dropped to fit (counted).
        prompt_format: "chat" (the tokenizer's template, loss on every answer) or "plain" (slide
            tokens then the last answer, for alignment on reports).
        system_prompt: added to conversations that have none.
        skip_invalid: records whose slide has no features or that cannot be rendered are counted
            in ``skipped`` and left out, instead of raising.
        isolate_records: in a record packed from several (``pack_by_slide``), every merged record
            sees the shared system prompt and slide tokens but not the other records' turns, with
            positions that restart after the slide: each answer is trained exactly as if its record
            were asked alone, and no answer can be copied from another record's. For independent
            questions (VQA sets, the synthetic recipe); the collator turns it into an attention mask.
        slide_token_labels: text before each slide token (the model config's; `slide_block`).
    """

    def __init__(self, records: Sequence[ConversationRecord], store: SlideFeatureStore,
                 tokenizer: PreTrainedTokenizerBase, num_slide_tokens: int, max_length: int | None = None,
                 prompt_format: PromptFormat = "chat", system_prompt: str | None = None,
                 skip_invalid: bool = False, progress: bool = True, isolate_records: bool = False,
                 slide_token_labels: Sequence[str] | None = None):
        if prompt_format not in ("chat", "plain"):
            raise ValueError(f"prompt_format must be 'chat' or 'plain', got {prompt_format!r}")
        self.store = store
        self.isolate_records = isolate_records
        self.slide_token_labels = slide_token_labels
        self.skipped = SkippedRecords()
        self.samples: list[RenderedSample] = []
        self.dropped_turns = 0
        for rec in tqdm(records, desc="rendering conversations", disable=not progress, leave=False):
            try:
                sample = self._render(rec, tokenizer, num_slide_tokens, max_length, prompt_format,
                                      system_prompt)
            except (MissingFeaturesError, RecordError, ValueError) as e:
                if not skip_invalid:
                    raise
                self.skipped.add(str(e))
                continue
            self.dropped_turns += sample.dropped_turns
            self.samples.append(sample)
        if self.skipped.count:
            logger.warning("left out %d of %d records: %s", self.skipped.count, len(records),
                           self.skipped.reasons[0])
        if self.dropped_turns:
            logger.warning("truncation to %s tokens dropped %d turns", max_length, self.dropped_turns)
        if not self.samples:
            raise RecordError("no usable conversation records" + (
                f" ({self.skipped.count} left out; first: {self.skipped.reasons[0]})" if self.skipped.count
                else ""))

    def _render(self, rec: ConversationRecord, tokenizer: PreTrainedTokenizerBase, k: int,
                max_length: int | None, prompt_format: PromptFormat,
                system_prompt: str | None) -> RenderedSample:
        if rec.slide is None:
            raise RecordError(f"record {rec.id!r} names no slide")
        self.store.check(rec.slide, rec.id)
        if prompt_format == "plain":
            answer = next(m["content"] for m in reversed(rec.messages) if m["role"] == "assistant")
            ids, labels = render_plain(answer, tokenizer, k, max_length, self.slide_token_labels)
            return RenderedSample(rec.id, rec.slide, ids, labels, 1, 0, list(rec.source_ids))
        if self.isolate_records and len(rec.segment_starts) > 1:
            return self._render_isolated(rec, tokenizer, k, max_length, system_prompt)
        r = render_conversation(rec.messages, tokenizer, k, max_length=max_length, system_prompt=system_prompt,
                                record_id=rec.id, slide_token_labels=self.slide_token_labels)
        if r.num_slides != 1:
            raise RecordError(f"record {rec.id!r}: expected exactly one slide marker, found {r.num_slides}")
        answers = rec.num_answers - r.dropped_turns
        return RenderedSample(rec.id, rec.slide, r.input_ids, r.labels, answers, r.dropped_turns,
                              list(rec.source_ids))

    def _render_isolated(self, rec: ConversationRecord, tokenizer: PreTrainedTokenizerBase, k: int,
                         max_length: int | None, system_prompt: str | None) -> RenderedSample:
        """The shared prefix (through the last slide placeholder) once, then every merged record's own
        tokens; records that would pass `max_length` are dropped whole (their turns counted)."""
        placeholder = tokenizer.convert_tokens_to_ids(SLIDE_PLACEHOLDER)
        ids: list[int] = []
        labels: list[int] = []
        segment_ids: list[int] = []
        prefix: list[int] | None = None
        answers = dropped = 0
        for r, messages in enumerate(rec.segments()):
            part = render_conversation(messages, tokenizer, k, system_prompt=system_prompt, record_id=rec.id,
                                       slide_token_labels=self.slide_token_labels)
            if part.num_slides != 1:
                raise RecordError(f"record {rec.id!r}: expected exactly one slide marker, found {part.num_slides}")
            cut = max(i for i, t in enumerate(part.input_ids) if t == placeholder) + 1
            if prefix is None:
                prefix = part.input_ids[:cut]
                ids, labels, segment_ids = list(prefix), list(part.labels[:cut]), [0] * cut
            elif part.input_ids[:cut] != prefix:
                raise RecordError(f"record {rec.id!r}: packed record {r} renders a different system prompt "
                                  "or slide prefix; isolated packing needs one shared prefix")
            n_answers = sum(1 for m in messages if m["role"] == "assistant")
            if max_length is not None and len(ids) + len(part.input_ids) - cut > max_length:
                dropped += n_answers
                continue
            ids += part.input_ids[cut:]
            labels += part.labels[cut:]
            segment_ids += [r + 1] * (len(part.input_ids) - cut)
            answers += n_answers
        if answers == 0:
            raise RecordError(f"record {rec.id!r}: no packed record fits max_length={max_length}")
        return RenderedSample(rec.id, rec.slide, ids, labels, answers, dropped, list(rec.source_ids), segment_ids)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """Token length of every sample (for length-grouped batching)."""
        return [len(s) for s in self.samples]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        assert s.slide is not None
        tiles = self.store.load(s.slide, s.record_id)
        return {
            "id": s.record_id,
            "input_ids": torch.tensor(s.input_ids, dtype=torch.long),
            "labels": torch.tensor(s.labels, dtype=torch.long),
            "tile_features": tiles.features,
            "tile_coords": tiles.coords_um,
            "slide_size_um": tiles.slide_size_um,
            "segment_ids": None if s.segment_ids is None else torch.tensor(s.segment_ids, dtype=torch.long),
        }
