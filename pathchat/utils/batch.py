"""Batch jobs over many slides: isolation, resumability, scale-out, manifest and failures.

Slides run in worker processes watched by this one: a slide that raises, hangs past the timeout or
crashes natively fails alone, and its worker is replaced. `slides_per_worker=1` gives every slide a
fresh process (tiling: nothing is worth keeping between slides); `None` keeps a worker, and the
model it loaded in `setup`, until it dies (extraction).
`JOB/manifest.jsonl` is an append-only history (one row per slide and state: `started`, then `done`,
`no_tissue`, `insufficient_resolution` or `failed`; `skipped` with its earlier `outcome` on a rerun); a
slide is skipped on rerun only when its last such row (not `failed`) has the same slide fingerprint and
parameters and every output it lists still has the recorded sha256. `JOB/failures.jsonl` holds the slides failed now.
Several processes (or nodes on a shared file system, e.g. under `torchrun`) may run the same job
at once: a lock file per slide makes each slide run exactly once; a process waits for the slides
others hold, and takes over a lock whose owner is gone (dead, a reused pid, a reboot) or stopped
refreshing it. The summary line is `done N / no_tissue N / skipped N / failed N` (with
`insufficient_resolution N` after no_tissue when a verb had such slides).
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
from collections import deque
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


#: A slide's outcomes, as counted in the summary line. `done`: worked on now; `no_tissue`: worked on
#: (now or earlier) and no tile has usable tissue; `insufficient_resolution`: worked on (now or earlier)
#: and scanned too coarse for what the verb needs (a report says so without asking a model);
#: `skipped`: already done earlier with the same inputs; `failed`: failed (here, or in another process
#: sharing the job).
OUTCOMES = ("done", "no_tissue", "insufficient_resolution", "skipped", "failed")
#: The outcomes a work function may return besides "done": complete (resumable), counted on their own.
_SPECIAL = ("no_tissue", "insufficient_resolution")


@dataclass
class BatchSummary:
    """What one `BatchRunner.run` did; `line()` is the verb's last output line.

    Attributes:
        done / no_tissue / insufficient_resolution / skipped / failed: slide counts (see `OUTCOMES`);
            every slide given to the runner lands in exactly one of them.
        failures: the failure rows (slide_id, path, error_type, message).
        no_tissue_slides: ids of the slides without usable tissue.
        insufficient_resolution_slides: ids of the slides scanned too coarse.
        ignored: files that were found in a folder but are no slide (path, reason), from discovery.
    """

    done: int = 0
    no_tissue: int = 0
    insufficient_resolution: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    no_tissue_slides: list[str] = field(default_factory=list)
    insufficient_resolution_slides: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every slide was done (or found without tissue or too coarse, or already done), 2 when any failed."""
        return 2 if self.failed else 0

    def line(self) -> str:
        low = f" / insufficient_resolution {self.insufficient_resolution}" if self.insufficient_resolution else ""
        text = f"done {self.done} / no_tissue {self.no_tissue}{low} / skipped {self.skipped} / failed {self.failed}"
        return text + (f" / ignored files {len(self.ignored)}" if self.ignored else "")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _boot_id() -> str:
    """The kernel's boot id: a pid recorded before a reboot means nothing after it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start_time(pid: int) -> int | None:
    """A running process's start time in clock ticks since boot (Linux); None when unknown, gone or a zombie.

    With the host and the boot id it names a process for good: a reused pid has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after its closing ')'
        fields = stat[stat.rindex(")") + 2:].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (ValueError, IndexError):
        return None


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead child its parent has not reaped yet still answers kill(pid, 0))."""
    if not pid_alive(pid):
        return False
    return process_start_time(pid) is not None or not Path("/proc").is_dir()


class SlideLocks:
    """One lock file per slide so concurrent processes never work on the same slide.

    A lock records its owner's host, boot id, pid and process start time. It is stale when that owner
    is gone on this host (dead pid, a pid reused by another process, or a reboot), or when nobody
    refreshed it for `stale_after_s` (the owner's node died); a stale lock is moved aside atomically
    and retaken.
    """

    def __init__(self, folder: Path, stale_after_s: float = 600.0):
        self.folder = folder
        self.stale_after_s = stale_after_s
        self.host = socket.gethostname()
        self.boot_id = _boot_id()
        self.owner = {"host": self.host, "boot_id": self.boot_id, "pid": os.getpid(),
                      "start_time": process_start_time(os.getpid())}

    def _path(self, slide_id: str) -> Path:
        return self.folder / f"{slide_id}.lock"

    def owner_gone(self, owner: dict[str, Any]) -> bool:
        """Whether the process a lock names has certainly ended (only decidable on this host)."""
        if owner.get("host") != self.host:
            return False
        if owner.get("boot_id") and self.boot_id and owner["boot_id"] != self.boot_id:
            return True
        try:
            pid = int(owner.get("pid", -1))
        except (TypeError, ValueError):
            return True
        if pid <= 0 or not _running(pid):
            return True
        recorded = owner.get("start_time")
        return recorded is not None and process_start_time(pid) != recorded

    def holder(self, slide_id: str) -> dict[str, Any] | None:
        """The live owner recorded in a slide's lock, or None when it is free or stale."""
        path = self._path(slide_id)
        try:
            age = time.time() - path.stat().st_mtime
            owner = json.loads(path.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # torn while being written by a process that then died
        if not isinstance(owner, dict) or self.owner_gone(owner) or age > self.stale_after_s:
            return None
        return owner

    def acquire(self, slide_id: str) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(slide_id)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.holder(slide_id) is not None:
                    return False
                aside = path.with_name(f".{path.name}.stale-{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, aside)  # only one taker wins the rename
                    aside.unlink()
                    log.warning("took over the stale lock of %s", slide_id)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self.owner, "time": _now()}, f)
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
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                log.warning("%s: a torn line (a writer killed mid-append) is skipped", self.path)
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


@dataclass
class _Waiting:
    """A slide whose lock another live process holds: accounted for once that process lets go of it."""

    source: SlideSource
    fingerprint: str
    last_row: dict[str, Any] | None  # the slide's latest terminal row when the wait began


@dataclass
class _RunState:
    """The moving parts of one `BatchRunner.run`: the queue, the workers and the counts."""

    summary: BatchSummary
    bar: Any
    pending: deque[SlideSource]
    idle: list[_Worker] = field(default_factory=list)
    busy: list[_Worker] = field(default_factory=list)
    waiting: list[_Waiting] = field(default_factory=list)


_TERMINAL = ("done", *_SPECIAL, "failed")
_WAIT_POLL_S = 1.0


class BatchRunner:
    """Runs one verb over many slides into a job folder.

    A work function returns `{"outputs": [paths], "info": {...}}`, plus `"state": "no_tissue"` when the
    slide holds no usable tissue (its outputs are still written and checked on resume; the slide is
    counted and recorded as `no_tissue`, never as done), or `"state": "insufficient_resolution"` when it
    is scanned too coarse for the verb (likewise). Every slide given to `run` ends in exactly one
    of `OUTCOMES`: a slide another process is working on is waited for, never counted as skipped.

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
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0 or timeout_s == float("inf"):
            raise ValueError(f"--timeout must be a positive number of seconds, got {timeout_s}")
        self.job_dir = Path(job_dir)
        self.expected_errors = expected_errors
        self.verb, self.fn, self.params, self.setup = verb, fn, params, setup
        self.worker_params = {**params, **(runtime_params or {})}
        self.workers, self.timeout_s, self.progress = workers, timeout_s, progress
        self.slides_per_worker = slides_per_worker
        self.dist = distributed or DistributedContext.from_env()
        self.key = params_key(verb, params)
        self.manifest_path = self.job_dir / "manifest.jsonl"
        self.failures_path = self.job_dir / "failures.jsonl"
        self.locks = SlideLocks(self.job_dir / ".locks" / f"{verb}-{self.key}")
        self._manifest = _ManifestTail(self.manifest_path)
        self._complete_rows: dict[str, dict[str, Any]] = {}  # latest done / special row per slide
        self._terminal_rows: dict[str, dict[str, Any]] = {}  # latest done / special / failed row per slide

    # -- resume ---------------------------------------------------------------------------------
    def _read_new_rows(self) -> None:
        """Take in the rows appended since the last look, by this process or by others sharing the job."""
        for row in self._manifest.new_rows():
            if row.get("verb") != self.verb or row.get("params_key") != self.key or row.get("state") not in _TERMINAL:
                continue
            self._terminal_rows[row["slide_id"]] = row
            if row["state"] != "failed":
                self._complete_rows[row["slide_id"]] = row

    def _last_complete(self, slide_id: str) -> dict[str, Any] | None:
        """The slide's latest complete row (done or a special outcome) for these parameters, including other
        processes' rows."""
        self._read_new_rows()
        return self._complete_rows.get(slide_id)

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
               "files": [str(f) for f in source.files], "state": state, "fingerprint": fingerprint,
               "params_key": self.key, "rank": self.dist.rank, **extra}
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

    def _count(self, run: _RunState, outcome: str, slide_id: str) -> None:
        summary = run.summary
        setattr(summary, outcome, getattr(summary, outcome) + 1)
        if outcome == "no_tissue":
            summary.no_tissue_slides.append(slide_id)
        elif outcome == "insufficient_resolution":
            summary.insufficient_resolution_slides.append(slide_id)
        run.bar.update(1)
        run.bar.set_postfix({k: getattr(summary, k) for k in OUTCOMES})

    def _fail(self, run: _RunState, source: SlideSource, fingerprint: str, error_type: str, message: str,
              **extra: Any) -> None:
        self._record(source, "failed", fingerprint, error={"type": error_type, "message": message}, **extra)
        row = {"slide_id": source.slide_id, "path": str(source.path), "files": [str(f) for f in source.files],
               "verb": self.verb, "error_type": error_type, "message": message, "time": _now()}
        with self._failures_locked() as failures:
            failures[source.slide_id] = row
        run.summary.failures.append(row)
        log.warning("failed %s: %s", source.slide_id, message)
        self._count(run, "failed", source.slide_id)

    def _count_complete(self, run: _RunState, source: SlideSource, fingerprint: str, row: dict[str, Any]) -> None:
        """A slide already done with these inputs: recorded as skipped, counted by its outcome."""
        outcome = row["state"] if row["state"] in _SPECIAL else "skipped"
        self._record(source, "skipped", fingerprint, outcome=row["state"])
        self._clear_failure(source.slide_id)
        self._count(run, outcome, source.slide_id)

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
        """Claim, dispatch and collect until every slide is accounted for."""
        self._prepare_job_folder()
        # forkserver: workers fork from a small, thread-free server (a plain fork of a process that
        # holds threads can deadlock). Preloading also hands the server this process's sys.path.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(sorted({"pathchat.utils.batch", self.fn.__module__}))
        bar = tqdm(total=len(sources), desc=f"pathchat {self.verb}", unit="slide",
                   disable=not self.progress or self.dist.rank != 0)
        run = _RunState(BatchSummary(), bar, deque(sources))
        try:
            while run.pending or run.busy or run.waiting:
                self._dispatch(run, ctx)
                if run.busy:
                    self._collect(run)
                self._poll_waiting(run)
                if run.waiting and not run.busy and not run.pending:
                    time.sleep(_WAIT_POLL_S)
        finally:
            self._shutdown(run)
        return run.summary

    def _prepare_job_folder(self) -> None:
        self.job_dir.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(self.job_dir)
        with self._failures_locked():
            pass  # creates failures.jsonl, so scripts can always read it

    def _claim(self, run: _RunState, source: SlideSource) -> str | None:
        """Fingerprint of a slide this process should work on now, or None (counted, or waiting for another)."""
        try:
            fingerprint = fingerprint_slide(source)
        except OSError as e:
            self._fail(run, source, "", "unreadable_file", f"{source.path}: cannot read: {e}")
            return None
        duplicate_of = getattr(source, "duplicate_of", None)
        if duplicate_of is not None:  # a copied DICOM instance: accounted for, never merged or redone
            self._fail(run, source, fingerprint, "duplicate_instance",
                       f"{source.path}: the same DICOM instance (SOP Instance UID) as {duplicate_of}; "
                       "not merged into that slide")
            return None
        row = self._last_complete(source.slide_id)
        if self._is_complete(row, fingerprint):
            assert row is not None
            self._count_complete(run, source, fingerprint, row)
            return None
        if not self.locks.acquire(source.slide_id):
            owner = self.locks.holder(source.slide_id) or {}
            log.info("%s is being processed by pid %s on %s; waiting for it", source.slide_id, owner.get("pid"),
                     owner.get("host"))
            run.waiting.append(_Waiting(source, fingerprint, self._terminal_rows.get(source.slide_id)))
            return None
        row = self._last_complete(source.slide_id)  # another process may have finished it meanwhile
        if self._is_complete(row, fingerprint):
            assert row is not None
            self.locks.release(source.slide_id)
            self._count_complete(run, source, fingerprint, row)
            return None
        return fingerprint

    def _dispatch(self, run: _RunState, ctx: Any) -> None:
        """Hand pending slides to free workers (starting workers as needed)."""
        while run.pending and len(run.busy) < self.workers:
            source = run.pending.popleft()
            fingerprint = self._claim(run, source)
            if fingerprint is None:
                continue
            w = run.idle.pop() if run.idle else self._start_worker(ctx)
            self._record(source, "started", fingerprint)
            w.source, w.fingerprint, w.started, w.last_refresh = source, fingerprint, time.monotonic(), time.time()
            # a worker that already exited (e.g. its setup failed) is handled by `_collect`
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                w.conn.send(replace(source, fingerprint=fingerprint))
            run.busy.append(w)

    def _collect(self, run: _RunState) -> None:
        """Wait for a result, a dead worker or a timeout, and settle every worker that finished."""
        timeout = max(0.0, min(w.started + self.timeout_s for w in run.busy) - time.monotonic())
        cap = _WAIT_POLL_S if run.waiting else 30.0
        wait([w.process.sentinel for w in run.busy] + [w.conn for w in run.busy], timeout=min(timeout, cap))
        for w in list(run.busy):
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
            run.busy.remove(w)
            try:
                self._settle(run, w, message, elapsed)
            finally:
                self.locks.release(w.source.slide_id)

    def _settle(self, run: _RunState, w: _Worker, message: dict[str, Any] | None, elapsed: float) -> None:
        """Record what became of a worker's slide, and keep or retire the worker."""
        assert w.source is not None
        source, fingerprint = w.source, w.fingerprint
        if message is not None and "setup_error" in message:
            self._stop_worker(w, kill=True)
            raise BatchSetupError(f"pathchat {self.verb}: workers cannot start: {message['setup_error']}")
        if message is None:
            alive = w.process.is_alive()
            self._stop_worker(w, kill=True)
            if alive:
                self._fail(run, source, fingerprint, "timeout", f"{source.path}: no result after {self.timeout_s:g} s; killed")
            else:
                code = w.process.exitcode
                why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                self._fail(run, source, fingerprint, "crashed", f"{source.path}: the worker process died ({why})")
            return
        w.slides += 1
        if message["ok"]:
            self._finish(run, source, fingerprint, message, elapsed)
        else:
            self._fail(run, source, fingerprint, message["error_type"], message["message"],
                       warnings=message.get("warnings", []))
        if self.slides_per_worker is not None and w.slides >= self.slides_per_worker:
            self._stop_worker(w)
        else:
            run.idle.append(w)

    def _finish(self, run: _RunState, source: SlideSource, fingerprint: str, message: dict[str, Any],
                elapsed: float) -> None:
        result = message["result"]
        state = result.get("state", "done")
        if state not in ("done", *_SPECIAL):
            self._fail(run, source, fingerprint, "bad_result",
                       f"{source.path}: the {self.verb} step returned state {state!r} (expected done, "
                       f"{' or '.join(_SPECIAL)})")
            return
        outputs = {str(Path(p).relative_to(self.job_dir)): sha256_file(p) for p in result.get("outputs", [])}
        for w in message.get("warnings", []):
            log.warning("%s: %s", source.slide_id, w)
        if state == "no_tissue":
            log.warning("%s: no usable tissue found; no tiles", source.slide_id)
        elif state == "insufficient_resolution":
            log.warning("%s: scanned too coarse (or no resolution recorded); not assessed", source.slide_id)
        self._record(source, state, fingerprint, outputs=outputs, info=result.get("info", {}),
                     warnings=message.get("warnings", []), elapsed_s=round(elapsed, 3))
        self._clear_failure(source.slide_id)
        self._count(run, state, source.slide_id)

    def _poll_waiting(self, run: _RunState) -> None:
        """Account for slides other processes held: their result, or back to the queue once their lock is free."""
        if not run.waiting:
            return
        self._read_new_rows()
        still: list[_Waiting] = []
        for item in run.waiting:
            slide_id = item.source.slide_id
            row = self._terminal_rows.get(slide_id)
            if row is not None and row is not item.last_row and row.get("fingerprint") == item.fingerprint:
                if row["state"] == "failed":  # the other process recorded it in failures.jsonl
                    error = row.get("error", {})
                    failure = {"slide_id": slide_id, "path": str(item.source.path), "verb": self.verb,
                               "error_type": error.get("type", "failed"),
                               "message": f"{error.get('message', '')} (in rank {row.get('rank')})", "time": _now()}
                    run.summary.failures.append(failure)
                    self._count(run, "failed", slide_id)
                elif self._is_complete(row, item.fingerprint):
                    self._count_complete(run, item.source, item.fingerprint, row)
                else:
                    run.pending.append(item.source)
            elif self.locks.holder(slide_id) is None:
                run.pending.append(item.source)  # released or stale: claim it again (and take it over)
            else:
                still.append(item)
        run.waiting = still

    def _shutdown(self, run: _RunState) -> None:
        """Leave no orphan workers or locks, whether the run ended or was interrupted."""
        for w in run.busy:
            self._stop_worker(w, kill=True)
            if w.source is not None:
                self.locks.release(w.source.slide_id)
        for w in run.idle:
            self._stop_worker(w)
        run.bar.close()
