"""`pathchat report`: a structured report per slide, over folders of thousands of slides, resumable.

One slide's report is one question per section of a prompt set (`report_prompts`), each asked on
its own, so the sections of many slides form one left-padded generation batch. The files are
`<name>.json`, `<name>.md`, `<name>.heatmap.png` and `<name>.evidence.geojson` (`report_outputs`).

The batch verb runs on `BatchRunner` (manifest, failures, resume, locks, timeouts, one process per
slide failure domain): its worker processes do everything that touches a slide file (features from
the cache or tiling + extraction, the thumbnail) and write the report files, while the generation
of all workers' sections happens in this process, in a `GenerationServer` thread that batches the
requests of whichever workers are waiting. So preparing the next slides overlaps with generating the
current ones, a slide that crashes the slide reader takes only its worker down, and the model is
loaded once. The generation step is one small interface (`ReportGenerator`), so a serving engine
can replace the in-process pipeline (see serve/README.md).

Resume: a slide is skipped when its last report row has the same slide fingerprint, model, feature
recipe and prompt set and every file still has its recorded checksum; an unchanged folder rerun makes
zero model calls. `--anonymise` names the files by a salted hash of the slide id (the map is
`anonymisation_map.json`, beside the reports; move it elsewhere before sharing the reports).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

# Imported here (torch with it) so the batch runner's fork server preloads it once for every worker.
import pathchat.features.extract  # noqa: F401
from pathchat.inference.notices import INSUFFICIENT_RESOLUTION_SECTION, RESEARCH_NOTICE
from pathchat.inference.report_outputs import evidence_geojson, evidence_tiles, heatmap_png, report_markdown
from pathchat.inference.report_prompts import PromptSet, ReportSection, load_prompt_set
from pathchat.utils.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = [
    "GenerationServer",
    "PipelineGenerator",
    "ReportGenerator",
    "SlideQuestions",
    "report",
    "write_report",
]

log = logging.getLogger(__name__)

#: Longest side of the thumbnail the heatmap is drawn on (px).
THUMBNAIL_SIDE = 1024
INSUFFICIENT_TISSUE_REASON = ("Tissue detection kept {n} tile(s) on this slide, fewer than the {m} a report "
                              "needs; no model was asked. Check the slide (blank, out of focus, not "
                              "brightfield) or the tissue settings.")
INSUFFICIENT_RESOLUTION_REASON = ("Resolution too low for this model: {reason}; no model was asked. Use a finer "
                                  "scan of the slide, or a model trained at a lower magnification.")
NO_MPP_HINT = " If the scan's resolution is known, give it with --slide-mpp or --default-slide-mpp."


def resolution_reason(error: Any) -> str:
    """A report's `status_reason` for a `SlideResolutionError` (both resolutions; no file name)."""
    text = INSUFFICIENT_RESOLUTION_REASON.format(reason=error.reason)
    return text + (NO_MPP_HINT if error.slide_mpp is None else "")


# ------------------------------------------------------------------------------------ generation step


@dataclass
class SlideQuestions:
    """One slide's report questions for the generation step.

    Attributes:
        slide: a prepared slide (`Pipeline.prepare`'s result: `.bag`, `.slide_id`).
        questions: (question, max_new_tokens) per section, in report order.
    """

    slide: Any
    questions: list[tuple[str, int]]


class ReportGenerator(Protocol):
    """The generation step of reports: answers many slides' sections in as few batches as it likes.

    Returns, per `SlideQuestions` and per question, the greedy answer and its tile relevance (float `[n]`
    over the slide's tiles, summing to 1). `calls` counts model invocations (0 on an idempotent rerun).
    """

    calls: int

    def answer(self, jobs: Sequence[SlideQuestions]) -> list[list[tuple[str, np.ndarray]]]: ...


class PipelineGenerator:
    """`ReportGenerator` on the in-process pipeline: greedy, left-padded batches of at most `max_items`.

    Items are grouped by answer budget (sections may differ), so one batch never decodes past the
    longest budget it needs.
    """

    def __init__(self, pipe: Any, max_items: int = 32):
        self.pipe = pipe
        self.max_items = max(1, max_items)
        self.calls = 0

    def answer(self, jobs: Sequence[SlideQuestions]) -> list[list[tuple[str, np.ndarray]]]:
        results: list[list[tuple[str, np.ndarray] | None]] = [[None] * len(j.questions) for j in jobs]
        by_budget: dict[int, list[tuple[int, int]]] = {}
        for i, job in enumerate(jobs):
            for q, (_, budget) in enumerate(job.questions):
                by_budget.setdefault(budget, []).append((i, q))
        for budget, where in sorted(by_budget.items()):
            for start in range(0, len(where), self.max_items):
                chunk = where[start:start + self.max_items]
                items = [(jobs[i].slide, jobs[i].questions[q][0]) for i, q in chunk]
                self.calls += 1
                answers = self.pipe.answer_batch(items, max_new_tokens=budget, batch_size=len(items))
                for (i, q), (text, rel) in zip(chunk, answers, strict=True):
                    results[i][q] = (str(text), np.asarray(rel, dtype=np.float32).reshape(-1))
        return [[r for r in row if r is not None] for row in results]


# --------------------------------------------------------------------------------------- one report


def _tiling_of(bag: Any) -> dict[str, Any]:
    attrs = getattr(bag, "attrs", {}) or {}
    return {"n_tiles": int(len(bag)), "l0_tile_px": None if bag.patch_size_level0 is None else int(bag.patch_size_level0),
            "mpp": bag.mpp, "magnification": bag.magnification,
            "tile_px": attrs.get("patch_size"), "overlap_px": attrs.get("overlap"),
            "level0_width": attrs.get("level0_width"), "level0_height": attrs.get("level0_height")}


def build_report(name: str, slide_files: list[str] | None, bag: Any, sections: Sequence[ReportSection],
                 answers: list[tuple[str, np.ndarray]] | None, prompts: PromptSet, model: dict[str, Any],
                 recipe: dict[str, Any], min_tiles: int, top_k: int,
                 resolution_error: Any = None) -> tuple[dict[str, Any], np.ndarray]:
    """The report dict and the slide's relevance `[n]` (mean of the sections').

    `answers` None means too little tissue, or with `resolution_error` (a `SlideResolutionError`) a slide
    too coarse for the model; neither asks the model.
    """
    n = int(len(bag))
    report: dict[str, Any] = {"notice": RESEARCH_NOTICE, "slide": name}
    if slide_files is not None:
        report["slide_files"] = slide_files
    if resolution_error is not None or answers is None:  # not assessed: no model was asked
        if resolution_error is not None:
            status, reason, text = ("insufficient_resolution", resolution_reason(resolution_error),
                                    INSUFFICIENT_RESOLUTION_SECTION)
        else:
            status, reason, text = ("insufficient_tissue", INSUFFICIENT_TISSUE_REASON.format(n=n, m=min_tiles),
                                    "Insufficient tissue: not assessed.")
        relevance = np.zeros(n, np.float32)
        report.update(status=status, status_reason=reason)
        report["sections"] = [{"name": s.name, "title": s.title, "question": s.question, "answer": text,
                               "top_tiles": []} for s in sections]
    else:
        rels = [r for _, r in answers]
        if any(len(r) != n for r in rels):  # a capped tile sample: its relevance is not over the bag's tiles
            log.warning("%s: relevance covers %s of %d tiles; no evidence tiles listed", name,
                        sorted({len(r) for r in rels}), n)
            rels = [np.zeros(n, np.float32) for _ in rels]
            answers = [(t, np.zeros(n, np.float32)) for t, _ in answers]
        relevance = np.mean(np.stack(rels), axis=0) if rels else np.zeros(n, np.float32)
        report.update(status="ok")
        report["sections"] = [{"name": s.name, "title": s.title, "question": s.question, "answer": text.strip(),
                               "top_tiles": [int(i) for i in np.argsort(-rel, kind="stable")[:3]]}
                              for s, (text, rel) in zip(sections, answers, strict=True)]
    tiling = _tiling_of(bag)
    coords = bag.coords if bag.coords is not None else np.zeros((0, 2), np.int64)
    evidence = (evidence_tiles(coords, tiling["l0_tile_px"] or 0, relevance, top_k)
                if answers is not None and len(coords) == n and n else [])
    report.update(model=model, feature_recipe=recipe, tiling=tiling,
                  prompts={"name": prompts.name, "source": Path(prompts.source).name, "sha256": prompts.sha256},
                  evidence=evidence)
    return report, relevance


def report_paths(out_dir: Path, name: str) -> dict[str, Path]:
    return {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md",
            "heatmap": out_dir / f"{name}.heatmap.png", "evidence": out_dir / f"{name}.evidence.geojson"}


def write_report_files(out_dir: Path, name: str, report: dict[str, Any], relevance: np.ndarray, bag: Any,
                       thumbnail: np.ndarray | None, downsample: float) -> dict[str, Path]:
    """Write the four files atomically (the JSON last, so a JSON on disk means the others are there)."""
    paths = report_paths(out_dir, name)
    report = {**report, "files": {k: p.name for k, p in paths.items()}}
    coords = bag.coords if bag.coords is not None else np.zeros((0, 2), np.int64)
    tile = int(report["tiling"]["l0_tile_px"] or 1)
    if thumbnail is None:  # no slide file (cached features only): draw on a blank slide of the right shape
        w = report["tiling"].get("level0_width") or (int(coords[:, 0].max()) + tile if len(coords) else tile)
        h = report["tiling"].get("level0_height") or (int(coords[:, 1].max()) + tile if len(coords) else tile)
        downsample = max(1.0, max(int(w), int(h)) / THUMBNAIL_SIDE)
        thumbnail = np.full((max(1, round(int(h) / downsample)), max(1, round(int(w) / downsample)), 3), 255, np.uint8)
    scores = relevance if report["status"] == "ok" else np.zeros(len(coords), np.float32)
    atomic_write_bytes(paths["heatmap"], heatmap_png(thumbnail, downsample, coords, tile, scores))
    atomic_write_text(paths["evidence"], json.dumps(evidence_geojson(report["evidence"])) + "\n")
    atomic_write_text(paths["markdown"], report_markdown(report))
    atomic_write_json(paths["json"], report)
    return paths


def _model_info(pipe: Any) -> dict[str, Any]:
    return {"id": str(pipe.model_id)}


def _recipe_info(pipe: Any) -> dict[str, Any]:
    recipe = pipe.recipe
    return {**recipe.to_dict(), "description": recipe.describe()}


def _thumbnail(path: Any) -> tuple[np.ndarray | None, float]:
    """The slide's pyramid thumbnail (never the label or macro image) and its downsample."""
    if path is None:
        return None, 1.0
    from pathchat.wsi.slide import open_slide

    with open_slide(path) as slide:
        thumb, downsample = slide.thumbnail(THUMBNAIL_SIDE)
    return thumb, float(downsample)


def write_report(pipe: Any, slide: Any, out_dir: str | os.PathLike[str], prompts: PromptSet | str | None = None,
                 name: str | None = None, min_tiles: int = 1, top_k: int = 10,
                 generator: ReportGenerator | None = None) -> dict[str, Any]:
    """Write one prepared slide's report files into `out_dir` (the UI's one-click report).

    Args:
        pipe: a `Pipeline`.
        slide: `pipe.prepare(...)`'s result.
        prompts: a `PromptSet`, a prompt YAML path, or None for the default sections.
        name: file name stem (default the slide id).
        min_tiles: fewer tiles than this gives an "insufficient tissue" report without a model call.
        top_k: evidence tiles listed and drawn.
    A slide too coarse for the model (`SlideFeatures.unassessed`) gets an "insufficient resolution"
    report without a model call.
    Returns:
        `{"paths": {json, markdown, heatmap, evidence}, "report": the report dict}`.
    """
    prompt_set = prompts if isinstance(prompts, PromptSet) else load_prompt_set(prompts)
    gen = generator or PipelineGenerator(pipe)
    bag = slide.bag
    answers = None
    resolution_error = getattr(slide, "resolution_error", None)
    if resolution_error is None and not getattr(slide, "no_tissue", False) and len(bag) >= min_tiles:
        job = SlideQuestions(slide, [(s.question, s.max_new_tokens) for s in prompt_set.sections])
        answers = gen.answer([job])[0]
    stem = name or str(slide.slide_id)
    path = getattr(slide, "path", None)
    report_dict, relevance = build_report(stem, None if path is None else [Path(path).name], bag,
                                          prompt_set.sections, answers, prompt_set, _model_info(pipe),
                                          _recipe_info(pipe), min_tiles, top_k, resolution_error)
    thumb, downsample = _thumbnail(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_report_files(out, stem, report_dict, relevance, bag, thumb, downsample)
    return {"paths": paths, "report": json.loads(paths["json"].read_text())}


# ------------------------------------------------------------------------------- generation server


def _server_address() -> str:
    """A Unix socket address for this run: Linux's abstract namespace leaves no file behind a SIGKILL."""
    token = f"pathchat-report-{os.getpid()}-{secrets.token_hex(6)}"
    if sys.platform.startswith("linux"):
        return "\0" + token
    import tempfile

    return str(Path(tempfile.mkdtemp(prefix="pathchat-")) / "gen.sock")


class GenerationServer:
    """Answers the report workers' section requests in batches, in a thread of the report process.

    Workers connect once and send one slide's request at a time, then wait for its answers. A round
    starts when `batch_slides` requests wait, or when every connected worker waits (nobody is
    preparing a slide that could join), or `linger_s` after its first request, whichever comes
    first. Generation is the slow step: a round of 4 slides x 4 sections took 12.2 s on 2 cores
    against 6.7 s for one slide's 4, so a round is worth the second or two the workers the last
    round answered need to write their reports and send their next slide. (Starting after 0.3 s,
    the rounds of a 16-slide bench held 2-3 slides, and the job was slower than answering each
    slide's sections in one batch in a plain loop.) A request that cannot be answered (unreadable
    features, a recipe mismatch) is answered with an error for that slide alone.

    Args:
        load_slide: features h5 path -> prepared slide (the pipeline's loader, recipe checked).
        generator: the generation step.
        batch_slides: most slides per generation round.
        linger_s: the longest a round waits for more requests once one is there (short next to a round).
    """

    def __init__(self, load_slide: Callable[[str], Any], generator: ReportGenerator, batch_slides: int = 4,
                 linger_s: float = 3.0):
        self.load_slide, self.generator, self.batch_slides = load_slide, generator, max(1, batch_slides)
        self.linger_s = linger_s
        self.address = _server_address()
        self.authkey = secrets.token_bytes(16)
        self.listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        self._conns: list[Connection] = []
        self._new: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.rounds = 0
        self.batch_sizes: list[int] = []
        self._threads = [threading.Thread(target=self._accept_loop, name="report-accept", daemon=True),
                         threading.Thread(target=self._serve_loop, name="report-generate", daemon=True)]

    @property
    def model_calls(self) -> int:
        return int(self.generator.calls)

    def endpoint(self) -> dict[str, str]:
        """What a worker needs to connect (JSON-safe)."""
        return {"address": self.address, "key": self.authkey.hex()}

    def __enter__(self) -> GenerationServer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        # closing a listening socket does not wake a thread blocked in accept(): a last client does
        with contextlib.suppress(Exception):
            Client(self.address, family="AF_UNIX", authkey=self.authkey).close()
        with contextlib.suppress(OSError):
            self.listener.close()
        for t in self._threads:
            t.join(timeout=5)
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self.listener.accept()
            except OSError:  # closed by __exit__, or a client that died mid-handshake
                if self._stop.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - e.g. AuthenticationError from a stranger; keep serving
                log.warning("report generation server: a connection failed its handshake")
                continue
            self._new.put(conn)

    def _receive(self, pending: list[tuple[Connection, dict[str, Any]]], timeout: float) -> None:
        """Add the requests that arrive within `timeout` seconds to `pending`."""
        while not self._new.empty():
            self._conns.append(self._new.get())
        waiting = {id(c) for c, _ in pending}
        idle = [c for c in self._conns if id(c) not in waiting]
        if not idle:
            time.sleep(min(timeout, 0.05))
            return
        for conn in cast("list[Connection]", wait(idle, timeout=timeout)):  # wait returns what it was given
            try:
                request = conn.recv()
            except (EOFError, OSError):  # the worker died or was retired
                self._conns.remove(conn)
                continue
            pending.append((conn, request))

    def _serve_loop(self) -> None:
        pending: list[tuple[Connection, dict[str, Any]]] = []
        while not self._stop.is_set():
            self._receive(pending, 0.1)
            if not pending:
                continue
            deadline = time.monotonic() + self.linger_s
            while (len(pending) < self.batch_slides and len(pending) < len(self._conns)
                   and time.monotonic() < deadline and not self._stop.is_set()):
                self._receive(pending, min(0.05, max(0.0, deadline - time.monotonic())))
            batch, pending = pending[: self.batch_slides], pending[self.batch_slides:]
            self._answer(batch)

    def _answer(self, batch: list[tuple[Connection, dict[str, Any]]]) -> None:
        jobs: list[tuple[Connection, SlideQuestions]] = []
        for conn, request in batch:
            try:
                slide = self.load_slide(request["features"])
                jobs.append((conn, SlideQuestions(slide, [tuple(q) for q in request["questions"]])))  # type: ignore[misc]
            except Exception as e:  # noqa: BLE001 - that slide fails alone, with the reason
                self._reply(conn, {"error": f"{type(e).__name__}: {e}"})
        if not jobs:
            return
        self.rounds += 1
        self.batch_sizes.append(len(jobs))
        try:
            answers = self.generator.answer([j for _, j in jobs])
        except Exception:  # noqa: BLE001 - retry one slide at a time so a bad slide fails alone
            log.warning("a generation batch of %d slides failed; answering them one by one", len(jobs))
            for conn, job in jobs:
                try:
                    self._reply(conn, {"answers": self.generator.answer([job])[0]})
                except Exception as e:  # noqa: BLE001
                    self._reply(conn, {"error": f"{type(e).__name__}: {e}"})
            return
        for (conn, _), ans in zip(jobs, answers, strict=True):
            self._reply(conn, {"answers": ans})

    def _reply(self, conn: Connection, message: dict[str, Any]) -> None:
        try:
            conn.send(message)
        except OSError:  # the worker was killed (timeout) while waiting
            with contextlib.suppress(ValueError):
                self._conns.remove(conn)


class GenerationError(RuntimeError):
    """The generation step could not answer a slide's sections (the reason is in the message)."""

    kind = "generation_failed"


# ------------------------------------------------------------------------------------ batch workers


@dataclass
class _WorkerState:
    conn: Connection
    extractor: Any = None  # pathchat.features.extract's worker state, loaded on the first cache miss
    extras: dict[str, Any] = field(default_factory=dict)


def setup_report_worker(params: dict[str, Any]) -> _WorkerState:
    """Runs once per worker process: connect to the generation server (the model is not loaded here)."""
    import torch

    torch.set_num_threads(max(1, int(params["runtime"]["threads"])))
    server = params["runtime"]["server"]
    conn = Client(server["address"], family="AF_UNIX", authkey=bytes.fromhex(server["key"]))
    return _WorkerState(conn)


def _features_for(source: Any, params: dict[str, Any], state: _WorkerState) -> Path:
    """The slide's features h5 in the cache: reused when made from this slide with the model's recipe,
    else computed here (tiling first where needed), in this worker process.

    Raises:
        SlideResolutionError: the slide's finest level is coarser than the model's resolution, or it
            records none (from its metadata, before tiling; or from the features, after).
        FeatureRecipeError: the features cannot have the model's recipe, with both recipes named.
    """
    from pathchat.features.extract import ExtractJobConfig, RuntimeOptions, extract_one, setup_worker
    from pathchat.features.store import features_path, read_feature_attrs
    from pathchat.inference.recipe import FeatureRecipe, check_extracted_features, check_slide_resolution

    recipe = FeatureRecipe.from_dict(params["recipe"])
    cfg = ExtractJobConfig.from_dict(params["runtime"]["extract"])
    cache = Path(params["runtime"]["cache"])
    path = features_path(cache, cfg.tile.tiling.folder_name, cfg.encoder, source.slide_id)
    if path.is_file():
        try:
            attrs = read_feature_attrs(path)
            if (attrs.get("slide_fingerprint") == source.fingerprint
                    and not recipe.mismatches(FeatureRecipe.from_feature_attrs(attrs))):
                return path
        except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed
            log.info("%s: cached features unusable; recomputing", path)
    if recipe.target_mpp is not None:  # a recipe without a resolution takes any slide
        check_slide_resolution(source, cfg.tile)  # before the extractor loads or a tile is read
    if state.extractor is None:
        runtime = RuntimeOptions(batch_size=64, loader_workers=0, device=params["runtime"]["device"])
        state.extractor = setup_worker({"config": cfg.to_dict(), "runtime": runtime.__dict__})
        import torch

        torch.set_num_threads(max(1, int(params["runtime"]["threads"])))
    extract_one(source, cache, {"config": cfg.to_dict()}, state.extractor)
    check_extracted_features(recipe, read_feature_attrs(path), source.path, f"{source.path} (features {path})",
                             source.slide_id)
    return path


def output_name(slide_id: str, salt: str | None) -> str:
    """File stem of a slide's report: its id, or with a salt a hash that does not reveal it."""
    if salt is None:
        return slide_id
    return "slide-" + hashlib.sha256(f"{salt}\0{slide_id}".encode()).hexdigest()[:16]


def report_one(source: Any, job_dir: Path, params: dict[str, Any], state: _WorkerState) -> dict[str, Any]:
    """One slide's report, in a batch worker: features, thumbnail and files here; answers from the server.

    A slide too coarse for the model (or with no recorded resolution) gets its "insufficient resolution"
    report here, without features or a model call.
    """
    from pathchat.features.store import read_features_h5
    from pathchat.inference.recipe import FeatureRecipe, SlideResolutionError

    t0 = time.perf_counter()
    prompts: PromptSet = params["runtime"]["prompts"]  # parsed once, so every slide asks the same set
    resolution_error: SlideResolutionError | None = None
    try:
        features = _features_for(source, params, state)
        bag = read_features_h5(features)
    except SlideResolutionError as e:
        resolution_error = e
        bag = e.empty_bag(FeatureRecipe.from_dict(params["recipe"]))
    t1 = time.perf_counter()
    min_tiles = int(params["min_tiles"])
    answers = None
    if resolution_error is None and len(bag) >= min_tiles and len(bag) > 0:
        questions = [(s.question, s.max_new_tokens) for s in prompts.sections]
        state.conn.send({"slide_id": source.slide_id, "features": str(features), "questions": questions})
        reply = state.conn.recv()
        if "error" in reply:
            raise GenerationError(f"{source.path}: the model could not answer: {reply['error']}")
        answers = [(str(t), np.asarray(r, np.float32)) for t, r in reply["answers"]]
    t2 = time.perf_counter()
    thumb, downsample = _thumbnail(source.path)
    name = output_name(source.slide_id, params.get("salt"))
    files = None if params.get("salt") else [Path(f).name for f in source.files]
    report_dict, relevance = build_report(name, files, bag, prompts.sections, answers, prompts, params["model"],
                                          params["recipe_info"], min_tiles, int(params["top_k"]), resolution_error)
    paths = write_report_files(job_dir, name, report_dict, relevance, bag, thumb, downsample)
    outcome = ("insufficient_resolution" if resolution_error is not None
               else "done" if answers is not None else "no_tissue")
    return {"outputs": [str(p) for p in paths.values()],
            "info": {"n_tiles": int(len(bag)), "status": report_dict["status"], "name": name,
                     # where the slide's time went: features (cache or tile + encode), waiting for the
                     # answers (queue + generation), thumbnail and files
                     "seconds": {"features": round(t1 - t0, 3), "answers": round(t2 - t1, 3),
                                 "files": round(time.perf_counter() - t2, 3)}},
            "state": outcome}


# ------------------------------------------------------------------------------------------ the verb


@dataclass
class ReportRun:
    """What one `run_reports` did: the batch summary plus the generation figures."""

    summary: Any  # pathchat.utils.batch.BatchSummary
    model_calls: int
    generation_rounds: int
    batch_sizes: list[int]
    out: Path


def _anonymisation_salt(out: Path) -> str:
    """This output folder's salt, made once (a rerun must give the same names to resume)."""
    path = out / ".anonymise_salt"
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))
    for _ in range(50):  # another process may have created it a moment ago and be writing it
        salt = path.read_text().strip()
        if salt:
            return salt
        time.sleep(0.05)
    raise RuntimeError(f"{path}: empty salt file; delete it to start the anonymised names afresh")


def _write_anonymisation_map(out: Path, sources: Sequence[Any], salt: str) -> Path:
    """`anonymisation_map.json`: report name -> slide id and files (merged with other processes' rows)."""
    path = out / "anonymisation_map.json"
    with open(out / ".anonymisation_map.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            mapping = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            mapping = {}
        for s in sources:
            mapping[output_name(s.slide_id, salt)] = {"slide_id": s.slide_id, "files": [str(f) for f in s.files]}
        atomic_write_json(path, mapping)
    return path


def _default_workers(batch_size: int) -> int:
    """A full batch of slides can wait for its answers while one more slide is being prepared."""
    return batch_size + 1


def run_reports(slides: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], pipe: Any,
                prompts: str | None = None, batch_size: int = 4, workers: int | None = None,
                features: str | os.PathLike[str] | None = None, anonymise: bool = False, min_tiles: int = 1,
                top_k: int = 10, timeout_s: float = 1800.0, progress: bool = True,
                slide_mpp: float | None = None, default_slide_mpp: float | None = None,
                generator: ReportGenerator | None = None, load_slide: Callable[[str], Any] | None = None,
                worker_threads: int = 1) -> ReportRun:
    """The library form of `pathchat report` on a loaded pipeline (see `report` for the arguments).

    `generator` and `load_slide` replace the pipeline's generation step and feature loader (a serving
    engine, tests). Raises what `report` documents.
    """
    from pathchat.utils.batch import BatchRunner
    from pathchat.wsi.discovery import discover_slides

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if min_tiles < 1:
        raise ValueError(f"--min-tiles must be >= 1, got {min_tiles}")
    prompt_set = load_prompt_set(prompts)
    out_dir = Path(out)
    sources = discover_slides(list(slides))
    salt = None
    if anonymise:
        salt = _anonymisation_salt(out_dir)
        _write_anonymisation_map(out_dir, sources, salt)
    cache = Path(features) if features is not None else _default_cache(pipe, out_dir)
    recipe = pipe.recipe
    extract_cfg = recipe.to_extract_config()
    extract_cfg = replace(extract_cfg, tile=replace(extract_cfg.tile, slide_mpp=slide_mpp,
                                                    default_slide_mpp=default_slide_mpp))
    params = {"model": _model_info(pipe), "recipe": recipe.to_dict(), "recipe_info": _recipe_info(pipe),
              "prompts": prompt_set.sha256, "min_tiles": min_tiles, "top_k": top_k, "salt": salt,
              "slide_mpp": slide_mpp, "default_slide_mpp": default_slide_mpp}
    gen = generator or PipelineGenerator(pipe, max_items=batch_size * len(prompt_set.sections))
    loader = load_slide or (lambda path: _load_prepared(pipe, path))
    with GenerationServer(loader, gen, batch_slides=batch_size) as server:
        runtime = {"server": server.endpoint(), "threads": worker_threads, "cache": str(cache),
                   "extract": extract_cfg.to_dict(), "device": _extract_device(pipe),
                   "prompts": prompt_set}
        runner = BatchRunner(out_dir, "report", report_one, params, workers=workers or _default_workers(batch_size),
                             timeout_s=timeout_s, setup=setup_report_worker, slides_per_worker=None,
                             progress=progress, runtime_params={"runtime": runtime},
                             expected_errors=_expected_errors())
        summary = runner.run(sources)
    return ReportRun(summary, server.model_calls, server.rounds, list(server.batch_sizes), out_dir)


def _expected_errors() -> tuple[type[Exception], ...]:
    from pathchat.features.store import FeatureFileError
    from pathchat.inference.recipe import FeatureRecipeError
    from pathchat.wsi.errors import SlideError

    return (SlideError, GenerationError, FeatureFileError, FeatureRecipeError)


def report(slides: list[str], out: str, model: str | None = None, prompts: str | None = None,
           batch_size: int = 4, workers: int | None = None, features: str | None = None,
           anonymise: bool = False, min_tiles: int = 1, top_k: int = 10, slide_mpp: float | None = None,
           default_slide_mpp: float | None = None, device: str = "auto", timeout: float = 1800.0,
           progress: bool = True) -> int:
    """Write a structured report for every slide under SLIDES into OUT.

    For each slide: features from the feature cache (or tiling + extraction with the model's feature
    recipe), one answer per section of the prompt set, and four files: `<slide>.json` (sections, model
    and feature recipe, tiling, the most relevant tiles in level-0 pixels with their scores),
    `<slide>.md`, `<slide>.heatmap.png` (relevance over the thumbnail) and `<slide>.evidence.geojson`
    (the top tiles, for QuPath). Every report carries "For Research Use Only. Not for use in diagnostic
    procedures."; no label or macro image and no slide metadata enters a report, a log or a prompt.
    A slide with fewer than --min-tiles tiles of tissue gets an "insufficient tissue" report without a
    model call, and so does a slide scanned coarser than the model's feature recipe (or recording no
    resolution): an "insufficient resolution" report, counted on its own in the summary, not a failure.
    Resumable: a rerun redoes only slides whose file, model, feature recipe or prompt set
    changed or whose report files were altered (an unchanged folder makes zero model calls); a slide
    that fails, hangs or crashes fails alone (OUT/failures.jsonl, OUT/manifest.jsonl). Several
    processes (`torchrun`, `accelerate launch`, or the command started twice) may share OUT.

    Args:
        slides: slide files or folders (searched recursively).
        out: output folder (reports, manifest.jsonl, failures.jsonl).
        model: checkpoint folder (default: the built-in model).
        prompts: YAML prompt set of named sections, each one question (default: specimen and tissue,
            microscopic findings, impression, uncertainty).
        batch_size: slides whose sections are generated in one left-padded batch.
        workers: slide-preparation processes (tiling, extraction, files; default batch_size + 1).
        features: feature cache (an `pathchat extract` job folder) to reuse and fill (default: the
            pipeline's cache).
        anonymise: name the files by a salted hash of the slide id (map in OUT/anonymisation_map.json).
        min_tiles: fewer tissue tiles than this gives an "insufficient tissue" report.
        top_k: evidence tiles listed in the report and the GeoJSON.
        slide_mpp: level-0 µm/px of every slide, overriding the files.
        default_slide_mpp: level-0 µm/px for slides whose files record none.
        device: cpu, cuda, cuda:1 … (auto: cuda when available).
        timeout: seconds before a slide is killed and recorded as failed.
        progress: show a progress bar.
    Returns:
        0 when every slide has a report (insufficient tissue or resolution included), 2 when some failed
        (1 is a usage or tool error, raised).
    """
    import torch

    from pathchat.inference import Pipeline

    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    pipe = Pipeline.from_pretrained(model, device=device, progress=progress)
    result = run_reports(slides, out, pipe, prompts=prompts, batch_size=batch_size, workers=workers,
                         features=features, anonymise=anonymise, min_tiles=min_tiles, top_k=top_k,
                         timeout_s=timeout, progress=progress, slide_mpp=slide_mpp,
                         default_slide_mpp=default_slide_mpp)
    summary = result.summary
    for row in summary.failures:
        print(f"FAILED {row['slide_id']}: [{row['error_type']}] {row['message']}", file=sys.stderr)
    for slide_id in summary.insufficient_resolution_slides:
        print(f"INSUFFICIENT RESOLUTION {slide_id}: scanned coarser than the model's "
              f"{pipe.recipe.target_mpp:g} µm/px (or no mpp recorded); report written without a model call",
              file=sys.stderr)
    print(f"outputs: {result.out}")
    sizes = result.batch_sizes
    print(f"model calls: {result.model_calls} in {len(sizes)} generation rounds"
          + (f" of {sum(sizes) / len(sizes):.1f} slides on average" if sizes else ""))
    print(summary.line())
    return int(summary.exit_code)


def _default_cache(pipe: Any, out_dir: Path) -> Path:
    """The pipeline's feature cache (shared with `pathchat chat`; a `pathchat extract` job), else OUT/features."""
    cache = getattr(pipe, "feature_job", None)
    return Path(cache) if cache else out_dir / "features"


def _load_prepared(pipe: Any, features: str) -> Any:
    """A prepared slide from its cached features file (the pipeline checks the recipe)."""
    return pipe.prepare(features)


def _extract_device(pipe: Any) -> str:
    device = str(getattr(pipe, "device", "cpu"))
    return "cpu" if device.startswith("cpu") else "auto"
