"""`pathchat eval` refuses features made another way than the checkpoint's recorded recipe."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pathchat.evaluation.runner import _check_feature_recipes
from pathchat.features.store import FeatureBag, write_features_h5
from pathchat.inference import FeatureRecipe, FeatureRecipeError


def _features(path: Path, tile_px: int, encoder: str | None = "random-cnn-tiny") -> Path:
    write_features_h5(path, FeatureBag(features=np.zeros((3, 64), np.float32), coords=np.zeros((3, 2), np.int64),
                                       slide_id=path.stem, encoder=encoder, mpp=0.5, patch_size_level0=tile_px,
                                       magnification=20.0, source_format="pathchat", attrs={}),
                      attrs={"patch_size": tile_px, "target_mpp": 0.5, "overlap": 0})
    return path


def test_eval_checks_every_feature_file_against_the_checkpoint_recipe(tmp_path: Path, caplog):
    recipe = FeatureRecipe(encoder="random-cnn-tiny", feature_dim=64, target_mpp=0.5, tile_px=256, overlap_px=0)
    model = SimpleNamespace(config=SimpleNamespace(feature_recipe=recipe.to_dict()))
    good, bad = _features(tmp_path / "good.h5", 256), _features(tmp_path / "bad.h5", 512)
    _check_feature_recipes(model, {good})
    with pytest.raises(FeatureRecipeError, match=r"bad\.h5.*tile_px.*tile=256px.*tile=512px"):
        _check_feature_recipes(model, {good, bad})
    # An old checkpoint (no recipe) is used with a warning, never silently.
    old = SimpleNamespace(config=SimpleNamespace())
    _check_feature_recipes(old, {bad})
    assert "records no feature recipe" in caplog.text
