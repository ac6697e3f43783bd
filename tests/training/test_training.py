"""Stage training on CPU: what trains, checkpoints, exact resume, loss checks, reload."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from toy_data import stage_overrides
from transformers import TrainerCallback

from pathchat.model.pretrained import checkpoint_kind, load_pathchat
from pathchat.training.checkpoints import COMPLETE_MARKER
from pathchat.training.config import load_stage_config
from pathchat.training.run import RunAlreadyCompleteError, build_stage_model, train_stage
from pathchat.training.trainable import select_trainable
from pathchat.training.trainer import NonFiniteLossError


def _cfg(toy, stage, out, **extra):
    return load_stage_config(None, stage_overrides(toy, stage, out, **extra))


def test_trainable_sets_per_stage_are_exact(toy, tmp_path):
    model, _ = build_stage_model(_cfg(toy, "align", tmp_path / "a"))
    names = [n for n, _ in model.named_parameters()]
    connector = {n for n in names if n.startswith("connector.")}
    assert connector and len(connector) < len(names)

    assert set(select_trainable(model, "align")) == connector
    assert set(select_trainable(model, "instruct")) == set(names)
    with pytest.raises(ValueError, match="no LoRA parameters"):
        select_trainable(model, "instruct", lora=True)

    from pathchat.model.lora import LoraSettings, apply_lora

    apply_lora(model, LoraSettings(r=4, alpha=8))
    chosen = set(select_trainable(model, "instruct", lora=True))
    lora = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    # 2 layers x 7 projections (q, k, v, o, gate, up, down) x (A, B)
    assert len(lora) == 2 * 7 * 2
    assert chosen == connector | lora
    with pytest.raises(ValueError, match="align"):
        select_trainable(model, "align", lora=True)


@pytest.mark.slow
def test_align_then_instruct_lora_saves_loadable_checkpoints(toy, tmp_path):
    r1 = train_stage(_cfg(toy, "align", tmp_path / "align"))
    assert r1.global_step == 6 and len(r1.losses) == 6
    assert r1.losses[-1] < r1.losses[0]
    # tiny base LMs cannot be rebuilt from a name, so the final stage-1 checkpoint is full
    assert checkpoint_kind(tmp_path / "align") == "full"
    # intermediate checkpoints hold only what trained (the connector) and are marked complete
    ckpt = tmp_path / "align" / "checkpoint-6"
    assert (ckpt / COMPLETE_MARKER).is_file() and (ckpt / "connector.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "align").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]

    stage1, _ = load_pathchat(tmp_path / "align")
    cfg2 = _cfg(toy, "instruct", tmp_path / "inst", **{"model.init_from": str(tmp_path / "align"),
                                                         "lora.enabled": True, "lora.r": 4})
    start, _ = build_stage_model(cfg2)
    for (n, a), (_, b) in zip(stage1.connector.state_dict().items(), start.connector.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n  # stage 2 starts from stage 1's connector, exactly

    r2 = train_stage(cfg2)
    assert r2.num_answers == 2 * 12 and r2.losses[-1] < r2.losses[0]
    model, tok = load_pathchat(tmp_path / "inst")  # LoRA folded into a full checkpoint
    assert checkpoint_kind(tmp_path / "inst") == "full"
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert (tmp_path / "inst" / "training_config.yaml").read_text().count("init_from") == 1
    # both checkpoints record the feature recipe of the features they were trained on
    for stage_dir in ("align", "inst"):
        recipe = json.loads((tmp_path / stage_dir / "config.json").read_text())["feature_recipe"]
        assert (recipe["encoder"], recipe["feature_dim"], recipe["target_mpp"]) == ("toy", 16, 0.5), stage_dir
    # the trained connector differs from stage 1's
    diff = sum(float((a - b).detach().abs().sum()) for a, b in zip(stage1.connector.parameters(),
                                                            model.connector.parameters(), strict=True))
    assert diff > 0


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed after saving step {self.step}")


@pytest.mark.slow
def test_resume_reproduces_losses_and_skips_incomplete_checkpoints(toy, tmp_path):
    extra = {"training.max_steps": 8}
    full = train_stage(_cfg(toy, "instruct", tmp_path / "full", **extra))

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_stage(_cfg(toy, "instruct", out, **extra), callbacks=[_StopAt(4)])
    (out / "checkpoint-6").mkdir()  # a save that was killed half-way: no completion marker
    (out / "checkpoint-6" / "model.safetensors").write_bytes(b"partial")
    resumed = train_stage(_cfg(toy, "instruct", out, **extra))
    assert resumed.resumed_from == str(out / "checkpoint-4")
    later = [h["loss"] for h in resumed.log_history if "loss" in h and h["step"] > 4]
    expected = [h["loss"] for h in full.log_history if "loss" in h and h["step"] > 4]
    assert len(later) == 4
    assert later == pytest.approx(expected, abs=1e-6)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "full" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    with pytest.raises(RunAlreadyCompleteError, match="step 8 of 8"):
        train_stage(_cfg(toy, "instruct", out, **extra))


class _Poison(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == 2:
            with torch.no_grad():
                next(model.connector.parameters()).fill_(float("nan"))


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_sample_ids(toy, tmp_path):
    with pytest.raises(NonFiniteLossError) as err:
        train_stage(_cfg(toy, "align", tmp_path / "nan"), callbacks=[_Poison()])
    assert err.value.step == 3
    assert len(err.value.sample_ids) == 2 and all(s.startswith("align-slide") for s in err.value.sample_ids)
    assert "step 3" in str(err.value) and err.value.sample_ids[0] in str(err.value)


def test_missing_features_error_names_slide_and_record(toy, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "r1", "slide": "nope", "conversations": [
        {"from": "human", "value": "<slide>\nHi"}, {"from": "gpt", "value": "Hello."}]}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"slide 'nope' \(record 'r1'\)"):
        train_stage(_cfg(toy, "align", tmp_path / "o", **{"data.train": [str(bad)]}))


@pytest.mark.slow
def test_isolated_packing_trains_and_changes_what_each_answer_sees(toy, tmp_path):
    # Two records per slide (its question record and its report record), packed into one sequence.
    both = {"data.train": [str(toy["instruct"]), str(toy["align"])], "training.max_steps": 4,
            "training.save_steps": 0}
    isolated = train_stage(_cfg(toy, "instruct", tmp_path / "iso", **both, **{"data.isolate_records": True}))
    shared = train_stage(_cfg(toy, "instruct", tmp_path / "conv", **both))
    assert isolated.global_step == 4 and all(map(torch.isfinite, torch.tensor(isolated.losses)))
    assert isolated.losses[-1] < isolated.losses[0]
    # Same weights, same batch at step 1: only the attention between the packed records differs.
    assert abs(isolated.losses[0] - shared.losses[0]) > 1e-4


@pytest.mark.slow
def test_the_held_out_loss_also_projects_only_the_answer_positions(toy, tmp_path, monkeypatch):
    from pathchat.model.modeling import PathChatForConditionalGeneration

    calls: list[tuple[bool, bool]] = []
    forward = PathChatForConditionalGeneration.forward

    def spy(self, *args, **kwargs):
        calls.append((self.training, bool(kwargs.get("logits_only_at_labels"))))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(PathChatForConditionalGeneration, "forward", spy)
    cfg = _cfg(toy, "align", tmp_path / "run", **{"data.eval": [str(toy["align"])], "training.max_steps": -1,
                                                   "training.epochs": 1, "training.save_steps": 0})
    result = train_stage(cfg)
    evals = [h["eval_loss"] for h in result.log_history if "eval_loss" in h]
    assert len(evals) == 1 and 0 < evals[0] < 20
    held_out = [only for training, only in calls if not training]
    assert held_out and all(held_out)  # every held-out forward pass: logits at the answers only
    assert all(only for training, only in calls if training)


def test_slide_token_labels_reach_the_model_and_must_match_stage_1(toy, tmp_path):
    k = int(build_stage_model(_cfg(toy, "align", tmp_path / "probe"))[0].config.num_slide_tokens)
    labels = [f" cell {i}:" for i in range(k)]
    model, tokenizer = build_stage_model(_cfg(toy, "align", tmp_path / "a", **{"model.slide_token_labels": labels}))
    assert model.config.slide_token_labels == labels
    model.save_pretrained(tmp_path / "a")
    tokenizer.save_pretrained(tmp_path / "a")
    same = _cfg(toy, "instruct", tmp_path / "i", **{"model.init_from": str(tmp_path / "a"),
                                                     "model.slide_token_labels": labels})
    assert build_stage_model(same)[0].config.slide_token_labels == labels
    other = _cfg(toy, "instruct", tmp_path / "i", **{"model.init_from": str(tmp_path / "a")})
    with pytest.raises(ValueError, match="names its slide tokens .* but model.slide_token_labels is None"):
        build_stage_model(other)


@pytest.mark.slow
def test_instruct_from_a_lora_checkpoint_goes_on_training_its_adapter(toy, tmp_path):
    """A finished LoRA stage (the built-in model is one) as `init_from`: its own adapter goes on
    training, not a fresh one beside it; the lora settings must describe it; with LoRA off a full
    fine-tune starts from its merged weights."""
    from peft import PeftModel
    from tiny_models import text_config
    from transformers import AutoConfig, AutoModelForCausalLM

    from pathchat.model.tokenizers import build_test_tokenizer

    base = tmp_path / "base"  # a hub-style folder, so the final checkpoint is an adapter, not a full model
    tokenizer = build_test_tokenizer("llama3")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**text_config("llama", len(tokenizer)))).save_pretrained(base)
    tokenizer.save_pretrained(base)
    lora = {"model.language_model": str(base), "lora.enabled": True, "lora.r": 4, "lora.alpha": 8}
    first = train_stage(_cfg(toy, "instruct", tmp_path / "first", **lora))
    assert first.global_step == 6
    assert checkpoint_kind(tmp_path / "first") == "lora"
    saved = load_file(str(tmp_path / "first" / "adapter_model.safetensors"))
    saved_b = sum(float(v.abs().sum()) for k, v in saved.items() if "lora_B" in k)
    assert saved_b > 0  # trained: a fresh adapter's B matrices are zero

    go_on = {**lora, "model.init_from": str(tmp_path / "first")}
    start, _ = build_stage_model(_cfg(toy, "instruct", tmp_path / "second", **go_on))
    assert isinstance(start.language_model, PeftModel)
    adapter = {n.removeprefix("language_model.").replace(".default.", "."): p
               for n, p in start.named_parameters() if "lora_" in n}
    assert adapter.keys() == saved.keys()
    assert all(torch.equal(adapter[k].detach(), saved[k]) for k in saved)  # the saved adapter, not a new one
    assert all(p.requires_grad for p in adapter.values())
    connector = load_file(str(tmp_path / "first" / "connector.safetensors"))
    assert all(torch.equal(start.connector.state_dict()[k], v) for k, v in connector.items())

    train_stage(_cfg(toy, "instruct", tmp_path / "second", **go_on))
    again = load_file(str(tmp_path / "second" / "adapter_model.safetensors"))
    assert again.keys() == saved.keys()
    assert any(not torch.equal(again[k], saved[k]) for k in saved)

    with pytest.raises(ValueError, match=r"holds a LoRA adapter with \{'r': 4, 'alpha': 8"):
        build_stage_model(_cfg(toy, "instruct", tmp_path / "third", **{**go_on, "lora.r": 8}))
    full, _ = build_stage_model(_cfg(toy, "instruct", tmp_path / "full", **{**go_on, "lora.enabled": False}))
    assert not isinstance(full.language_model, PeftModel)
    assert not any("lora_" in n for n, _ in full.named_modules())
