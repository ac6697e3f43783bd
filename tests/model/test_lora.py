"""LoRA on PathChat's language model (tiny random Qwen2 / Llama), and attention backend choice."""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import build_tiny
from transformers import AutoConfig, AutoModelForCausalLM

from pathchat.model import attention_backend
from pathchat.model.attention_backend import choose_attn_implementation
from pathchat.model.checkpoint import MANIFEST_NAME, ManifestError
from pathchat.model.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    CONNECTOR_WEIGHTS_NAME,
    LoraSettings,
    apply_lora,
    find_lora_targets,
    load_language_model_4bit,
    load_lora,
    merge_lora,
    save_lora,
)
from pathchat.model.modeling import PathChatForConditionalGeneration

sys.path.insert(0, str(Path(__file__).parent))
from test_modeling import _prompt, _tiles  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = LoraSettings(r=4, alpha=8, dropout=0.0)
# Tiny config: hidden 64, 4 heads of 16, 2 KV heads (k/v out 32), intermediate 128, 2 layers.
_SHAPES = {  # target: (in, out)
    "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
    "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64),
}
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LORA_PARAMS = 2 * sum(SETTINGS.r * (i + o) for i, o in _SHAPES.values())  # 8192


@pytest.fixture(params=["qwen2", "llama"])
def tiny(request):
    """(model, tokenizer) of a tiny random PathChat without adapter, deterministic (seed 0)."""
    return build_tiny(request.param)


def _randomize_trainable(model: PathChatForConditionalGeneration, seed: int = 1) -> None:
    """lora_B starts at zero (a no-op adapter): give every trainable tensor a visible change."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=g))
                assert "lora_" in name or name.startswith("connector."), name


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**_prompt(tokenizer), **_tiles()).logits


def test_find_lora_targets_llama_and_qwen2(tiny):
    model, _ = tiny
    assert find_lora_targets(model.language_model) == LLAMA_TARGETS
    assert find_lora_targets(model) == LLAMA_TARGETS  # whole model: the connector is never searched


def test_find_lora_targets_phi3():
    config = AutoConfig.for_model("phi3", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=4, intermediate_size=128, vocab_size=100,
                                  pad_token_id=0, max_position_embeddings=128)
    lm = AutoModelForCausalLM.from_config(config)
    targets = find_lora_targets(lm)  # module order: Phi-3 defines o_proj before qkv_proj
    assert sorted(targets) == sorted(["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])


def test_settings_validate():
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="empty"):
        LoraSettings(target_modules=[])


def test_apply_lora_trainable_set(tiny):
    model, tokenizer = tiny
    before = _logits(model, tokenizer)
    connector_names = {f"connector.{n}" for n, _ in model.connector.named_parameters()}
    connector_count = sum(p.numel() for p in model.connector.parameters())
    assert apply_lora(model, SETTINGS) is model
    assert isinstance(model.language_model, PeftModel)
    expected = set(connector_names)
    for layer in range(2):
        for target, block in _BLOCK.items():
            for ab in ("A", "B"):
                expected.add(f"language_model.base_model.model.model.layers.{layer}.{block}.{target}"
                             f".lora_{ab}.default.weight")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == expected
    assert sum(p.numel() for n, p in trainable.items() if "lora_" in n) == LORA_PARAMS == 8192
    assert sum(p.numel() for p in trainable.values()) == LORA_PARAMS + connector_count
    # lora_B starts at zero: the adapter changes nothing yet.
    torch.testing.assert_close(_logits(model, tokenizer), before, rtol=0, atol=0)
    # Gradients reach LoRA weights and the connector, never the frozen base.
    out = model(**_prompt(tokenizer), **_tiles(), labels=_prompt(tokenizer)["input_ids"])
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.connector.parameters())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match="already has a peft adapter"):
        apply_lora(model, SETTINGS)


def test_save_load_gives_identical_logits(tiny, tmp_path):
    model, tokenizer = tiny
    base = copy.deepcopy(model)
    apply_lora(model, SETTINGS)
    _randomize_trainable(model)
    expected = _logits(model, tokenizer)
    assert not torch.allclose(expected, _logits(base, tokenizer))
    save_lora(model, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    # peft also writes its model card (README.md).
    assert set(names) - {"README.md"} == {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, CONNECTOR_WEIGHTS_NAME,
                                          MANIFEST_NAME}
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)

    loaded = load_lora(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(_logits(loaded, tokenizer), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    resumed = load_lora(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}

    (tmp_path / CONNECTOR_WEIGHTS_NAME).write_bytes(b"tampered")
    with pytest.raises(ManifestError):
        load_lora(copy.deepcopy(base), tmp_path)


def test_merge_matches_adapter_and_exports(tiny, tmp_path):
    model, tokenizer = tiny
    base_keys = set(model.state_dict())
    apply_lora(model, SETTINGS)
    _randomize_trainable(model)
    expected = _logits(model, tokenizer)
    merged = merge_lora(model)
    assert isinstance(merged, PathChatForConditionalGeneration)
    assert not isinstance(merged.language_model, PeftModel)
    assert not any("lora_" in n for n, _ in merged.named_modules())
    assert set(merged.state_dict()) == base_keys
    torch.testing.assert_close(_logits(merged, tokenizer), expected, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = PathChatForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, tokenizer), expected, rtol=0, atol=1e-5)


def test_qlora_needs_cuda_and_bitsandbytes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="QLoRA 4-bit loading is not possible here: no CUDA device"):
        load_language_model_4bit("unused")


# ----------------------------------------------------------------- attention backend


@pytest.fixture
def flash(monkeypatch):
    """Set whether flash_attn is importable; clear the log-once memory."""
    monkeypatch.setattr(attention_backend, "_logged", set())

    def set_available(value: bool) -> None:
        monkeypatch.setattr(attention_backend, "flash_attn_available", lambda: value)

    return set_available


@pytest.mark.parametrize(("available", "device", "dtype", "expected"), [
    (True, "cuda", torch.bfloat16, "flash_attention_2"),
    (True, "cuda:1", torch.float16, "flash_attention_2"),
    (True, "cuda", torch.float32, "sdpa"),
    (True, "cpu", torch.bfloat16, "sdpa"),
    (False, "cuda", torch.bfloat16, "sdpa"),
    (False, "cpu", torch.float32, "sdpa"),
])
def test_attn_auto_choice(flash, available, device, dtype, expected):
    flash(available)
    assert choose_attn_implementation(torch.device(device), dtype) == expected


def test_attn_requested_wins_and_is_validated(flash):
    flash(False)
    assert choose_attn_implementation("cpu", torch.float32, "eager") == "eager"
    assert choose_attn_implementation("cpu", torch.float32, "sdpa") == "sdpa"
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash_attention_3'"):
        choose_attn_implementation("cpu", torch.float32, "flash_attention_3")
    with pytest.raises(ValueError, match="flash_attention_2 was requested but cannot be used: the flash_attn "
                                         "package is not importable.*not CUDA.*not torch.bfloat16"):
        choose_attn_implementation("cpu", torch.float32, "flash_attention_2")
    flash(True)
    with pytest.raises(ValueError, match="cannot be used: the dtype is torch.float32"):
        choose_attn_implementation("cuda", torch.float32, "flash_attention_2")
    assert choose_attn_implementation("cuda", torch.bfloat16, "flash_attention_2") == "flash_attention_2"
    assert choose_attn_implementation("cuda", torch.bfloat16, "eager") == "eager"  # explicit beats auto


def test_attn_logged_once(flash, caplog):
    flash(False)
    with caplog.at_level(logging.INFO, logger=attention_backend.__name__):
        for _ in range(3):
            assert choose_attn_implementation("cpu", torch.float32) == "sdpa"
    records = [r for r in caplog.records if r.name == attention_backend.__name__]
    assert len(records) == 1 and "sdpa" in records[0].getMessage()


def test_flash_attn_not_importable_on_this_machine():
    attention_backend.flash_attn_available.cache_clear()
    if not torch.cuda.is_available():
        assert choose_attn_implementation("cpu", torch.bfloat16) == "sdpa"


def test_adapter_is_small_portable_and_loads_onto_the_untouched_base_with_plain_peft(tmp_path):
    """Issue 16: an adapter over a resized vocabulary holds only the LoRA matrices (no embedding or
    output matrix), names its base without a local path, and plain peft puts it on the stock base."""
    import json

    from safetensors import safe_open
    from tiny_models import CONNECTOR, FEATURE_DIM, text_config

    from pathchat.model.modeling import build_pathchat
    from pathchat.model.tokenizers import build_test_tokenizer

    tokenizer = build_test_tokenizer("llama3")
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text_config("llama", len(tokenizer))))
    stock.save_pretrained(tmp_path / "base")  # the untouched base, vocabulary without slide tokens
    vocab = stock.config.vocab_size
    model = build_pathchat(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tokenizer, FEATURE_DIM,
                           CONNECTOR)
    assert model.language_model.config.vocab_size > vocab  # the slide tokens resized it
    model.config.base_language_model = str(tmp_path / "base")  # a local path: must not reach the adapter
    apply_lora(model, SETTINGS)
    _randomize_trainable(model)
    folder = save_lora(model, tmp_path / "adapter")

    with safe_open(str(folder / ADAPTER_WEIGHTS_NAME), "pt") as f:
        keys = list(f.keys())
        numel = sum(f.get_tensor(k).numel() for k in keys)
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys), keys
    assert numel == LORA_PARAMS  # exactly the LoRA matrices: no [vocab, hidden] matrix
    assert (folder / ADAPTER_WEIGHTS_NAME).stat().st_size < 4 * LORA_PARAMS + 8192
    base_name = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())["base_model_name_or_path"]
    assert base_name == "base" and str(tmp_path) not in base_name

    untouched = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft_lm = PeftModel.from_pretrained(untouched, str(folder)).eval()
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        expected = model.language_model(input_ids=ids).logits[..., :vocab]
        got = peft_lm(input_ids=ids).logits
    assert got.shape[-1] == vocab
    assert torch.allclose(got, expected, atol=1e-5)


def test_portable_base_name():
    from pathchat.model.lora import portable_base_name

    assert portable_base_name("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_base_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert portable_base_name("/home/me/models/my-llm") == "my-llm"
    assert portable_base_name(None) is None


def test_load_pathchat_merges_the_adapter_for_inference(tmp_path):
    """`load_pathchat(merge_adapter=True)` (what the inference pipeline loads): no peft wrappers left,
    nothing trainable, and the logits of the unmerged adapter to float rounding."""
    from tiny_models import CONNECTOR, FEATURE_DIM, text_config

    from pathchat.model.modeling import build_pathchat
    from pathchat.model.pretrained import load_pathchat
    from pathchat.model.tokenizers import build_test_tokenizer
    from pathchat.training.checkpoints import save_pathchat_checkpoint

    tokenizer = build_test_tokenizer("llama3")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**text_config("llama", len(tokenizer)))).save_pretrained(
        tmp_path / "base")
    build_test_tokenizer("llama3").save_pretrained(tmp_path / "base")  # the base as a hub folder holds one
    model = build_pathchat(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tokenizer, FEATURE_DIM,
                           CONNECTOR)
    model.config.base_language_model = str(tmp_path / "base")
    apply_lora(model, SETTINGS)
    _randomize_trainable(model)
    folder = tmp_path / "ckpt"
    save_pathchat_checkpoint(model, tokenizer, folder, "lora", training_config={"stage": "instruct"})

    adapted, tok = load_pathchat(folder)
    merged, _ = load_pathchat(folder, merge_adapter=True)
    assert isinstance(adapted.language_model, PeftModel)
    assert not isinstance(merged.language_model, PeftModel)
    assert not any("lora_" in n for n, _ in merged.named_modules())
    assert not any(p.requires_grad for p in merged.parameters()) and not merged.training
    expected = _logits(adapted, tok)
    assert not torch.allclose(expected, _logits(build_pathchat(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tokenizer, FEATURE_DIM, CONNECTOR).eval(), tok))
    torch.testing.assert_close(_logits(merged, tok), expected, rtol=0, atol=1e-5)
