"""Helpers of the web UI tests (a plain module, so test files import it unambiguously beside conftest.py).

A slide folder with a symlink pointing out of it and a secret file beside it; uvicorn servers on free
loopback ports, in a thread of the test process.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fake_pipeline import FakePipeline  # noqa: E402
from shared_data import CMU, SLIDES  # noqa: E402

SECRET_MARKER = "PATHCHAT-SECRET-7f3a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    pipeline: FakePipeline
    app: object
    slides_dir: Path
    secret: Path
    auth: tuple[str, str] | None = None

    @property
    def service(self):
        return self.app.state.service  # type: ignore[attr-defined]

    def slide_id(self, name: str) -> str:
        return next(s.slide_id for s in self.service.catalog.list() if s.name == name)


def make_slide_folder(root: Path) -> tuple[Path, Path]:
    """A slide folder (two real slides copied, a symlink pointing out of it) and a secret file beside it."""
    slides = root / "slides"
    slides.mkdir()
    shutil.copyfile(CMU, slides / CMU.name)
    shutil.copyfile(SLIDES / "aperio" / "small.svs", slides / "small.svs")
    secret = root / "secret.svs"  # outside the slide folder; its name looks like a slide
    shutil.copyfile(SLIDES / "aperio" / "small.svs", secret)
    (root / "secret.txt").write_text(SECRET_MARKER)
    os.symlink(secret, slides / "escape.svs")
    os.symlink(root / "secret.txt", slides / "escape.txt")
    return slides, root / "secret.txt"


def start_server(app: object, port: int) -> tuple[object, threading.Thread]:
    import uvicorn

    # open event streams would otherwise hold the shutdown for uvicorn's whole graceful period
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start within 30 s")
        time.sleep(0.05)
    return server, thread


def serve_app(root: Path, auth: tuple[str, str] | None, pipeline: FakePipeline | None = None,
              **settings_kwargs) -> Iterator[Served]:
    """Serve the app over a fresh slide folder under `root`; stops the server when the generator closes."""
    from pathchat.serve.app import build_app
    from pathchat.serve.settings import ServeSettings

    slides, secret = make_slide_folder(root)
    auth_file = None
    if auth is not None:
        auth_file = root / "users.txt"
        auth_file.write_text(f"# test users\n{auth[0]}:{auth[1]}\n")
        auth_file.chmod(0o600)
    port = free_port()
    settings = ServeSettings(data_dir=root / "data", port=port, auth_file=str(auth_file) if auth_file else None,
                             **settings_kwargs)
    pipe = pipeline or FakePipeline(delay_s=0.02)
    app = build_app(settings, pipe, slides)
    server, thread = start_server(app, port)
    yield Served(f"http://127.0.0.1:{port}/", pipe, app, slides, secret, auth)
    server.should_exit = True  # type: ignore[attr-defined]
    thread.join(timeout=10)
