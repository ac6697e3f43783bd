"""Session fixtures for evaluation tests: a tiny random checkpoint and stand-in features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fixtures import N_QUESTIONS, SLIDEBENCH, save_tiny_checkpoint, write_standin_features


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def slidebench_features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-in features for the slides of the first `N_QUESTIONS` SlideBench questions."""
    samples = json.loads(SLIDEBENCH.read_text())["samples"][:N_QUESTIONS]
    return write_standin_features(tmp_path_factory.mktemp("features"), [s["slide_id"] for s in samples])
