import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from toy_data import make_toy_dataset  # noqa: E402


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"))
