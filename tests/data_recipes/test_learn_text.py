"""The learnability recipe's text stage: the tiny LM learns the dataset's language before stage 1."""

from __future__ import annotations

import pytest
import torch

from data_recipes.synthetic.learn import train_on_text
from pathchat.model.pretrained import build_tiny_language_model

FIELDS = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "intermediate_size": 64}
CONVERSATIONS = [[{"role": "user", "content": f"How much tissue is on slide {i}?"},
                  {"role": "assistant", "content": ("small", "medium", "large")[i % 3]}] for i in range(40)]


def _trained(seed: int) -> tuple[list[float], torch.Tensor]:
    texts = [m["content"] for c in CONVERSATIONS for m in c]
    model, tok = build_tiny_language_model("qwen2", FIELDS, seed=0, corpus=texts)
    losses = train_on_text(model, tok, CONVERSATIONS, epochs=4, lr=3e-3, seed=seed, block=32, batch_size=4)
    return losses, next(model.parameters()).detach().clone()


@pytest.mark.slow  # trains a (very small) model
def test_text_stage_lowers_the_loss_and_is_deterministic():
    losses, weights = _trained(seed=1)
    assert len(losses) >= 8
    # from about ln(vocabulary) to a fraction of it: the templates are learned
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    again, weights_again = _trained(seed=1)
    assert again == losses and torch.equal(weights, weights_again)
    other, _ = _trained(seed=2)
    assert other != losses  # the seed orders the rows
