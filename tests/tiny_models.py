"""Tiny random PathChat models for tests: Qwen2 or Llama from dict configs, offline tokenizers."""

from __future__ import annotations

import torch

from pathchat.model.conversation import add_slide_tokens
from pathchat.model.modeling import PathChatForConditionalGeneration, build_pathchat
from pathchat.model.tokenizers import build_test_tokenizer

FEATURE_DIM = 32
CONNECTOR = {"type": "resampler", "num_latents": 8, "hidden_dim": 32, "num_heads": 4, "num_layers": 1}
K = 8  # the connector's num_latents


def text_config(kind: str, vocab_size: int) -> dict:
    """A 2-layer, 64-wide Qwen2 or Llama config (Llama with tied embeddings)."""
    return {
        "model_type": kind, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": vocab_size,
        "max_position_embeddings": 512, "tie_word_embeddings": kind == "llama",
    }


#: A connector that places tiles on the glass (`slide_size_um` matters); also k = 8 tokens.
SLIDE_FRAME_CONNECTOR = {"type": "scale_invariant", "grid_size": 2, "num_latents": 4, "hidden_dim": 32,
                         "num_heads": 4, "num_layers": 1, "position_frame": "slide"}


def build_tiny(kind: str, connector: dict | None = None,
               feature_dim: int = FEATURE_DIM) -> tuple[PathChatForConditionalGeneration, object]:
    """(model in eval mode, tokenizer with slide tokens) for "qwen2" or "llama", deterministic (seed 0)."""
    tokenizer = build_test_tokenizer("qwen2" if kind == "qwen2" else "llama3")
    add_slide_tokens(tokenizer)
    torch.manual_seed(0)
    model = build_pathchat(text_config(kind, len(tokenizer)), tokenizer, feature_dim, connector or CONNECTOR)
    return model.eval(), tokenizer
