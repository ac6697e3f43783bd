"""`serve()`: check the settings, load the model, find or write the slides, and run the app with uvicorn."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from pathchat.serve.settings import ServeSettings

__all__ = ["serve", "ensure_demo_slides", "load_pipeline"]

log = logging.getLogger(__name__)

#: Demo slides written on first start when no --slides folder is given (seed, regions).
DEMO_SLIDES = (("demo-tumour-stroma", 11), ("demo-lymphoid", 12), ("demo-mixed", 13))


def ensure_demo_slides(folder: Path, size_px: tuple[int, int] = (4096, 3072)) -> Path:
    """Write the demo slides once (seeded synthetic H&E-like TIFFs with known regions); returns the folder."""
    from pathchat.wsi.synthetic import random_slide_spec, write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in DEMO_SLIDES:
        path = folder / f"{name}.tiff"
        if not path.exists():
            spec = random_slide_spec(seed, width_px=size_px[0], height_px=size_px[1], n_regions=(2, 4),
                                     label_text="PATHCHAT DEMO")
            write_synthetic_slide(path, spec)
    return folder


def load_pipeline(settings: ServeSettings) -> Any:
    """The inference pipeline for `settings.model` (None: the built-in model), features cached in the data folder."""
    from pathchat.inference import Pipeline

    return Pipeline.from_pretrained(settings.model, device=settings.device, feature_job=settings.features_dir,
                                    max_new_tokens=settings.max_new_tokens)


SHUTDOWN_GRACE_S = 3
"""How long a stopping server lets requests in flight finish before it closes their connections."""


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """Ends every open page's heartbeat stream when asked to stop (gradio's own launcher does the same
        through the app's `stop_event`): an open browser tab otherwise kept Ctrl-C or a SIGTERM waiting
        until the tab went away."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            for route in getattr(self.config.app, "routes", ()):
                event = getattr(getattr(route, "app", None), "stop_event", None)
                if loop is not None and event is not None:
                    loop.call_soon_threadsafe(event.set)
            super().handle_exit(sig, frame)

    return Server


def run_app(app: Any, host: str, port: int, log_level: str = "warning") -> None:
    """Serve the app with uvicorn until Ctrl-C or SIGTERM, which stop it at once (`_server_class`)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    _server_class()(config).run()


def serve(settings: ServeSettings, pipeline: Any = None) -> int:
    """Serve the PathChat page until interrupted; returns the exit code.

    Raises:
        ServeSettingsError: unsafe or impossible settings (non-loopback without auth, share without auth, ...).
    """
    settings.check()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Gradio's uploads and cache go to the app's own data folder; no usage analytics leave the machine.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(settings.gradio_dir))
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from pathchat.serve.app import build_app

    slides_dir = Path(settings.slides) if settings.slides else ensure_demo_slides(settings.demo_slides_dir)
    if pipeline is None:
        print("loading the model ...", flush=True)
        pipeline = load_pipeline(settings)
    app = build_app(settings, pipeline, slides_dir)
    url = f"http://{settings.host}:{settings.port}/"
    if settings.share:
        from gradio.networking import setup_tunnel  # needs the network; refused without auth by check()

        url = setup_tunnel(settings.host, settings.port, os.urandom(16).hex(), None, None)
    print(f"PathChat on {url} (slides: {slides_dir}; data: {settings.data_dir}). For Research Use Only.", flush=True)
    run_app(app, settings.host, settings.port)
    return 0


def serve_cli(model: str | None = None, slides: str | None = None, host: str = "127.0.0.1", port: int = 7860,
              auth_file: str | None = None, share: bool = False, data_dir: str | None = None,
              concurrency: int = 2, max_upload_mb: int = 2048, device: str = "cpu") -> int:
    """Serve the web UI: a slide viewer with a streamed chat about the open slide, evidence and reports.

    With no arguments: the built-in model over demo slides written on first start, on
    http://127.0.0.1:7860/. For Research Use Only.

    Args:
        model: checkpoint folder (default: the built-in model).
        slides: server-side slide folder (default: demo slides in the data folder).
        host: address to listen on; anything but loopback needs --auth-file.
        port: TCP port.
        auth_file: file of `user:password` lines; every route then needs HTTP Basic auth (default: $PATHCHAT_AUTH_FILE).
        share: open a public share link through Gradio's tunnel (needs --auth-file).
        data_dir: uploads, reports, features and caches (default: $PATHCHAT_SERVE_DATA, else $PATHCHAT_CACHE/serve).
        concurrency: answers computed at once; later questions wait, then get a busy message.
        max_upload_mb: upload size limit in MiB (0 disables uploads).
        device: torch device of the model (cpu, cuda, cuda:1 ...).
    """
    from pathchat.serve.settings import default_data_dir

    settings = ServeSettings(model=model, slides=slides, host=host, port=port, auth_file=auth_file, share=share,
                             data_dir=Path(data_dir) if data_dir else default_data_dir(), concurrency=concurrency,
                             max_upload_mb=max_upload_mb, device=device)
    return serve(settings)
