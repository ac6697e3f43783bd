"""Session-wide test settings. Shared test data lives in `shared_data.py`."""

from __future__ import annotations

import os

# No test may reach a model hub: every load must come from local files or random weights.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


import fcntl  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import IO  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs 2 workers on 2 cores) each worker's torch uses one thread:
    two workers of two threads each oversubscribe the cores (torch's threads spin while they wait)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def _lock_folder(config: pytest.Config) -> Path:
    """A folder every xdist worker of this run shares (the parent of the workers' own base temps)."""
    base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _lock(path: Path, mode: int) -> IO[str]:
    f = path.open("a")
    fcntl.flock(f, mode)
    return f


def _unlock(f: IO[str]) -> None:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def _hold_training_lock(folder: Path, mode: int) -> IO[str]:
    """The demo-model lock, shared (a test) or exclusive (the training). Passing "pending" first makes a
    waiting exclusive request stop new shared ones, so the training waits for one test at most."""
    pending = _lock(folder / "demo_model.pending", mode)
    try:
        return _lock(folder / "demo_model.lock", mode)
    finally:
        _unlock(pending)


def _trains_demo_model(item: pytest.Item) -> bool:
    return "demo_model" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """The test that trains the demo model goes first, so its training (which runs alone) does not wait
    for a long test another worker has started."""
    items.sort(key=lambda item: not _trains_demo_model(item))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Every test but the one that trains the demo model runs under a shared lock, which that training
    holds exclusively: while it trains (2 threads, about 8 minutes), the other worker waits instead of
    running beside it. Side by side they oversubscribed the 2 cores and the training took 20 minutes.
    Taken outside pytest-timeout's clock, so the wait does not count as the test's time."""
    if _trains_demo_model(item):
        yield
        return
    held = _hold_training_lock(_lock_folder(item.config), fcntl.LOCK_SH)
    try:
        yield
    finally:
        _unlock(held)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory, pytestconfig):
    """The demo model, trained once per session by the synthetic recipe (both stages, then scored).

    Used by the learnability test; about 8 minutes on 2 cores, with no other test running meanwhile
    (`pytest_runtest_protocol`). Returns (cache folder, checkpoint folder, learnability summary).
    """
    import sys

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)  # data_recipes/ is a folder of the repository, not of the package
    import torch

    from data_recipes.synthetic.learn import LearnConfig, run_learnability

    cache = tmp_path_factory.mktemp("demo_cache")
    # The recipe's figures are its 2-thread run's (an xdist worker runs 1 thread; the results depend on the
    # thread count: 1 thread gave 0.932 held-out and location 0.708 against 0.971 and 0.875 with 2).
    threads = torch.get_num_threads()
    held = _hold_training_lock(_lock_folder(pytestconfig), fcntl.LOCK_EX)  # no other test runs meanwhile
    torch.set_num_threads(2)
    try:
        summary = run_learnability(cache, LearnConfig(), progress=False)
    finally:
        torch.set_num_threads(threads)
        _unlock(held)
    return cache, cache / "instruct", summary
