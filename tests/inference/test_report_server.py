"""The report generation server: batches the waiting workers' requests, isolates a bad slide, counts calls."""

from __future__ import annotations

import threading
from multiprocessing.connection import Client
from types import SimpleNamespace

import numpy as np

from pathchat.inference.report import GenerationServer, SlideQuestions


class _CountingGenerator:
    """Answers `<slide>:<question>` with a one-hot relevance on tile 0; fails a batch holding 'poison'."""

    def __init__(self) -> None:
        self.calls = 0
        self.rounds: list[list[str]] = []

    def answer(self, jobs: list[SlideQuestions]) -> list[list[tuple[str, np.ndarray]]]:
        self.calls += 1
        self.rounds.append([j.slide.slide_id for j in jobs])
        if any(j.slide.slide_id == "poison" for j in jobs):
            raise RuntimeError("this slide breaks the model")
        return [[(f"{j.slide.slide_id}:{q}", np.eye(1, 3, 0, np.float32)[0]) for q, _ in j.questions] for j in jobs]


def _load(path: str) -> SimpleNamespace:
    if path.endswith("missing.h5"):
        raise FileNotFoundError(f"{path}: no such features file")
    return SimpleNamespace(slide_id=path.removesuffix(".h5"))


def _ask(server: GenerationServer, slide: str, replies: dict[str, dict], barrier: threading.Barrier) -> None:
    endpoint = server.endpoint()
    conn = Client(endpoint["address"], family="AF_UNIX", authkey=bytes.fromhex(endpoint["key"]))
    barrier.wait()
    conn.send({"slide_id": slide, "features": f"{slide}.h5", "questions": [["q1", 4], ["q2", 8]]})
    replies[slide] = conn.recv()
    conn.close()


def _run(server: GenerationServer, slides: list[str]) -> dict[str, dict]:
    replies: dict[str, dict] = {}
    barrier = threading.Barrier(len(slides))
    threads = [threading.Thread(target=_ask, args=(server, s, replies, barrier)) for s in slides]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return replies


def test_requests_arriving_together_share_one_round_and_a_bad_slide_fails_alone():
    gen = _CountingGenerator()
    with GenerationServer(_load, gen, batch_slides=4, linger_s=0.5) as server:
        replies = _run(server, ["a", "b", "c"])
        assert len(gen.rounds) == 1 and sorted(gen.rounds[0]) == ["a", "b", "c"] and server.batch_sizes == [3]
        assert [t for t, _ in replies["b"]["answers"]] == ["b:q1", "b:q2"]
        assert replies["a"]["answers"][0][1].tolist() == [1.0, 0.0, 0.0]

        replies = _run(server, ["missing", "poison", "d"])
    assert "FileNotFoundError" in replies["missing"]["error"]  # its features never reached the model
    assert "this slide breaks the model" in replies["poison"]["error"]
    assert [t for t, _ in replies["d"]["answers"]] == ["d:q1", "d:q2"]  # retried alone after the failed batch
    assert sorted(gen.rounds[1]) == ["d", "poison"] and sorted(gen.rounds[2:]) == [["d"], ["poison"]]
    assert server.model_calls == gen.calls == 4


def test_a_server_nobody_asks_makes_no_model_call():
    gen = _CountingGenerator()
    with GenerationServer(_load, gen) as server:
        assert server.endpoint()["address"]
    assert gen.calls == 0 and server.model_calls == 0 and server.rounds == 0


def test_a_round_waits_for_a_connected_worker_still_preparing_but_not_for_one_that_never_asks():
    """Rounds fill up: a request 0.4 s behind the first joins its round; with every connected worker
    waiting the round starts at once; a connected worker that sends nothing holds it `linger_s` at most."""
    import time

    gen = _CountingGenerator()
    with GenerationServer(_load, gen, batch_slides=4, linger_s=2.0) as server:
        endpoint = server.endpoint()

        def connect() -> Client:
            return Client(endpoint["address"], family="AF_UNIX", authkey=bytes.fromhex(endpoint["key"]))

        first, late = connect(), connect()
        time.sleep(0.2)  # both accepted
        start = time.monotonic()
        first.send({"slide_id": "a", "features": "a.h5", "questions": [["q", 4]]})
        time.sleep(0.4)
        late.send({"slide_id": "b", "features": "b.h5", "questions": [["q", 4]]})
        assert first.recv()["answers"][0][0] == "a:q" and late.recv()["answers"][0][0] == "b:q"
        waited = time.monotonic() - start
        assert server.batch_sizes == [2] and 0.4 <= waited < 1.5, (server.batch_sizes, waited)

        silent = connect()  # connected, never asks: the next round waits for it until linger_s
        time.sleep(0.2)
        start = time.monotonic()
        first.send({"slide_id": "c", "features": "c.h5", "questions": [["q", 4]]})
        assert first.recv()["answers"][0][0] == "c:q"
        waited = time.monotonic() - start
        assert server.batch_sizes == [2, 1] and 1.9 <= waited < 3.5, (server.batch_sizes, waited)
        for c in (first, late, silent):
            c.close()
