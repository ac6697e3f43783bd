"""Session-wide test settings. Shared test data lives in `shared_data.py`."""

from __future__ import annotations

import os

# No test may reach a model hub: every load must come from local files or random weights.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


import pytest  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs 2 workers on 2 cores) each worker's torch uses one thread:
    two workers of two threads each oversubscribed the cores and the learnability recipe took 20 minutes
    instead of about 8."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


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
    import torch

    from data_recipes.synthetic.learn import LearnConfig, run_learnability

    cache = tmp_path_factory.mktemp("demo_cache")
    # The recipe's figures are its 2-thread run's (an xdist worker runs 1 thread; the results depend on the
    # thread count: 1 thread gave 0.932 held-out and location 0.708 against 0.971 and 0.875 with 2).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = run_learnability(cache, LearnConfig(), progress=False)
    finally:
        torch.set_num_threads(threads)
    return cache, cache / "instruct", summary
