"""`pathchat serve` end to end with the real inference pipeline, in its own process.

A tiny random checkpoint that records the random-cnn-tiny recipe (tests/inference's builder), a
synthetic slide, and the CLI verb: the first open tiles and encodes the slide into the app's data
folder (the pipeline's feature cache), answers stream from the real decode loop with a relevance map
over the slide's tiles, a region question sees only the tiles inside it, and a second open reuses
the cached features.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    from inference_fixtures import RECIPE, save_tiny_checkpoint

    from pathchat.wsi.synthetic import SyntheticSlideSpec, TissueRegion, write_synthetic_slide

    root = tmp_path_factory.mktemp("real")
    ckpt = save_tiny_checkpoint(root / "ckpt", RECIPE)
    slides = root / "slides"
    slides.mkdir()
    regions = (TissueRegion("tumor", 0, 0, 768, 1024), TissueRegion("stroma", 768, 0, 768, 1024))
    write_synthetic_slide(slides / "halves.svs", SyntheticSlideSpec(3072, 2048, mpp=0.5, regions=regions, seed=3))
    port = free_port()
    data = root / "data"
    proc = subprocess.Popen([sys.executable, "-m", "pathchat.cli", "serve", "--model", str(ckpt), "--slides", str(slides),
                             "--port", str(port), "--data-dir", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"pathchat serve did not start: {proc.communicate()[0][-3000:]}")
        time.sleep(0.5)
    yield url, data
    stopping = time.monotonic()
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out[-3000:]
    # The test's clients opened heartbeat streams; they end at once (before: 15 s, gradio's heartbeat period).
    assert time.monotonic() - stopping < 2.0


def test_serve_with_the_real_pipeline(real_server):
    from gradio_client import Client

    url, data = real_server
    client = Client(url, verbose=False)
    choices = client.predict(api_name="/list_slides")["choices"]
    assert [label for label, _ in choices] == ["halves"]
    sid = choices[0][1]
    _, spec, _, status, _ = client.predict(sid, api_name="/open_slide")
    assert json.loads(spec)["mpp"] == 0.5
    assert "96 tiles" in status  # 3072 x 2048 px at 20x in 256-px tiles: 12 x 8, all tissue
    features = list((data / "features").rglob("halves.h5"))
    assert len(features) == 1  # the pipeline's feature cache lives in the app's data folder
    mtime = features[0].stat().st_mtime_ns

    job = client.submit("Which tissue dominates?", [], api_name="/ask")
    pieces = [out for out in job]
    chat, evidence_json, tiles_html, _ = job.result()
    assert len(pieces) >= 2 and chat[-1]["role"] == "assistant"
    evidence = json.loads(evidence_json)
    scores = [t["score"] for t in evidence["top_tiles"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    assert evidence["heatmap_rect"] == [0.0, 0.0, 3072.0, 2048.0]
    follow = client.predict("And the rest?", chat, api_name="/ask")[0]
    assert len(follow) == 4

    # a region: only its tiles (x 0..767, y 0..511 -> 3 x 2 tiles) can carry evidence
    region_evidence = json.loads(client.predict("Here?", [], "0,0,768,512", api_name="/ask_region")[1])
    rects = {tuple(t["rect"]) for t in region_evidence["top_tiles"]}
    assert rects <= {(x, y, 256, 256) for x in (0, 256, 512) for y in (0, 256)} and len(rects) == 5
    heat = np.asarray(region_evidence["heatmap_rect"])
    assert heat.tolist() == [0.0, 0.0, 768.0, 512.0]

    # another browser session opening the slide reuses the cached features
    other = Client(url, verbose=False)
    other.predict(sid, api_name="/open_slide")
    assert features[0].stat().st_mtime_ns == mtime
