"""Model loading: attention implementation chosen once (or overridden) and the default dtype."""

from __future__ import annotations

import logging

import pytest
import torch
from test_modeling import _prompt, _tiles  # pytest puts tests/model on sys.path (rootdir-less test dirs)
from tiny_models import CONNECTOR, FEATURE_DIM, SLIDE_FRAME_CONNECTOR, build_tiny, text_config

from pathchat.model import attention_backend
from pathchat.model.attention_backend import default_dtype
from pathchat.model.modeling import PathChatForConditionalGeneration, build_pathchat
from pathchat.model.smollm import load_smollm2
from pathchat.model.tokenizers import build_test_tokenizer


@pytest.fixture
def fresh_log(monkeypatch):
    """Forget which choices were logged, so this test sees its own log line."""
    monkeypatch.setattr(attention_backend, "_logged", set())


def _build(kind: str = "qwen2", **kwargs) -> PathChatForConditionalGeneration:
    tokenizer = build_test_tokenizer("qwen2" if kind == "qwen2" else "llama3")
    torch.manual_seed(0)
    return build_pathchat(text_config(kind, 100), tokenizer, FEATURE_DIM, CONNECTOR, **kwargs).eval()


def _attn(model: PathChatForConditionalGeneration) -> tuple[str, str, str]:
    """(PathChat config, language model config, first decoder layer's config) attention implementations."""
    lm = model.language_model
    layer_config = lm.model.layers[0].self_attn.config
    return (model.config._attn_implementation, lm.config._attn_implementation,
            layer_config._attn_implementation)


def test_default_dtype_per_device():
    assert default_dtype("cpu") == torch.float32
    assert default_dtype(torch.device("cuda:0")) == torch.bfloat16


def test_build_on_cpu_chooses_sdpa_fp32_and_logs(fresh_log, caplog):
    with caplog.at_level(logging.INFO, logger=attention_backend.__name__):
        model = _build()
    assert _attn(model) == ("sdpa", "sdpa", "sdpa")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    messages = [r.getMessage() for r in caplog.records if r.name == attention_backend.__name__]
    assert messages == ["attention implementation chosen: sdpa (device cpu, dtype torch.float32)"]


def test_build_override_eager_is_honoured_and_matches_sdpa():
    eager, sdpa = _build("llama", attn_implementation="eager"), _build("llama")
    assert _attn(eager) == ("eager", "eager", "eager")
    assert _attn(sdpa)[1] == "sdpa"
    _, tokenizer = build_tiny("llama")
    inputs = {**_prompt(tokenizer), **_tiles()}
    with torch.no_grad():
        a = eager(**inputs, output_attentions=True)
        b = sdpa(**inputs)
    assert a.attentions is not None and len(a.attentions) == 2  # eager returns attention maps
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_build_flash_on_cpu_raises_clearly():
    with pytest.raises(ValueError, match=r"flash_attention_2 was requested but cannot be used: .*"
                                         r"the device is 'cpu', not CUDA"):
        _build(attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        _build(attn_implementation="flash")


def test_build_dtype_override():
    model = _build(dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be a torch dtype or its name"):
        _build(dtype="half-ish")


def test_from_pretrained_chooses_and_honours_override(tmp_path):
    model = _build()
    model.save_pretrained(tmp_path)
    default = PathChatForConditionalGeneration.from_pretrained(tmp_path)
    assert _attn(default) == ("sdpa", "sdpa", "sdpa")
    assert {p.dtype for p in default.parameters()} == {torch.float32}
    eager = PathChatForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert _attn(eager) == ("eager", "eager", "eager")
    half = PathChatForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="flash_attention_2 was requested but cannot be used"):
        PathChatForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


def test_a_loaded_checkpoint_computes_exactly_what_the_saved_model_did(tmp_path):
    """Nothing the connector needs may come back as uninitialised memory: `from_pretrained` builds on
    the meta device, and the position frequencies (once a non-persistent buffer) came back as
    garbage, sometimes NaN. Memory full of NaN is freed first, so garbage would show."""
    model, tokenizer = build_tiny("qwen2", connector=SLIDE_FRAME_CONNECTOR)
    inputs = {**_prompt(tokenizer), **_tiles(seed=3), "slide_size_um": torch.tensor([[6000.0, 5000.0]])}
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    poison = [torch.full((1 << 14,), float("nan"), dtype=torch.float64) for _ in range(64)]
    del poison
    loaded = PathChatForConditionalGeneration.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        got = loaded(**inputs).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_smollm2_loads_with_sdpa_and_refuses_flash(smollm2):
    model, _, _ = smollm2
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="flash_attention_2 was requested but cannot be used"):
        load_smollm2(attn_implementation="flash_attention_2")


def _adopted_lm(attn: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_test_tokenizer("qwen2")
    config = AutoConfig.for_model(**text_config("qwen2", len(tokenizer) + 2))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype), tokenizer


def test_adopted_lm_keeps_its_kernel_and_dtype_unless_asked(fresh_log, caplog):
    lm, tokenizer = _adopted_lm("eager", torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="pathchat.model.modeling"):
        model = build_pathchat(lm, tokenizer, FEATURE_DIM, CONNECTOR)
    assert _attn(model) == ("eager", "eager", "eager")  # the loader's choice (e.g. a training config) stands
    assert "kept from the adopted language model: eager" in caplog.text
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.connector.parameters()} == {torch.float32}
    lm, tokenizer = _adopted_lm("eager", torch.bfloat16)
    model = build_pathchat(lm, tokenizer, FEATURE_DIM, CONNECTOR, attn_implementation="sdpa", device="cpu")
    assert _attn(model) == ("sdpa", "sdpa", "sdpa")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # device given: the CPU default dtype
