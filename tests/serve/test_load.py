"""Load on loopback: 8 simultaneous clients against a concurrency of 2, then a few hundred requests.

Every client gets an answer or the busy message (never a server error), at most 2 answers are
generated at once, and the server's memory stays bounded. The server runs in its own process so its
resident memory is its own.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import free_port

from pathchat.serve.service import BUSY_ANSWER

pytestmark = pytest.mark.slow

CLIENTS = 8
CONCURRENCY = 2
ANSWER = "Answer 1 about 88 tiles."


def _text(message: dict) -> str:
    content = message["content"]
    return "".join(p.get("text", "") for p in content) if isinstance(content, list) else str(content)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("run_fake_server.py")), "--root", str(root),
                             "--port", str(port), "--concurrency", str(CONCURRENCY), "--busy-wait", "0.5",
                             "--delay", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url + "_test/stats", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"test server did not start: {proc.communicate()[0][-2000:]}")
        time.sleep(0.3)
    yield url
    stopping = time.monotonic()
    proc.terminate()
    out, _ = proc.communicate(timeout=20)
    assert "Traceback" not in out, out[-3000:]
    assert time.monotonic() - stopping < 2.0  # 8 clients' heartbeat streams end at once (before: 15 s)


def _slide_id(client) -> str:
    choices = client.predict(api_name="/list_slides")["choices"]
    return next(value for label, value in choices if label == "CMU-1-Small-Region")


def test_eight_clients_get_answers_or_busy_and_memory_stays_bounded(server):
    from gradio_client import Client

    clients = [Client(server, verbose=False) for _ in range(CLIENTS)]
    sid = _slide_id(clients[0])
    for c in clients:
        c.predict(sid, api_name="/open_slide")
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(CLIENTS)

    def ask(c) -> None:
        try:
            barrier.wait()
            results.append(_text(c.predict("What is this?", [], api_name="/ask")[0][-1]))
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == CLIENTS
    assert set(results) <= {ANSWER, BUSY_ANSWER}, results
    answered = results.count(ANSWER)
    assert answered >= CONCURRENCY
    stats = httpx.get(server + "_test/stats").json()
    assert stats["max_active"] <= CONCURRENCY  # never more answers at once than the limit
    assert stats["model_calls"] == answered  # a busy reply calls no model

    # a few hundred requests: tiles at every level, page loads and questions; memory levels off
    with httpx.Client(base_url=server, timeout=30) as http:
        def burst(n: int) -> None:
            for i in range(n):
                level = 8 + i % 5  # deep-zoom levels 8..12
                col, row = (i * 7) % max(1, 9 >> (12 - level)), (i * 5) % max(1, 12 >> (12 - level))
                r = http.get(f"slides/{sid}_files/{level}/{col}_{row}.jpeg")
                assert r.status_code == 200, (level, col, row, r.status_code)
                if i % 10 == 0:
                    assert http.get("").status_code == 200
                if i % 25 == 0:
                    reply = _text(clients[i % CLIENTS].predict(f"Question {i}?", [], api_name="/ask")[0][-1])
                    assert reply == BUSY_ANSWER or reply.startswith("Answer ")

        burst(60)  # warm-up: caches, imports, first sessions
        rss_warm = httpx.get(server + "_test/stats").json()["rss_mb"]
        burst(300)
        rss_after = httpx.get(server + "_test/stats").json()["rss_mb"]
    print(f"load: {answered}/{CLIENTS} answered, {CLIENTS - answered} busy; server RSS {rss_warm:.0f} MB after "
          f"warm-up, {rss_after:.0f} MB after 300 more requests")
    assert rss_after - rss_warm < 60, (rss_warm, rss_after)
