"""What the web UI does, without Gradio: open a slide, answer (streamed), evidence, region questions, reports.

One `ChatService` per server holds the pipeline, the slide catalog and the answer slots; one
`Conversation` per browser session holds that session's slide and chat sessions (its KV caches).
Keeping this free of Gradio lets tests drive it directly and keeps the page code to layout and wiring.

Load: at most `concurrency` answers run at once; a question that finds no free slot within
`busy_wait_s` gets `BUSY_ANSWER` instead of an error. Without a slide the answer is the fixed
`NO_SLIDE_ANSWER`, and no model is called; likewise a slide without tissue, or one scanned coarser
than the model's feature recipe (it opens, and every answer explains the resolution problem).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pathchat.inference.notices import NO_SLIDE_ANSWER, NO_TISSUE_ANSWER
from pathchat.inference.recipe import FeatureRecipe, SlideResolutionError
from pathchat.serve.catalog import CatalogSlide, SlideCatalog
from pathchat.serve.evidence import viewer_evidence
from pathchat.wsi.deepzoom import DeepZoomCache, DeepZoomInfo

__all__ = ["BUSY_ANSWER", "ChatService", "Conversation", "Piece", "ChatPipeline"]

log = logging.getLogger(__name__)

BUSY_ANSWER = ("PathChat is busy answering other questions right now. Please ask again in a moment; "
               "your conversation is kept.")

ProgressFn = Callable[[str, int, int], None]


class ChatPipeline(Protocol):
    """The part of `pathchat.inference.Pipeline` the UI uses (tests may pass a small stand-in)."""

    model_id: str

    def prepare(self, path: str | Path, progress: ProgressFn | None = None) -> Any: ...

    def session(self, slide: Any, region: tuple[int, int, int, int] | None = None) -> Any: ...


@dataclass
class Conversation:
    """One browser session's state: the open slide and its chat sessions (created lazily)."""

    slide: CatalogSlide | None = None
    prepared: Any = None  # the pipeline's prepared slide (features, coords)
    viewer: DeepZoomInfo | None = None
    session: Any = None  # whole-slide chat session (KV cache reused by follow-ups)
    region: tuple[int, int, int, int] | None = None
    region_session: Any = None
    turns: int = 0
    report_files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Piece:
    """One event of an answer: `text` (cumulative answer so far), then at most one `evidence`."""

    text: str
    evidence: dict[str, Any] | None = None
    done: bool = False
    kind: str = "answer"  # answer | busy | refusal | no_tissue | insufficient_resolution | error


def _tile_l0_px(prepared: Any) -> float:
    """Tile side in level-0 pixels: the feature file's own record, else the spacing of the coords."""
    bag = prepared.bag
    if getattr(bag, "patch_size_level0", None):
        return float(bag.patch_size_level0)
    coords = np.asarray(bag.coords)
    xs = np.unique(coords[:, 0])
    return float(np.diff(xs).min()) if len(xs) > 1 else 256.0


class ChatService:
    """The server-wide half of the UI (one per app; per-session state lives in `Conversation`)."""

    def __init__(self, pipeline: ChatPipeline, catalog: SlideCatalog, *, concurrency: int = 2,
                 busy_wait_s: float = 20.0, top_tiles: int = 5, reports_dir: Path | None = None):
        self.pipeline = pipeline
        self.catalog = catalog
        self.deepzoom = DeepZoomCache()
        self.top_tiles = top_tiles
        self.busy_wait_s = busy_wait_s
        self.reports_dir = reports_dir
        self._slots = threading.BoundedSemaphore(concurrency)
        self._prepare_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    # -- slides ---------------------------------------------------------------------------
    def viewer_info(self, slide_id: str) -> tuple[CatalogSlide, DeepZoomInfo]:
        """The slide of an id and its deep-zoom geometry (raises UnknownSlideError, SlideError)."""
        slide = self.catalog.get(slide_id)
        return slide, self.deepzoom.get(slide.slide_id, slide.path).info

    def open_slide(self, slide_id: str, progress: ProgressFn | None = None) -> Conversation:
        """A new conversation about a slide: features found in the cache or computed (with progress).

        Two sessions opening the same slide compute its features once (a lock per slide). A slide scanned
        coarser than the model's feature recipe opens without features (`SlideFeatures.unassessed`): its
        answers and report say why, without a model call.
        """
        slide, info = self.viewer_info(slide_id)
        with self._locks_lock:
            lock = self._prepare_locks.setdefault(slide.slide_id, threading.Lock())
        with lock:
            try:
                prepared = self.pipeline.prepare(slide.path, progress=progress)
            except SlideResolutionError as e:
                from pathchat.inference.pipeline import SlideFeatures

                log.info("slide %s: %s", slide.slide_id, e.reason)
                recipe = getattr(self.pipeline, "recipe", None)
                prepared = SlideFeatures.unassessed(e, recipe if isinstance(recipe, FeatureRecipe) else None)
        return Conversation(slide=slide, prepared=prepared, viewer=info)

    # -- answers --------------------------------------------------------------------------
    def ask(self, conv: Conversation | None, question: str,
            region: tuple[int, int, int, int] | None = None) -> Iterator[Piece]:
        """Stream the answer to `question` about the open slide (or about `region`, level-0 x, y, w, h).

        Yields cumulative text; the last piece has `done=True` and, for a model answer, the evidence.
        """
        if conv is None or conv.prepared is None:
            yield Piece(NO_SLIDE_ANSWER, done=True, kind="refusal")
            return
        if getattr(conv.prepared, "insufficient_resolution", False):
            yield Piece(conv.prepared.fixed_answer, done=True, kind="insufficient_resolution")
            return
        if getattr(conv.prepared, "no_tissue", False):
            yield Piece(NO_TISSUE_ANSWER, done=True, kind="no_tissue")
            return
        if not self._slots.acquire(timeout=self.busy_wait_s):
            yield Piece(BUSY_ANSWER, done=True, kind="busy")
            return
        try:
            if region is not None:
                if conv.region_session is None or conv.region != region:
                    conv.region_session = self.pipeline.session(conv.prepared, region=region)
                    conv.region = region
                session = conv.region_session
            else:
                if conv.session is None:
                    conv.session = self.pipeline.session(conv.prepared)
                session = conv.session
            text = ""
            try:
                for delta in session.ask(question, stream=True):
                    text += delta
                    yield Piece(text)
            except ValueError as e:  # e.g. the conversation outgrew the model's context
                yield Piece(f"{text}\n\n[{e}] Open the slide again to start a new conversation.", done=True,
                            kind="error")
                return
            conv.turns += 1
            evidence = self.evidence(conv, session, text, region)
        finally:
            self._slots.release()
        yield Piece(text, evidence=evidence, done=True)

    def evidence(self, conv: Conversation, session: Any, answer: str,
                 region: tuple[int, int, int, int] | None) -> dict[str, Any] | None:
        """The viewer's evidence for the session's last answer (None when it has no tiles)."""
        assert conv.viewer is not None
        try:
            scores = np.asarray(session.relevance(), dtype=np.float64).reshape(-1)
        except (RuntimeError, ValueError) as e:  # no relevance for this answer: show the answer anyway
            log.warning("no relevance map for the last answer: %s", e)
            return None
        if session.tile_coords_l0 is None:  # features imported without coordinates: nothing to draw
            return None
        coords = np.asarray(session.tile_coords_l0)
        if len(scores) == 0 or len(coords) != len(scores) or not float(scores.max()) > 0:
            return None
        return viewer_evidence(coords, _tile_l0_px(conv.prepared), scores, conv.viewer.l0_offset,
                               top_k=self.top_tiles, region=region, answer=answer)

    # -- reports --------------------------------------------------------------------------
    def write_report(self, conv: Conversation | None) -> dict[str, Path]:
        """The open slide's report (the code of `pathchat report`) in a fresh folder under `reports_dir`.

        Returns:
            {"json", "markdown", "heatmap", "evidence"}: the written files.

        Raises:
            ValueError: no slide is open.
        """
        if conv is None or conv.prepared is None:
            raise ValueError(NO_SLIDE_ANSWER)
        from pathchat.inference.report import write_report

        if self.reports_dir is None:
            raise ValueError("this server has no reports folder")
        out = self.reports_dir / uuid.uuid4().hex  # unguessable, one per click
        out.mkdir(parents=True)
        if not self._slots.acquire(timeout=self.busy_wait_s):
            raise TimeoutError(BUSY_ANSWER)
        try:
            result = write_report(self.pipeline, conv.prepared, out)
        finally:
            self._slots.release()
        return {k: Path(v) for k, v in result["paths"].items()}
