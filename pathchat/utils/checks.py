"""Value checks shared by the typed configs: each error names the flag and the value.

The configs call these in `__post_init__` / `validate`, so a bad value is refused before any work
starts (before an encoder loads, before a slide opens), whatever parser built the config.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["check_out_folder", "check_positive", "check_range"]


def check_positive(flag: str, value: float | None, *, allow_none: bool = True, unit: str = "") -> None:
    """A finite number > 0 (NaN, infinity, zero and negatives are refused).

    Raises:
        ValueError: naming `flag` and the value.
    """
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{flag} must be a positive finite number{unit}, got {value!r}")


def check_range(flag: str, value: float | None, low: float, high: float, *, allow_none: bool = True) -> None:
    """A finite number in [low, high].

    Raises:
        ValueError: naming `flag`, the value and the range.
    """
    if value is None and allow_none:
        return
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not low <= value <= high):
        raise ValueError(f"{flag} must be a number in [{low:g}, {high:g}], got {value!r}")


def check_out_folder(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """An output folder that is a folder or does not exist yet (an existing file is refused up front).

    Raises:
        ValueError: `path` is an existing file, or lies under one.
    """
    p = Path(path)
    for candidate in (p, *p.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ValueError(f"{flag} {p}: {candidate} is an existing file, not a folder")
            break
    return p
