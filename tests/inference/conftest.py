"""Shared fixtures of the inference tests: a tiny checkpoint with a feature recipe, a slide, a pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference_fixtures import RECIPE, save_tiny_checkpoint  # noqa: E402

from pathchat.inference import Pipeline  # noqa: E402
from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny Qwen2 PathChat that records the random-cnn-tiny recipe (20x, 256 px)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), RECIPE)


@pytest.fixture(scope="session")
def slide_file(tmp_path_factory) -> Path:
    """A 3072 x 2048 px synthetic slide at 0.5 µm/px: tumour on the left half, stroma on the right."""
    regions = (TissueRegion("tumor", 0, 0, 1536, 2048), TissueRegion("stroma", 1536, 0, 1536, 2048))
    spec = SyntheticSlideSpec(3072, 2048, mpp=0.5, regions=regions, seed=3)
    return write_synthetic_slide(tmp_path_factory.mktemp("slides") / "two_halves.svs", spec)


@pytest.fixture(scope="session")
def pipe(checkpoint: Path, tmp_path_factory) -> Pipeline:
    return Pipeline.from_pretrained(checkpoint, feature_job=tmp_path_factory.mktemp("features"), max_new_tokens=6)
