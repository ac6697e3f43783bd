"""Run one training stage in this process (a fresh one per DeepSpeed run) and print its losses.

Usage: python ds_run.py '{"dotted.key": value, ...}' [STOP_AFTER_SAVE_STEP]
Exit 3 when stopped on purpose after saving the given step (a kill at a known point).
"""

import json
import sys

from transformers import TrainerCallback

from pathchat.training.config import load_stage_config
from pathchat.training.run import train_stage


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            sys.stdout.flush()
            raise SystemExit(3)


overrides = json.loads(sys.argv[1])
callbacks = [_StopAt(int(sys.argv[2]))] if len(sys.argv) > 2 else []
result = train_stage(load_stage_config(None, overrides), callbacks=callbacks)
print("RESULT " + json.dumps({
    "losses": {h["step"]: h["loss"] for h in result.log_history if "loss" in h},
    "trainable": len(result.trainable), "steps": result.global_step, "resumed_from": result.resumed_from,
}))
