"""Session-wide test settings. Shared test data lives in `shared_data.py`."""

from __future__ import annotations

import os

# No test may reach a model hub: every load must come from local files or random weights.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
