"""`data_recipes/` sits at the repository root, outside the installed `pathchat` package: put the root on
sys.path so its tests import `data_recipes.<name>` whichever way pytest was started."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
