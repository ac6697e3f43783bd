"""Batch jobs over many slides: isolation, resumability, manifest and failures.

Each slide runs in its own process with a timeout, so a slide that raises, hangs or crashes OpenSlide
natively fails alone. `JOB/manifest.jsonl` is an append-only history (one row per slide and state);
a slide is skipped on rerun only when its last `done` row has the same slide fingerprint and
parameters and every output it lists still has the recorded sha256. `JOB/failures.jsonl` holds the
slides that are failed now (rewritten atomically after each slide).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pathchat.utils.atomic import append_jsonl, atomic_write_text, read_jsonl, sha256_file, sweep_stale_temps
from pathchat.wsi.discovery import SlideSource
from pathchat.wsi.errors import SlideError

log = logging.getLogger(__name__)

_SAMPLE_BLOCKS = 16
_SAMPLE_BYTES = 64 << 10
_HEAD_TAIL_BYTES = 1 << 20

#: The work function of a batch: (slide, job folder, parameters) -> {"outputs": [paths], "info": {...}}.
WorkFn = Callable[[SlideSource, Path, dict[str, Any]], dict[str, Any]]


def fingerprint_slide(source: SlideSource) -> str:
    """A content fingerprint of every file of a slide, cheap for multi-GB files.

    Hashes each file's size, its first and last MiB and 16 evenly spaced 64 KiB blocks. A replaced
    or edited slide changes it; renaming or copying (new mtime) does not.
    """
    h = hashlib.sha256()
    for f in source.files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode() if f != source.path else f"{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 2 * _HEAD_TAIL_BYTES + _SAMPLE_BLOCKS * _SAMPLE_BYTES:
                h.update(fh.read())
                continue
            h.update(fh.read(_HEAD_TAIL_BYTES))
            for k in range(1, _SAMPLE_BLOCKS + 1):
                fh.seek(k * size // (_SAMPLE_BLOCKS + 1))
                h.update(fh.read(_SAMPLE_BYTES))
            fh.seek(size - _HEAD_TAIL_BYTES)
            h.update(fh.read(_HEAD_TAIL_BYTES))
    return h.hexdigest()


def params_key(verb: str, params: dict[str, Any]) -> str:
    blob = json.dumps({"verb": verb, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class BatchSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every slide succeeded or was already done, 2 when any failed."""
        return 2 if self.failed else 0

    def line(self) -> str:
        return f"done {self.done} / skipped {self.skipped} / failed {self.failed}"


def _child(fn: WorkFn, source: SlideSource, job_dir: Path, params: dict[str, Any], conn: Any) -> None:
    """Runs in the per-slide process: do the work, send back a result or a typed error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(source, job_dir, params)
            message: dict[str, Any] = {"ok": True, "result": result}
        except SlideError as e:
            message = {"ok": False, "error_type": e.kind, "message": str(e)}
        except Exception as e:  # noqa: BLE001 - a batch records every failure and goes on
            message = {
                "ok": False,
                "error_type": type(e).__name__,
                "message": f"{source.path}: {e}",
                "traceback": traceback.format_exc(limit=8),
            }
    message["warnings"] = sorted({str(w.message) for w in caught})
    conn.send(message)
    conn.close()


@dataclass
class _Running:
    source: SlideSource
    process: Any
    conn: Any
    started: float
    fingerprint: str


class BatchRunner:
    """Runs one verb over many slides into a job folder."""

    def __init__(self, job_dir: str | os.PathLike[str], verb: str, fn: WorkFn, params: dict[str, Any],
                 workers: int = 1, timeout_s: float = 1800.0, progress: bool = True):
        self.job_dir = Path(job_dir)
        self.verb, self.fn, self.params = verb, fn, params
        self.workers, self.timeout_s, self.progress = max(1, workers), timeout_s, progress
        self.key = params_key(verb, params)
        self.manifest_path = self.job_dir / "manifest.jsonl"
        self.failures_path = self.job_dir / "failures.jsonl"

    # -- resume ---------------------------------------------------------------------------------
    def _last_done(self) -> dict[str, dict[str, Any]]:
        last: dict[str, dict[str, Any]] = {}
        for row in read_jsonl(self.manifest_path):
            if row.get("verb") == self.verb and row.get("params_key") == self.key and row.get("state") == "done":
                last[row["slide_id"]] = row
        return last

    def _is_complete(self, row: dict[str, Any] | None, fingerprint: str) -> bool:
        if row is None or row.get("fingerprint") != fingerprint:
            return False
        for rel, digest in row.get("outputs", {}).items():
            path = self.job_dir / rel
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True

    # -- bookkeeping ----------------------------------------------------------------------------
    def _record(self, source: SlideSource, state: str, fingerprint: str, **extra: Any) -> None:
        row = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "verb": self.verb,
            "slide_id": source.slide_id,
            "path": str(source.path),
            "state": state,
            "fingerprint": fingerprint,
            "params_key": self.key,
            **extra,
        }
        append_jsonl(self.manifest_path, row)

    def _write_failures(self, failures: dict[str, dict[str, Any]]) -> None:
        text = "".join(json.dumps(failures[k], sort_keys=True) + "\n" for k in sorted(failures))
        atomic_write_text(self.failures_path, text)

    # -- main loop ------------------------------------------------------------------------------
    def run(self, sources: list[SlideSource]) -> BatchSummary:
        """Process every slide; returns the counts. Warnings print above the progress bar."""
        with logging_redirect_tqdm():
            return self._run(sources)

    def _run(self, sources: list[SlideSource]) -> BatchSummary:
        self.job_dir.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(self.job_dir)
        failures = {row["slide_id"]: row for row in read_jsonl(self.failures_path) if "slide_id" in row}
        self._write_failures(failures)  # always present, so scripts can read it after any run
        last_done = self._last_done()
        summary = BatchSummary()
        # forkserver: each slide gets a fresh process forked from a small, thread-free server (plain fork
        # from a process holding threads can deadlock). Preloading also hands the server our sys.path.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(sorted({"pathchat.batch", self.fn.__module__}))
        pending = list(sources)
        running: list[_Running] = []
        bar = tqdm(total=len(sources), desc=f"pathchat {self.verb}", unit="slide", disable=not self.progress)

        def finish(source: SlideSource, state: str) -> None:
            setattr(summary, state, getattr(summary, state) + 1)
            bar.update(1)
            bar.set_postfix(done=summary.done, skipped=summary.skipped, failed=summary.failed)

        def fail(item: _Running | SlideSource, fingerprint: str, error_type: str, message: str, **extra: Any) -> None:
            source = item.source if isinstance(item, _Running) else item
            self._record(source, "failed", fingerprint, error={"type": error_type, "message": message}, **extra)
            row = {"slide_id": source.slide_id, "path": str(source.path), "verb": self.verb,
                   "error_type": error_type, "message": message, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            failures[source.slide_id] = row
            summary.failures.append(row)
            self._write_failures(failures)
            log.warning("failed %s: %s", source.slide_id, message)
            finish(source, "failed")

        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    source = pending.pop(0)
                    try:
                        fingerprint = fingerprint_slide(source)
                    except OSError as e:
                        fail(source, "", "unreadable_file", f"{source.path}: cannot read: {e}")
                        continue
                    if self._is_complete(last_done.get(source.slide_id), fingerprint):
                        self._record(source, "skipped", fingerprint)
                        if failures.pop(source.slide_id, None) is not None:
                            self._write_failures(failures)
                        finish(source, "skipped")
                        continue
                    self._record(source, "started", fingerprint)
                    parent_conn, child_conn = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_child, args=(self.fn, source, self.job_dir, self.params, child_conn),
                                       daemon=True, name=f"pathchat-{self.verb}-{source.slide_id}")
                    proc.start()
                    child_conn.close()
                    running.append(_Running(source, proc, parent_conn, time.monotonic(), fingerprint))
                if not running:
                    continue
                timeout = max(0.0, min(r.started + self.timeout_s for r in running) - time.monotonic())
                wait([r.process.sentinel for r in running] + [r.conn for r in running], timeout=timeout)
                for r in list(running):
                    elapsed = time.monotonic() - r.started
                    message = None
                    if r.conn.poll():
                        try:
                            message = r.conn.recv()
                        except EOFError:
                            message = None
                    if message is None and r.process.is_alive():
                        if elapsed < self.timeout_s:
                            continue
                        r.process.kill()
                        r.process.join()
                        running.remove(r)
                        fail(r, r.fingerprint, "timeout", f"{r.source.path}: no result after {self.timeout_s:g} s; killed")
                        continue
                    r.process.join()
                    running.remove(r)
                    if message is None:
                        code = r.process.exitcode
                        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                        fail(r, r.fingerprint, "crashed", f"{r.source.path}: the worker process died ({why})")
                    elif message["ok"]:
                        self._finish_done(r, message, elapsed, failures)
                        finish(r.source, "done")
                    else:
                        fail(r, r.fingerprint, message["error_type"], message["message"],
                             warnings=message.get("warnings", []))
        finally:
            for r in running:  # interrupted: leave no orphan workers
                r.process.kill()
                r.process.join()
            bar.close()
        return summary

    def _finish_done(self, r: _Running, message: dict[str, Any], elapsed: float,
                     failures: dict[str, dict[str, Any]]) -> None:
        result = message["result"]
        outputs = {}
        for path in result.get("outputs", []):
            p = Path(path)
            outputs[str(p.relative_to(self.job_dir))] = sha256_file(p)
        for w in message.get("warnings", []):
            log.warning("%s: %s", r.source.slide_id, w)
        self._record(r.source, "done", r.fingerprint, outputs=outputs, info=result.get("info", {}),
                     warnings=message.get("warnings", []), elapsed_s=round(elapsed, 3))
        if failures.pop(r.source.slide_id, None) is not None:
            self._write_failures(failures)
