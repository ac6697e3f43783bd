"""Builders for the inference tests (importable by conftest and tests alike)."""

from __future__ import annotations

from pathlib import Path

from tiny_models import SLIDE_FRAME_CONNECTOR, build_tiny

from pathchat.inference import FeatureRecipe

ENCODER_DIM = 64  # random-cnn-tiny
RECIPE = FeatureRecipe(encoder="random-cnn-tiny", feature_dim=ENCODER_DIM, target_mpp=0.5, tile_px=256,
                       overlap_px=0)


def save_tiny_checkpoint(folder: Path, recipe: FeatureRecipe | None) -> Path:
    """Save a random tiny PathChat (slide-frame connector over 64-d features) with `recipe` recorded."""
    model, tokenizer = build_tiny("qwen2", connector=SLIDE_FRAME_CONNECTOR, feature_dim=ENCODER_DIM)
    if recipe is not None:
        model.config.feature_recipe = recipe.to_dict()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
