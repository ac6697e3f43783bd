"""Atomic file writes and content checksums.

Every output is written to a temporary name in the same folder and renamed into place, so a job
killed at any moment leaves either the old file, the new file, or a stray temporary, never a
half-written file under a final name. Temporary names carry the writer's pid, so stale ones from
dead writers can be swept without touching a live writer's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")


def temp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success fsync it and rename it to `path`, else delete it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def append_jsonl(path: str | os.PathLike[str], rows: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
    """Append JSON lines (one row or a batch) with a single write and an fsync.

    A writer killed mid-append leaves a torn last line; the next append starts on a new line so the
    torn fragment stays alone on its line (readers skip it) instead of swallowing the new row.
    """
    batch = [rows] if isinstance(rows, dict) else list(rows)
    if not batch:
        return
    data = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in batch).encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of an append-only JSONL file; a line that does not parse (a torn write) is skipped with a warning."""
    rows: list[dict[str, Any]] = []
    p = Path(path)
    if not p.exists():
        return rows
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: line %d is not a JSON row (a torn write?); skipped", p, n)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete temporaries left by writers that are no longer running. Returns how many."""
    removed = 0
    root = Path(folder)
    if not root.exists():
        return 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            m = _TMP_RE.match(name)
            if m and not pid_alive(int(m.group("pid"))):
                with contextlib.suppress(FileNotFoundError):
                    (Path(dirpath) / name).unlink()
                    removed += 1
    return removed
