"""Batch jobs over many slides: isolation, resumability, scale-out, manifest and failures.

Slides run in worker processes watched by this one: a slide that raises, hangs past the timeout or
crashes natively fails alone, and its worker is replaced. `slides_per_worker=1` gives every slide a
fresh process (tiling: nothing is worth keeping between slides); `None` keeps a worker, and the
model it loaded in `setup`, until it dies (extraction).
`JOB/manifest.jsonl` is an append-only history (one row per slide and state); a slide is skipped on
rerun only when its last `done` row has the same slide fingerprint and parameters and every output
it lists still has the recorded sha256. `JOB/failures.jsonl` holds the slides failed now.
Several processes (or nodes on a shared file system, e.g. under `torchrun`) may run the same job
at once: a lock file per slide makes each slide run exactly once, and a lock whose owner died or
stopped refreshing it is taken over.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pathchat.utils.atomic import (
    append_jsonl,
    atomic_write_text,
    pid_alive,
    read_jsonl,
    sha256_file,
    sweep_stale_temps,
)

if TYPE_CHECKING:  # the runner only reads .slide_id / .path / .files; any such record works
    from pathchat.wsi.discovery import SlideSource

log = logging.getLogger(__name__)

_SAMPLE_BLOCKS = 16
_SAMPLE_BYTES = 64 << 10
_HEAD_TAIL_BYTES = 1 << 20

#: The work of a batch: (slide, job folder, parameters, worker state) -> {"outputs": [paths], "info": {...}}.
WorkFn = Callable[["SlideSource", Path, dict[str, Any], Any], dict[str, Any]]
#: Runs once per worker process; its result is passed to every WorkFn call there (e.g. a loaded model).
SetupFn = Callable[[dict[str, Any]], Any]


class BatchSetupError(RuntimeError):
    """A worker could not start (e.g. model weights missing): a tool error, not a slide failure."""


def fingerprint_slide(source: SlideSource) -> str:
    """A content fingerprint of every file of a slide, cheap for multi-GB files.

    Hashes each file's size, its first and last MiB and 16 evenly spaced 64 KiB blocks. A replaced
    or edited slide changes it; renaming or copying (new mtime) does not. A source that already
    carries its fingerprint (the batch runner hands workers such sources) is not read again.
    """
    if source.fingerprint is not None:
        return source.fingerprint
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


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a `torchrun` / `accelerate launch` / `deepspeed` launch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistributedContext:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class SlideLocks:
    """One lock file per slide so concurrent processes never work on the same slide.

    A lock is stale when its owner on this host is dead, or when nobody refreshed it for
    `stale_after_s` (the owner's node died); a stale lock is moved aside atomically and retaken.
    """

    def __init__(self, folder: Path, stale_after_s: float = 600.0):
        self.folder = folder
        self.stale_after_s = stale_after_s
        self.host = socket.gethostname()

    def _path(self, slide_id: str) -> Path:
        return self.folder / f"{slide_id}.lock"

    def _is_stale(self, path: Path) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
            owner = json.loads(path.read_text() or "{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return True  # vanished, or torn while being written by a process that then died
        if owner.get("host") == self.host and not pid_alive(int(owner.get("pid", -1))):
            return True
        return age > self.stale_after_s

    def acquire(self, slide_id: str) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(slide_id)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._is_stale(path):
                    return False
                aside = path.with_name(f".{path.name}.stale-{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, aside)  # only one taker wins the rename
                    aside.unlink()
                    log.warning("took over the stale lock of %s", slide_id)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": self.host, "pid": os.getpid(), "time": _now()}, f)
            return True
        return False

    def refresh(self, slide_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._path(slide_id))

    def release(self, slide_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(slide_id).unlink()


class _ManifestTail:
    """Reads an append-only JSONL file incrementally: each call returns only the rows added since."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def new_rows(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a torn last line (a writer killed mid-append) waits for its newline
        self.offset += end
        rows = []
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "slide_id" in row:
                rows.append(row)
        return rows


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL when its parent (the fork server) exits.

    The fork server exits when the job process dies, so a killed job takes its workers with it,
    and no orphan keeps writing into the job folder beside a rerun (its temporaries are swept
    by that rerun, since their writer is gone).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable; workers may outlive a killed job")


def _worker(fn: WorkFn, setup: SetupFn | None, job_dir: Path, params: dict[str, Any], conn: Any,
            env: dict[str, str], expected_errors: tuple[type[Exception], ...] = ()) -> None:
    """A worker process: set up once, then process the slides sent to it until told to stop."""
    _die_with_parent()
    # The fork server was started with the environment of its first use; take the caller's current one
    # (HF_HUB_OFFLINE, CUDA_VISIBLE_DEVICES, ...).
    os.environ.clear()
    os.environ.update(env)
    try:
        state = setup(params) if setup is not None else None
    except Exception as e:  # noqa: BLE001 - reported to the parent, which stops the job with it
        conn.send({"setup_error": f"{type(e).__name__}: {e}"})
        return
    while True:
        try:
            source = conn.recv()
        except EOFError:
            return  # the parent is gone
        if source is None:
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                message: dict[str, Any] = {"ok": True, "result": fn(source, job_dir, params, state)}
            except expected_errors as e:  # the verb's own typed errors: their message says it all
                message = {"ok": False, "error_type": str(getattr(e, "kind", type(e).__name__)),
                           "message": str(e)}
            except Exception as e:  # noqa: BLE001 - a batch records every failure and goes on
                message = {"ok": False, "error_type": type(e).__name__, "message": f"{source.path}: {e}",
                           "traceback": traceback.format_exc(limit=8)}
        message["warnings"] = sorted({str(w.message) for w in caught})
        conn.send(message)


@dataclass
class _Worker:
    process: Any
    conn: Any
    source: SlideSource | None = None
    fingerprint: str = ""
    started: float = 0.0
    slides: int = 0
    last_refresh: float = 0.0


class BatchRunner:
    """Runs one verb over many slides into a job folder.

    Args:
        job_dir: the job folder.
        verb: the verb's name, recorded in the manifest.
        fn: per-slide work, run in a worker process (must be importable: a module-level function).
        params: JSON-safe parameters; a change makes every slide count as not done.
        workers: worker processes of this runner.
        timeout_s: a slide still running after this many seconds is killed and recorded as failed.
        setup: runs once per worker process (load a model there, not per slide).
        slides_per_worker: 1 for a fresh process per slide; None to keep a worker until it dies.
        progress: show a progress bar.
        distributed: rank information; ranks start at different places in the slide list.
        runtime_params: passed to the workers beside `params` but not part of the resume key
            (batch size, device: how to run, not what to compute).
        expected_errors: the verb's typed errors (e.g. `SlideError`): recorded with their `kind` and
            message, no traceback; anything else is recorded with a short traceback.
    """

    def __init__(self, job_dir: str | os.PathLike[str], verb: str, fn: WorkFn, params: dict[str, Any],
                 workers: int = 1, timeout_s: float = 1800.0, setup: SetupFn | None = None,
                 slides_per_worker: int | None = 1, progress: bool = True,
                 distributed: DistributedContext | None = None, runtime_params: dict[str, Any] | None = None,
                 expected_errors: tuple[type[Exception], ...] = ()):
        self.job_dir = Path(job_dir)
        self.expected_errors = expected_errors
        self.verb, self.fn, self.params, self.setup = verb, fn, params, setup
        self.worker_params = {**params, **(runtime_params or {})}
        self.workers, self.timeout_s, self.progress = max(1, workers), timeout_s, progress
        self.slides_per_worker = slides_per_worker
        self.dist = distributed or DistributedContext.from_env()
        self.key = params_key(verb, params)
        self.manifest_path = self.job_dir / "manifest.jsonl"
        self.failures_path = self.job_dir / "failures.jsonl"
        self.locks = SlideLocks(self.job_dir / ".locks" / f"{verb}-{self.key}")
        self._manifest = _ManifestTail(self.manifest_path)
        self._done_rows: dict[str, dict[str, Any]] = {}

    # -- resume ---------------------------------------------------------------------------------
    def _last_done(self, slide_id: str) -> dict[str, Any] | None:
        """The slide's latest `done` row for these parameters, including rows other processes just wrote."""
        for row in self._manifest.new_rows():
            if row.get("verb") == self.verb and row.get("params_key") == self.key and row.get("state") == "done":
                self._done_rows[row["slide_id"]] = row
        return self._done_rows.get(slide_id)

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
        row = {"time": _now(), "verb": self.verb, "slide_id": source.slide_id, "path": str(source.path),
               "state": state, "fingerprint": fingerprint, "params_key": self.key, "rank": self.dist.rank, **extra}
        append_jsonl(self.manifest_path, row)

    @contextlib.contextmanager
    def _failures_locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        """Read-modify-write of failures.jsonl under a file lock (other processes may share the job)."""
        with open(self.job_dir / ".failures.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            failures = {r["slide_id"]: r for r in read_jsonl(self.failures_path) if "slide_id" in r}
            yield failures
            text = "".join(json.dumps(failures[k], sort_keys=True) + "\n" for k in sorted(failures))
            atomic_write_text(self.failures_path, text)

    def _clear_failure(self, slide_id: str) -> None:
        with self._failures_locked() as failures:
            failures.pop(slide_id, None)

    # -- workers --------------------------------------------------------------------------------
    def _start_worker(self, ctx: Any) -> _Worker:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        # not daemonic: a worker may start DataLoader processes of its own
        proc = ctx.Process(target=_worker, args=(self.fn, self.setup, self.job_dir, self.worker_params, child_conn,
                                                 dict(os.environ), self.expected_errors),
                           name=f"pathchat-{self.verb}-worker")
        proc.start()
        child_conn.close()
        return _Worker(proc, parent_conn)

    @staticmethod
    def _stop_worker(w: _Worker, kill: bool = False) -> None:
        if kill:
            w.process.kill()
        else:
            with contextlib.suppress(BrokenPipeError, OSError):
                w.conn.send(None)
        w.process.join(timeout=None if kill else 10)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()

    def _ordered(self, sources: list[SlideSource]) -> list[SlideSource]:
        """Each rank starts at its own share of the list, so ranks rarely contend for a slide."""
        if self.dist.world_size <= 1 or not sources:
            return list(sources)
        start = self.dist.rank * len(sources) // self.dist.world_size
        return sources[start:] + sources[:start]

    # -- main loop ------------------------------------------------------------------------------
    def run(self, sources: list[SlideSource]) -> BatchSummary:
        """Process every slide; returns this process's counts. Warnings print above the progress bar.

        Raises:
            BatchSetupError: a worker could not start; nothing more is attempted.
        """
        with logging_redirect_tqdm():
            return self._run(self._ordered(sources))

    def _run(self, sources: list[SlideSource]) -> BatchSummary:
        self.job_dir.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(self.job_dir)
        with self._failures_locked():
            pass  # creates failures.jsonl, so scripts can always read it
        summary = BatchSummary()
        # forkserver: workers fork from a small, thread-free server (a plain fork of a process that
        # holds threads can deadlock). Preloading also hands the server this process's sys.path.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(sorted({"pathchat.utils.batch", self.fn.__module__}))
        pending = list(sources)
        idle: list[_Worker] = []
        busy: list[_Worker] = []
        bar = tqdm(total=len(sources), desc=f"pathchat {self.verb}", unit="slide",
                   disable=not self.progress or self.dist.rank != 0)

        def count(state: str) -> None:
            setattr(summary, state, getattr(summary, state) + 1)
            bar.update(1)
            bar.set_postfix(done=summary.done, skipped=summary.skipped, failed=summary.failed)

        def fail(source: SlideSource, fingerprint: str, error_type: str, message: str, **extra: Any) -> None:
            self._record(source, "failed", fingerprint, error={"type": error_type, "message": message}, **extra)
            row = {"slide_id": source.slide_id, "path": str(source.path), "verb": self.verb,
                   "error_type": error_type, "message": message, "time": _now()}
            with self._failures_locked() as failures:
                failures[source.slide_id] = row
            summary.failures.append(row)
            log.warning("failed %s: %s", source.slide_id, message)
            count("failed")

        def claim(source: SlideSource) -> str | None:
            """Fingerprint of a slide this process should work on now, or None (done/failed/elsewhere)."""
            try:
                fingerprint = fingerprint_slide(source)
            except OSError as e:
                fail(source, "", "unreadable_file", f"{source.path}: cannot read: {e}")
                return None
            if self._is_complete(self._last_done(source.slide_id), fingerprint):
                self._record(source, "skipped", fingerprint)
                self._clear_failure(source.slide_id)
                count("skipped")
                return None
            if not self.locks.acquire(source.slide_id):
                log.info("%s is being processed by another worker", source.slide_id)
                count("skipped")
                return None
            # another process may have finished it between our check and our lock
            if self._is_complete(self._last_done(source.slide_id), fingerprint):
                self.locks.release(source.slide_id)
                count("skipped")
                return None
            return fingerprint

        try:
            while pending or busy:
                while pending and len(busy) < self.workers:
                    source = pending.pop(0)
                    fingerprint = claim(source)
                    if fingerprint is None:
                        continue
                    w = idle.pop() if idle else self._start_worker(ctx)
                    self._record(source, "started", fingerprint)
                    w.source, w.fingerprint, w.started, w.last_refresh = source, fingerprint, time.monotonic(), time.time()
                    # a worker that already exited (e.g. its setup failed) is handled by the loop below
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        w.conn.send(replace(source, fingerprint=fingerprint))
                    busy.append(w)
                if not busy:
                    continue
                timeout = max(0.0, min(w.started + self.timeout_s for w in busy) - time.monotonic())
                wait([w.process.sentinel for w in busy] + [w.conn for w in busy], timeout=min(timeout, 30.0))
                for w in list(busy):
                    assert w.source is not None
                    if time.time() - w.last_refresh > 30:
                        self.locks.refresh(w.source.slide_id)
                        w.last_refresh = time.time()
                    message = None
                    if w.conn.poll():
                        with contextlib.suppress(EOFError, ConnectionResetError):
                            message = w.conn.recv()
                    elapsed = time.monotonic() - w.started
                    if message is None and w.process.is_alive() and elapsed < self.timeout_s:
                        continue
                    busy.remove(w)
                    source, fingerprint = w.source, w.fingerprint
                    if message is not None and "setup_error" in message:
                        self.locks.release(source.slide_id)
                        self._stop_worker(w, kill=True)
                        raise BatchSetupError(f"pathchat {self.verb}: workers cannot start: {message['setup_error']}")
                    if message is None:
                        alive = w.process.is_alive()
                        self._stop_worker(w, kill=True)
                        if alive:
                            fail(source, fingerprint, "timeout", f"{source.path}: no result after {self.timeout_s:g} s; killed")
                        else:
                            code = w.process.exitcode
                            why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                            fail(source, fingerprint, "crashed", f"{source.path}: the worker process died ({why})")
                    else:
                        w.slides += 1
                        if message["ok"]:
                            self._finish_done(source, fingerprint, message, elapsed)
                            count("done")
                        else:
                            fail(source, fingerprint, message["error_type"], message["message"],
                                 warnings=message.get("warnings", []))
                        if self.slides_per_worker is not None and w.slides >= self.slides_per_worker:
                            self._stop_worker(w)
                        else:
                            idle.append(w)
                    self.locks.release(source.slide_id)
        finally:
            for w in busy:  # interrupted: leave no orphan workers or locks
                self._stop_worker(w, kill=True)
                if w.source is not None:
                    self.locks.release(w.source.slide_id)
            for w in idle:
                self._stop_worker(w)
            bar.close()
        return summary

    def _finish_done(self, source: SlideSource, fingerprint: str, message: dict[str, Any], elapsed: float) -> None:
        result = message["result"]
        outputs = {str(Path(p).relative_to(self.job_dir)): sha256_file(p) for p in result.get("outputs", [])}
        for w in message.get("warnings", []):
            log.warning("%s: %s", source.slide_id, w)
        self._record(source, "done", fingerprint, outputs=outputs, info=result.get("info", {}),
                     warnings=message.get("warnings", []), elapsed_s=round(elapsed, 3))
        self._clear_failure(source.slide_id)
