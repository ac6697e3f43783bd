"""Fixtures of the web UI tests: servers on loopback ports running the app with `FakePipeline`.

`FakePipeline` lets tests count model calls and stream predictably; the real pipeline is tested in
tests/inference, and the browser test runs the page end to end.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_helpers import Served, serve_app  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    yield from serve_app(tmp_path_factory.mktemp("serve"), auth=None)


@pytest.fixture(scope="module")
def served_auth(tmp_path_factory) -> Iterator[Served]:
    yield from serve_app(tmp_path_factory.mktemp("serve"), auth=("pathologist", "s3cret:with-colon"))

