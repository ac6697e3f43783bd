"""The transformers Trainer, taught PathChat's batches, checkpoints and failure modes.

Why the Trainer rather than a hand-written accelerate loop: it already owns the DeepSpeed ZeRO
integration (``"auto"`` config values filled from the training arguments), gradient accumulation
with correct loss normalisation, gradient checkpointing, exact resume (optimizer, scheduler, RNG
states, skipping consumed batches), TensorBoard/wandb logging and the launchers users know
(``deepspeed``, ``accelerate launch``, ``torchrun``). What PathChat adds is small and lives here:

- a length-grouped sampler whose order is a pure function of (seed, epoch), so resume replays it;
- a loss check that stops at the first NaN/inf with the step and the sample ids;
- checkpoints that hold only what trains (connector; adapter) when the LLM is frozen, marked
  complete when fully written, with retention that never deletes the newest complete one.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer

from pathchat.data.sampler import LengthGroupedSampler
from pathchat.model.modeling import PathChatForConditionalGeneration
from pathchat.model.pretrained import CONNECTOR_WEIGHTS_NAME
from pathchat.training.checkpoints import mark_complete, remove_incomplete, retain, save_pathchat_checkpoint

__all__ = ["NonFiniteLossError", "PathChatTrainer"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; names the optimizer step and the samples of the batch."""

    def __init__(self, step: int, loss: float, sample_ids: Sequence[str]):
        self.step = step
        self.sample_ids = list(sample_ids)
        super().__init__(f"loss is {loss} at step {step} on samples {self.sample_ids}; stopping. "
                         "Check those records and their feature files, or lower the learning rate.")


class PathChatTrainer(Trainer):
    """``Trainer`` with PathChat batches (``sample_ids``), sampler, loss check and checkpoint kinds.

    Args:
        lengths: token length of every training sample (for length grouping).
        checkpoint_kind: "full", "connector" or "lora": what ``checkpoint-N`` folders hold.
        training_config: the resolved stage config, saved into every checkpoint.
        group_by_length: sort by length within mega-batches (else a plain seeded shuffle).
    """

    def __init__(self, *args: Any, lengths: Sequence[int], checkpoint_kind: str = "full",
                 training_config: Mapping[str, Any] | None = None, group_by_length: bool = True,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._lengths = list(lengths)
        self.checkpoint_kind = checkpoint_kind
        self.training_config = dict(training_config) if training_config is not None else None
        self._group_by_length = group_by_length

    # ------------------------------------------------------------------------------ data order

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        per_step = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return LengthGroupedSampler(self._lengths, per_step, seed=self.args.data_seed or self.args.seed,
                                    group=self._group_by_length)

    # ------------------------------------------------------------------------------ loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        sample_ids = inputs.pop("sample_ids", [])
        for optional in ("tile_coords", "slide_size_um"):
            if inputs.get(optional) is None:
                inputs.pop(optional, None)
        # Only the loss is needed (a training step, or a held-out pass with prediction_loss_only, as
        # train_stage sets it): project only the answer positions onto the vocabulary.
        if not return_outputs or (not model.training and self.args.prediction_loss_only):
            inputs["logits_only_at_labels"] = True
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if isinstance(result, tuple) else result
        value = float(loss.detach().float().item())
        if not math.isfinite(value):
            raise NonFiniteLossError(self.state.global_step + 1, value, sample_ids)
        return result

    # ------------------------------------------------------------------------------ checkpoints

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        assert output_dir is not None
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        assert isinstance(model, PathChatForConditionalGeneration)
        if state_dict is not None and not state_dict:
            # DeepSpeed ZeRO-3 without 16-bit gathering: only the config now; the engine writes
            # its shards next and `convert_zero_checkpoint` turns them into safetensors.
            os.makedirs(output_dir, exist_ok=True)
            model.config.save_pretrained(output_dir)
            return
        save_pathchat_checkpoint(model, self.processing_class, output_dir,  # type: ignore[arg-type]
                                 self.checkpoint_kind, state_dict=state_dict,
                                 training_config=self.training_config)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = self._get_output_dir(trial=trial)
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # retention below, over complete checkpoints only
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        folder = Path(run_dir) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            mark_complete(folder, self.state.global_step)
            remove_incomplete(run_dir)
            retain(run_dir, limit)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self.checkpoint_kind == "full":
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        target = model if model is not None else self.model
        target = self.accelerator.unwrap_model(target)
        assert isinstance(target, PathChatForConditionalGeneration)
        folder = Path(resume_from_checkpoint)
        connector = load_file(str(folder / CONNECTOR_WEIGHTS_NAME))
        target.connector.load_state_dict(connector, strict=True)
        if self.checkpoint_kind == "lora":
            from peft import set_peft_model_state_dict

            adapter = load_file(str(folder / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(target.language_model, adapter)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"{folder}: adapter weights do not fit the model: {unexpected[:5]}")
        logger.info("resumed %s weights from %s", self.checkpoint_kind, folder)
