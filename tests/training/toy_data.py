"""A toy slide dataset for training tests: the answer (a colour) is written in the tile features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pathchat.evaluation.prompts import closed_answer_text, format_closed_question
from pathchat.features.store import FeatureBag, write_features_h5

COLOURS = ["red", "green", "blue"]
DIM = 16


def make_toy_dataset(folder: Path, n_slides: int = 12, seed: int = 0) -> dict[str, Path]:
    """Feature files + stage-1 (report) and stage-2 (multi-turn) conversations over them."""
    rng = np.random.default_rng(seed)
    proto = np.random.default_rng(1234).normal(size=(len(COLOURS), DIM)).astype(np.float32)
    feats_dir = folder / "features"
    feats_dir.mkdir(parents=True, exist_ok=True)
    align, instruct = [], []
    for i in range(n_slides):
        c = i % len(COLOURS)
        n = int(rng.integers(4, 24))
        features = proto[c] + 0.1 * rng.normal(size=(n, DIM)).astype(np.float32)
        coords = (rng.integers(0, 20, size=(n, 2)) * 256).astype(np.int64)
        sid = f"slide{i:03d}"
        bag = FeatureBag(features=features, coords=coords, slide_id=sid, encoder="toy", mpp=0.5,
                         patch_size_level0=256, magnification=20.0, source_format="pathchat")
        # Even slides record the scanned size (as the tiler does), odd ones do not (as CLAM's files).
        write_features_h5(feats_dir / f"{sid}.h5", bag,
                          attrs={"level0_width": 5120, "level0_height": 4096} if i % 2 == 0 else None)
        align.append({"id": f"align-{sid}", "slide": sid, "conversations": [
            {"from": "human", "value": "<slide>\nDescribe the slide."},
            {"from": "gpt", "value": f"The tissue is {COLOURS[c]}."}]})
        order = [(c + j) % len(COLOURS) for j in range(len(COLOURS))]
        rng.shuffle(order)
        opts = [COLOURS[j] for j in order]
        instruct.append({"id": f"inst-{sid}", "slide": sid, "conversations": [
            {"from": "human", "value": "<slide>\n" + format_closed_question("What colour is the tissue?", opts)},
            {"from": "gpt", "value": closed_answer_text(opts, opts.index(COLOURS[c]))},
            {"from": "human", "value": "Is there tissue?"},
            {"from": "gpt", "value": "Yes."}]})
    paths = {"features": feats_dir, "align": folder / "align.json", "instruct": folder / "instruct.jsonl"}
    paths["align"].write_text(json.dumps(align))
    paths["instruct"].write_text("\n".join(json.dumps(r) for r in instruct) + "\n")
    return paths


CONNECTOR = {"type": "resampler", "num_latents": 8, "hidden_dim": 32, "num_heads": 4, "num_layers": 1}


def stage_overrides(toy, stage: str, out: Path, **extra) -> dict:
    """Dotted overrides for a fast tiny run on the toy data."""
    base = {
        "stage": stage, "output_dir": str(out),
        "data.train": [str(toy["align" if stage == "align" else "instruct"])],
        "data.features": str(toy["features"]),
        "model.connector": CONNECTOR,
        "training.max_steps": 6, "training.batch_size": 2, "training.save_steps": 2,
        "training.logging_steps": 1, "training.report_to": [], "training.progress": False,
        "training.learning_rate": 3e-3,
    }
    base.update(extra)
    return base
