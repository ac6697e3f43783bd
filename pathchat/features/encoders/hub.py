"""Hugging Face hub access, read from the environment at call time.

huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when it is imported; this module reads them at each
call, so setting them later (a test, a notebook) still keeps every look-up local. Offline, only the
cache is consulted and nothing is sent.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pathchat.features.encoders.errors import WeightsUnavailableError

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The hub cache folder: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def cached_hub_file(repo_id: str, filenames: Sequence[str]) -> str | None:
    """Path of the first of `filenames` already in the local hub cache, without any network access."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir())
        if isinstance(found, str):
            return found
    return None


def download_hub_file(name: str, repo_id: str, filenames: Sequence[str]) -> str:
    """Fetch the first of `filenames` that the repo has (from the cache only when offline).

    Raises:
        WeightsUnavailableError: gated / unauthorised / not found / offline with nothing cached; the
            message says how to get access and how to use a local file, and names the cause.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    offline = hub_offline()
    last: BaseException | None = None
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename, cache_dir=hub_cache_dir(), local_files_only=offline)
        except EntryNotFoundError as e:  # not in the repo (or not cached): try the next file name
            last = e
        except Exception as e:  # gated (401/403), unknown repo, network down: no point trying other names
            raise WeightsUnavailableError(name, f"cannot download {repo_id}/{filename}", hub_id=repo_id,
                                          cause=e) from e
    where = "the local hub cache (HF_HUB_OFFLINE is set)" if offline else f"the hub repo {repo_id}"
    raise WeightsUnavailableError(name, f"none of {list(filenames)} found in {where}", hub_id=repo_id, cause=last)


def snapshot_revision(path: str | os.PathLike[str]) -> str:
    """The commit a hub-cache file belongs to (`.../snapshots/<commit>/<file>`), or "unknown"."""
    parts = Path(path).parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return "unknown"
