"""One cache root for everything PathChat makes once and reuses, each thing in its own folder.

`$PATHCHAT_CACHE` (default `~/.cache/pathchat`) holds `smollm2-135m-instruct/` (the SmolLM2 conversion),
`demo-models/` (tiny models trained by the synthetic recipe), `features/` (the inference pipeline's
feature job folder) and `serve/` (the web UI's data). Deleting one folder never touches another.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "cache_root"]


def cache_root() -> Path:
    """`$PATHCHAT_CACHE`, else `~/.cache/pathchat`."""
    root = os.environ.get("PATHCHAT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "pathchat"


def cache_dir(name: str) -> Path:
    """The cache folder of one kind of thing (`features`, `demo-models`, ...), not created."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"cache folder names are plain names, got {name!r}")
    return cache_root() / name
