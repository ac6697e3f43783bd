"""The PathChat page: a Gradio Blocks app mounted on FastAPI beside the deep-zoom and asset routes.

Routes of the app (all behind `BasicAuthMiddleware` when auth is on):
  /slides/<id>.dzi, /slides/<id>_files/<level>/<col>_<row>.jpeg   deep-zoom descriptor and tiles
  /viewer-assets/osd/...   OpenSeadragon from the npm install (never a CDN)
  /viewer-assets/app/...   this package's viewer script and style
  /                        the Gradio page and Gradio's own API
Slides are named by opaque ids only (`SlideCatalog`); label and macro images and raw metadata have no
route. Per-browser state is a `gr.State` holding a `Conversation`; nothing per-user is global.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pathchat.inference.notices import INSUFFICIENT_RESOLUTION_ANSWER, NO_SLIDE_ANSWER, RESEARCH_NOTICE
from pathchat.serve.catalog import SlideCatalog, UnknownSlideError, UploadError
from pathchat.serve.service import ChatPipeline, ChatService, Conversation
from pathchat.serve.settings import ServeSettings
from pathchat.wsi.errors import SlideError

__all__ = ["build_app", "default_osd_dir"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
_TILE_RE = re.compile(r"^(\d{1,6})_(\d{1,6})\.jpeg$")
_REGION_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*$")


def default_osd_dir() -> Path:
    """OpenSeadragon's build folder as `make install` (npm ci in serve/) leaves it in a clone."""
    return Path(__file__).resolve().parents[2] / "serve" / "node_modules" / "openseadragon" / "build" / "openseadragon"


def _chat(history: list[dict[str, Any]] | None, question: str, answer: str) -> list[dict[str, Any]]:
    return [*(history or []), {"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _tiles_html(evidence: dict[str, Any] | None) -> str:
    if not evidence or not evidence.get("top_tiles"):
        return ""
    buttons = "".join(
        f'<button type="button" class="pathchat-tile" data-pathchat-rect="{",".join(str(round(v)) for v in t["rect"])}">'
        f'#{t["rank"]} · {t["score"]:.3f}</button>' for t in evidence["top_tiles"])
    return f'<div class="pathchat-tiles"><b>Evidence (click to go there):</b> {buttons}</div>'


def parse_region(text: str | None, conv: Conversation | None) -> tuple[int, int, int, int] | None:
    """A region "x,y,w,h" in deep-zoom image pixels -> level-0 (x, y, w, h); None when empty or degenerate.

    Raises:
        ValueError: text that is not four numbers.
    """
    if not text or not text.strip():
        return None
    m = _REGION_RE.match(text)
    if not m:
        raise ValueError("a region is four numbers: x, y, width, height")
    x, y, w, h = (float(v) for v in m.groups())
    if w < 1 or h < 1:
        return None
    ox, oy = conv.viewer.l0_offset if conv is not None and conv.viewer is not None else (0, 0)
    return int(round(x + ox)), int(round(y + oy)), int(round(w)), int(round(h))


def build_app(settings: ServeSettings, pipeline: ChatPipeline, slides_dir: Path) -> Any:
    """The FastAPI application serving the page, its API, the tiles and the assets.

    Args:
        settings: checked `ServeSettings`.
        pipeline: the inference pipeline (or a stand-in with the same `prepare` / `session`).
        slides_dir: the server-side slide folder (already resolved: demo slides when none was given).
    """
    import gradio as gr
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request

    settings.check()
    for folder in (settings.uploads_dir, settings.reports_dir):
        folder.mkdir(parents=True, exist_ok=True)
    catalog = SlideCatalog(slides_dir, settings.uploads_dir, settings.max_upload_mb * 2**20)
    service = ChatService(pipeline, catalog, concurrency=settings.concurrency, busy_wait_s=settings.busy_wait_s,
                          top_tiles=settings.top_tiles, reports_dir=settings.reports_dir)

    app = FastAPI(title="PathChat", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    # -- deep zoom ------------------------------------------------------------------------
    def _deepzoom(slide_id: str) -> Any:
        try:
            slide = catalog.get(slide_id)
            return service.deepzoom.get(slide.slide_id, slide.path)
        except (UnknownSlideError, SlideError) as e:
            raise HTTPException(status_code=404, detail="no such slide") from e

    @app.get("/slides/{name}")
    def dzi(name: str) -> Response:
        if not name.endswith(".dzi"):
            raise HTTPException(status_code=404, detail="not found")
        return Response(_deepzoom(name[:-4]).dzi_xml(), media_type="application/xml",
                        headers={"Cache-Control": "private, max-age=3600"})

    def tile_bytes(slide_files: str, level: str, tile: str) -> bytes:
        m = _TILE_RE.match(tile)
        if not slide_files.endswith("_files") or not m or not level.isdigit() or len(level) > 3:
            raise HTTPException(status_code=404, detail="not found")
        dz = _deepzoom(slide_files[: -len("_files")])
        try:
            return bytes(dz.tile_jpeg(int(level), int(m.group(1)), int(m.group(2))))
        except SlideError as e:
            raise HTTPException(status_code=404, detail="no such tile") from e

    async def tile(request: Request) -> Response:
        """A plain Starlette route: FastAPI's parameter handling cost about as much per tile as the
        network did (bench/bench_serve.py), and a viewer asks for hundreds of tiles."""
        p = request.path_params
        data = await run_in_threadpool(tile_bytes, p["slide_files"], p["level"], p["tile"])
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    app.add_route("/slides/{slide_files}/{level}/{tile}", tile, methods=["GET"])

    osd_dir = Path(settings.osd_dir) if settings.osd_dir else default_osd_dir()
    if (osd_dir / "openseadragon.min.js").is_file():
        app.mount("/viewer-assets/osd", StaticFiles(directory=osd_dir), name="osd")
    else:
        log.warning("OpenSeadragon not found in %s: run `make install` (npm ci in serve/); the viewer stays empty",
                    osd_dir)
    app.mount("/viewer-assets/app", StaticFiles(directory=STATIC_DIR), name="viewer")

    # -- page ---------------------------------------------------------------------------
    def open_slide(slide_id: str | None, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
        """Open a slide: viewer spec, a new conversation, features (computed with progress the first time)."""
        if not slide_id:
            return None, [], "", "", "Pick a slide to start.", ""
        try:
            conv = service.open_slide(slide_id, progress=lambda stage, done, total:
                                      progress((done, max(total, 1)), desc=f"{stage}"))
        except UnknownSlideError:
            return None, [], "", "", "That slide is not available.", ""
        except SlideError as e:
            return None, [], "", "", f"Cannot open this slide: {e.cause}", ""
        assert conv.slide is not None and conv.viewer is not None
        info = conv.viewer
        spec = {"slide_id": conv.slide.slide_id, "dzi": f"slides/{conv.slide.slide_id}.dzi", "mpp": info.mpp,
                "width": info.width, "height": info.height}
        n = len(conv.prepared.bag) if getattr(conv.prepared, "bag", None) is not None else 0
        size = (f"**{html.escape(conv.slide.name)}**: {info.width:,} x {info.height:,} px, "
                f"{f'{info.mpp:.3f} µm/px' if info.mpp else 'no µm/px recorded'}")
        error = getattr(conv.prepared, "resolution_error", None)
        if error is not None:  # opened, but too coarse for the model: say so before anyone asks
            status = f"{size}. {html.escape(INSUFFICIENT_RESOLUTION_ANSWER.format(reason=error.reason))}"
        else:
            status = f"{size}, {n:,} tiles. New conversation."
        return conv, [], json.dumps(spec), "", status, ""

    def ask(question: str, history: list[dict[str, Any]] | None, conv: Conversation | None,
            region_text: str = "") -> Iterator[tuple[Any, ...]]:
        """Stream an answer (about the region when one is given); the evidence comes with the last piece."""
        question = (question or "").strip()
        if not question:
            yield history or [], "", "", gr.update()
            return
        try:
            region = parse_region(region_text, conv)
        except ValueError as e:
            yield _chat(history, question, str(e)), "", "", ""
            return
        shown = question if region is None else f"[region {region[0]},{region[1]} {region[2]}x{region[3]} px] {question}"
        # the question shows at once; the answer follows as it streams
        yield [*(history or []), {"role": "user", "content": shown}], "", "", ""
        evidence = None
        for piece in service.ask(conv, question, region=region):
            evidence = piece.evidence
            yield _chat(history, shown, piece.text), json.dumps(evidence) if evidence else "", _tiles_html(evidence), ""

    def ask_region(question: str, history: list[dict[str, Any]] | None, conv: Conversation | None,
                   region_text: str) -> Iterator[tuple[Any, ...]]:
        """Answer from the tiles inside the drawn rectangle only ("x,y,w,h" in viewer image pixels)."""
        if conv is not None and conv.prepared is not None and parse_region(region_text, conv) is None:
            yield _chat(history, question, "Draw a rectangle on the slide first (Draw region)."), "", "", gr.update()
            return
        yield from ask(question, history, conv, region_text)

    def upload(file: Any) -> tuple[Any, str]:
        if file is None:
            return gr.update(), ""
        path = Path(file if isinstance(file, str) else file.name)
        try:
            slide = catalog.add_upload(path, path.name)
        except UploadError as e:
            return gr.update(), f"Upload refused: {e}"
        return gr.update(choices=catalog.choices(), value=slide.slide_id), f"Uploaded {html.escape(slide.name)}."

    def report(conv: Conversation | None) -> tuple[Any, str]:
        try:
            paths = service.write_report(conv)
        except (ValueError, TimeoutError) as e:
            return None, str(e)
        except Exception as e:  # noqa: BLE001 - the page says it failed; the traceback goes to the log
            log.exception("report failed")
            return None, f"The report could not be written ({type(e).__name__}); see the server log."
        files = [str(paths[k]) for k in ("markdown", "json", "heatmap", "evidence") if k in paths]
        return files, f"Report written ({len(files)} files)."

    def refresh_slides() -> Any:
        catalog.refresh()
        return gr.update(choices=catalog.choices())

    head = ('<link rel="stylesheet" href="viewer-assets/app/viewer.css">'
            '<script src="viewer-assets/osd/openseadragon.min.js"></script>'
            '<script src="viewer-assets/app/viewer.js"></script>')
    with gr.Blocks(title="PathChat", analytics_enabled=False) as blocks:
        gr.HTML(f'<div id="pathchat-ruo">{html.escape(RESEARCH_NOTICE)}</div>')
        conv_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    picker = gr.Dropdown(choices=catalog.choices(), value=None, label="Slide", elem_id="pathchat-picker",
                                         scale=3)
                    refresh = gr.Button("Rescan folder", scale=1, elem_id="pathchat-refresh")
                    uploader = gr.UploadButton("Upload a slide", scale=1, elem_id="pathchat-upload",
                                               visible=settings.max_upload_mb > 0)
                status = gr.Markdown("Pick a slide to start.", elem_id="pathchat-status")
                gr.HTML('<div id="pathchat-viewer"></div><div id="pathchat-scalebar"></div>', elem_id="pathchat-viewer-box")
                with gr.Row():
                    show_heatmap = gr.Checkbox(True, label="Show evidence heatmap", elem_id="pathchat-heatmap-toggle")
                    opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heatmap opacity",
                                        elem_id="pathchat-opacity")
                    draw = gr.Button("Draw region", elem_id="pathchat-draw")
                    clear = gr.Button("Clear region", elem_id="pathchat-clear-region")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="PathChat", elem_id="pathchat-chat", height=460,
                                     placeholder=NO_SLIDE_ANSWER)
                question = gr.Textbox(label="Question", placeholder="Ask about the open slide",
                                      elem_id="pathchat-question", lines=2)
                with gr.Row():
                    ask_btn = gr.Button("Ask", variant="primary", elem_id="pathchat-ask")
                    region_btn = gr.Button("Ask about region", elem_id="pathchat-ask-region")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="pathchat-stop")
                tiles = gr.HTML("", elem_id="pathchat-tiles")
                report_btn = gr.Button("Write report", elem_id="pathchat-report")
                report_files = gr.File(label="Report (Markdown, JSON, heatmap)", file_count="multiple",
                                       elem_id="pathchat-report-files", interactive=False)
                report_status = gr.Markdown("", elem_id="pathchat-report-status")
        viewer_spec = gr.Textbox(visible="hidden", elem_id="pathchat-viewer-spec")
        evidence_box = gr.Textbox(visible="hidden", elem_id="pathchat-evidence")
        region_box = gr.Textbox(visible="hidden", elem_id="pathchat-region-box")

        picker.change(open_slide, [picker], [conv_state, chatbot, viewer_spec, evidence_box, status, tiles],
                      api_name="open_slide", concurrency_limit=settings.concurrency, concurrency_id="prepare"
                      ).then(None, [viewer_spec], None, js="(s) => window.pathchat.open(s)")
        refresh.click(refresh_slides, None, [picker], api_name="list_slides")
        uploader.upload(upload, [uploader], [picker, status], api_name="upload", concurrency_id="prepare")
        answer_limit = max(8, 4 * settings.concurrency)  # waiting beyond the slots turns into the busy message
        ask_event = ask_btn.click(ask, [question, chatbot, conv_state], [chatbot, evidence_box, tiles, question],
                                  api_name="ask", concurrency_limit=answer_limit, concurrency_id="answers")
        ask_event.then(None, [evidence_box], None, js="(e) => window.pathchat.showEvidence(e)")
        submit_event = question.submit(ask, [question, chatbot, conv_state], [chatbot, evidence_box, tiles, question],
                                       api_visibility="private", concurrency_limit=answer_limit, concurrency_id="answers")
        submit_event.then(None, [evidence_box], None, js="(e) => window.pathchat.showEvidence(e)")
        region_event = region_btn.click(ask_region, [question, chatbot, conv_state, region_box],
                                        [chatbot, evidence_box, tiles, question], api_name="ask_region",
                                        concurrency_limit=answer_limit, concurrency_id="answers",
                                        js="(q, h, s, r) => [q, h, s, window.pathchat.region()]")
        region_event.then(None, [evidence_box], None, js="(e) => window.pathchat.showEvidence(e)")
        stop_btn.click(None, None, None, cancels=[ask_event, submit_event, region_event])
        show_heatmap.change(None, [show_heatmap, opacity], None, js="(s, o) => window.pathchat.setHeatmap(s, o)")
        opacity.change(None, [show_heatmap, opacity], None, js="(s, o) => window.pathchat.setHeatmap(s, o)")
        draw.click(None, None, None, js="() => window.pathchat.setDrawing(true)")
        clear.click(None, None, None, js="() => window.pathchat.clearRegion(false)")
        report_btn.click(report, [conv_state], [report_files, report_status], api_name="report",
                         concurrency_limit=settings.concurrency, concurrency_id="answers")

    blocks.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency)
    gr.mount_gradio_app(app, blocks, path="/", head=head, ssr_mode=False, footer_links=["api"],
                        allowed_paths=[str(settings.reports_dir)], max_file_size=settings.max_upload_mb * 2**20 or None,
                        show_error=False)
    if settings.auth_file:
        from pathchat.serve.auth import BasicAuthMiddleware, load_auth_file

        app.add_middleware(BasicAuthMiddleware, users=load_auth_file(settings.auth_file))
    return app
