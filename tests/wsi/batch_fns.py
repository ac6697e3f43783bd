"""Work functions for batch-isolation tests (importable by the per-slide worker processes)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from pathchat.utils.atomic import atomic_write_text
from pathchat.wsi.discovery import SlideSource


def misbehave(source: SlideSource, job_dir: Path, params: dict[str, Any], state: Any = None) -> dict[str, Any]:
    """Hang, crash natively or raise depending on the slide name; otherwise write one output."""
    if "hang" in source.slide_id:
        time.sleep(600)
    if "segfault" in source.slide_id:
        os.kill(os.getpid(), signal.SIGSEGV)
    if "raise" in source.slide_id:
        raise RuntimeError("deliberate failure")
    out = job_dir / "out" / f"{source.slide_id}.txt"
    atomic_write_text(out, source.slide_id)
    return {"outputs": [str(out)], "info": {"ok": True}}


def pid_of_worker(source: SlideSource, job_dir: Path, params: dict[str, Any], state: Any = None) -> dict[str, Any]:
    """Records which process did the slide and what `setup` gave it; crashes on 'segfault' slides."""
    if "segfault" in source.slide_id:
        os.kill(os.getpid(), signal.SIGSEGV)
    return {"outputs": [], "info": {"pid": os.getpid(), "state": state}}


def setup_counter(params: dict[str, Any]) -> str:
    if params.get("fail_setup"):
        raise RuntimeError("weights not found")
    return f"loaded-by-{os.getpid()}"
