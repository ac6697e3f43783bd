"""Builders for evaluation tests: a tiny random checkpoint on disk and stand-in feature files.

Stand-in features are random; any score computed with them is a pipeline check, never a result.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from shared_data import TEXT

REPO = Path(__file__).resolve().parents[2]
SLIDEBENCH = TEXT / "slidebench" / "slidebench_vqa_tcga_1494.json"
WSI_VQA_TEST = TEXT / "wsi-vqa" / "WsiVQA_test.json"
WSI_VQA_TRAIN = TEXT / "wsi-vqa" / "WsiVQA_train.json"
PATHVQA = TEXT / "pathvqa" / "QA_pairs_vb.json"
FEATURE_DIM = 32
N_QUESTIONS = 8  # the end-to-end tests use the first N SlideBench questions


def save_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2-style PathChat with a resampler connector, saved with its tokenizer."""
    import torch

    from pathchat.model.modeling import build_pathchat
    from pathchat.model.tokenizers import build_test_tokenizer

    tokenizer = build_test_tokenizer("qwen2")
    torch.manual_seed(seed)
    text_config = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": len(tokenizer),
                   "max_position_embeddings": 1024}
    connector = {"type": "resampler", "num_latents": 8, "hidden_dim": 32, "num_heads": 4, "num_layers": 1}
    model = build_pathchat(text_config, tokenizer, FEATURE_DIM, connector).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_standin_features(folder: Path, slides: Iterable[str], seed: int = 0) -> Path:
    """Random `[n, 32]` features (n in 3..8) with grid coords for each slide id."""
    from pathchat.features.store import FeatureBag, write_features_h5

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for slide in sorted(set(slides)):
        n = int(rng.integers(3, 9))
        coords = np.stack([np.arange(n) * 512, np.zeros(n)], axis=1).astype(np.int64)
        bag = FeatureBag(features=rng.standard_normal((n, FEATURE_DIM)).astype(np.float32), coords=coords,
                         slide_id=slide, encoder="standin", mpp=0.5, patch_size_level0=512, magnification=20.0,
                         source_format="pathchat")
        write_features_h5(folder / f"{slide}.h5", bag)
    return folder
