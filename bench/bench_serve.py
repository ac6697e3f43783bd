"""Speed of the web UI: deep-zoom tiles over HTTP against OpenSlide in-process, and time to first token in the page.

Run with `python bench/bench_serve.py` (part of `make bench`).

1. Tiles per second. A synthetic 4096 x 4096 px JPEG-tiled slide at 0.5 µm/px; the tiles of its three
   finest deep-zoom levels (254-px tiles, overlap 1). In-process: `openslide.deepzoom.DeepZoomGenerator`
   `get_tile` plus the same JPEG encoding the server does, one thread. Over HTTP: the app's tile route on
   loopback (uvicorn), fetched by 1 connection and by 4 at once (a browser opens about 6). Each side
   first reads every tile once (OpenSlide's cache warm for both), then the best of `--repeats` passes.
   The issue's target is HTTP >= 0.7x in-process.
2. Time to first token in the page: headless chromium (Debian's, through Playwright) opens the page,
   picks the slide (features computed once, not timed), asks a question and then a follow-up; each is
   timed from the click on Ask to the first answer text appearing in the chat (a MutationObserver in the
   page). The model is `--model` (default: the built-in one).

Prints one JSON object and writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # data_recipes/ (the built-in model's fallback) is a folder of the repository
RESULTS = ROOT / "bench" / "results"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_slide(folder: Path) -> Path:
    from pathchat.wsi.synthetic import random_slide_spec, write_synthetic_slide

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench-4096.svs"
    write_synthetic_slide(path, random_slide_spec(5, width_px=4096, height_px=4096, n_regions=(3, 4)))
    return path


def _tile_list(path: Path, levels: int = 3) -> list[tuple[int, int, int]]:
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    dz = DeepZoomGenerator(OpenSlide(str(path)), tile_size=254, overlap=1, limit_bounds=True)
    return [(lv, c, r) for lv in range(dz.level_count - levels, dz.level_count)
            for c in range(dz.level_tiles[lv][0]) for r in range(dz.level_tiles[lv][1])]


def bench_in_process(path: Path, tiles: list[tuple[int, int, int]], repeats: int) -> float:
    """Tiles per second: DeepZoomGenerator.get_tile + JPEG encoding, one thread."""
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    from pathchat.wsi.deepzoom import DEFAULT_JPEG_QUALITY

    dz = DeepZoomGenerator(OpenSlide(str(path)), tile_size=254, overlap=1, limit_bounds=True)

    def one_pass() -> float:
        start = time.perf_counter()
        for lv, c, r in tiles:
            buf = io.BytesIO()
            dz.get_tile(lv, (c, r)).convert("RGB").save(buf, "JPEG", quality=DEFAULT_JPEG_QUALITY)
        return len(tiles) / (time.perf_counter() - start)

    one_pass()  # warm OpenSlide's tile cache
    return max(one_pass() for _ in range(repeats))


class _NoModel:
    """The tile routes need no model: a stand-in that refuses to answer."""

    model_id = "none"

    def prepare(self, path: Any, progress: Any = None) -> Any:
        raise RuntimeError("bench: no model")

    def session(self, slide: Any, region: Any = None) -> Any:
        raise RuntimeError("bench: no model")


def _start(app: Any, port: int) -> Any:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


def _tile_server(slide_dir: Path, data_dir: Path, port: int, ids: Any) -> None:
    """The app without a model, in its own process (as `pathchat serve` runs beside a browser)."""
    import uvicorn

    from pathchat.serve.app import build_app
    from pathchat.serve.settings import ServeSettings

    app = build_app(ServeSettings(data_dir=data_dir, port=port), _NoModel(), slide_dir)
    ids.put(app.state.service.catalog.list()[0].slide_id)
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")).run()


def bench_http(slide_dir: Path, data_dir: Path, tiles: list[tuple[int, int, int]], repeats: int,
               connections: tuple[int, ...] = (1, 4)) -> dict[str, float]:
    """Tiles per second through the app's tile route, by `connections` concurrent clients.

    The server runs in a process of its own, so the clients here do not share its interpreter lock
    (a browser does not either).
    """
    import multiprocessing

    import httpx

    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    ids = ctx.Queue()
    proc = ctx.Process(target=_tile_server, args=(slide_dir, data_dir, port, ids), daemon=True)
    proc.start()
    sid = ids.get(timeout=120)
    base = f"/slides/{sid}_files"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/slides/{sid}.dzi", timeout=5).raise_for_status()
            break
        except httpx.TransportError:
            if time.monotonic() > deadline or not proc.is_alive():
                raise RuntimeError("bench: the tile server did not start") from None
            time.sleep(0.1)
    out: dict[str, float] = {}
    try:
        for n in connections:
            # http.client: a keep-alive connection with little Python per request (httpx spent about as
            # long per request as the server did), so the figure is what the server adds
            clients = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(n)]

            def fetch(i: int, clients: list[Any] = clients, n: int = n) -> None:
                for j in range(i, len(tiles), n):
                    lv, c, r = tiles[j]
                    clients[i].request("GET", f"{base}/{lv}/{c}_{r}.jpeg")
                    resp = clients[i].getresponse()
                    body = resp.read()
                    if resp.status != 200 or not body:
                        raise RuntimeError(f"tile {lv}/{c}_{r}: HTTP {resp.status}")

            def one_pass(n: int = n, fetch: Any = fetch) -> float:
                start = time.perf_counter()
                with ThreadPoolExecutor(n) as pool:
                    list(pool.map(fetch, range(n)))
                return len(tiles) / (time.perf_counter() - start)

            one_pass()
            out[f"http_{n}_connections_tiles_per_s"] = max(one_pass() for _ in range(repeats))
            for c in clients:
                c.close()
    finally:
        proc.terminate()
        proc.join(10)
    return out


def bench_ttft(slide_dir: Path, data_dir: Path, model: str | None, chromium: str) -> dict[str, Any]:
    """Seconds from the click on Ask to the first answer text in the page: first question and follow-up."""
    from playwright.sync_api import sync_playwright

    from pathchat.serve.app import build_app
    from pathchat.serve.server import load_pipeline
    from pathchat.serve.settings import ServeSettings

    port = _free_port()
    settings = ServeSettings(model=model, data_dir=data_dir, port=port, max_new_tokens=48)
    pipe = load_pipeline(settings)
    app = build_app(settings, pipe, slide_dir)
    server = _start(app, port)
    watch = """() => new Promise((resolve) => {
        const chat = document.getElementById('pathchat-chat');
        const answers = () => chat.querySelectorAll('.message.bot:not(.pending)');
        const before = answers().length;
        const t0 = performance.now();
        window.__pathchatClick = t0;
        const obs = new MutationObserver(() => {
            const bots = answers();
            if (bots.length > before && bots[bots.length - 1].innerText.trim().length > 0) {
                obs.disconnect(); resolve((performance.now() - t0) / 1000);
            }
        });
        obs.observe(chat, {childList: true, subtree: true, characterData: true});
        document.querySelector('#pathchat-ask').click();
    })"""
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.locator("#pathchat-picker input").click()
            page.get_by_role("option").first.click()
            page.wait_for_function("() => document.getElementById('pathchat-status').innerText.includes('tiles')")
            times = []
            for n, question in enumerate(("What is the main tissue type in this slide?", "Is there any tumour?")):
                page.locator("#pathchat-question textarea").fill(question)
                times.append(page.evaluate(watch))
                # the whole answer (and its evidence) is done before the follow-up is asked
                page.wait_for_function(f"() => window.pathchat.answersDone() > {n}")
            browser.close()
    finally:
        server.should_exit = True
    return {"model": pipe.model_id, "ttft_first_question_s": round(times[0], 3),
            "ttft_follow_up_s": round(times[1], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="checkpoint for the time-to-first-token part (default: the built-in model)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--skip-ttft", action="store_true", help="tiles only")
    args = parser.parse_args(argv)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        slide_dir = Path(tmp) / "slides"
        path = _write_slide(slide_dir)
        tiles = _tile_list(path)
        result: dict[str, Any] = {"slide_px": [4096, 4096], "tiles": len(tiles), "threads": os.cpu_count()}
        result["in_process_tiles_per_s"] = round(bench_in_process(path, tiles, args.repeats), 1)
        for key, value in bench_http(slide_dir, Path(tmp) / "data", tiles, args.repeats).items():
            result[key] = round(value, 1)
        for n in (1, 4):
            result[f"ratio_http_{n}_vs_in_process"] = round(
                result[f"http_{n}_connections_tiles_per_s"] / result["in_process_tiles_per_s"], 3)
        if not args.skip_ttft:
            result.update(bench_ttft(slide_dir, Path(tmp) / "data-ttft", args.model, args.chromium))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
