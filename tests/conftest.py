"""Session-wide test settings. Shared test data lives in `shared_data.py`."""

from __future__ import annotations

import os

# No test may reach a model hub: every load must come from local files or random weights.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    """The demo model, trained once per session by the synthetic recipe (both stages, then scored).

    Shared by the learnability test and the demo test; about 8 minutes on 2 cores. Returns
    (cache folder, checkpoint folder, learnability summary).
    """
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)  # data_recipes/ is a folder of the repository, not of the package
    from data_recipes.synthetic.learn import LearnConfig, run_learnability

    cache = tmp_path_factory.mktemp("demo_cache")
    summary = run_learnability(cache, LearnConfig(), progress=False)
    return cache, cache / "instruct", summary
