"""The page with a slide the model cannot read at its resolution: it opens, says why, and answers without a model.

The pipeline is `FakePipeline`, except that it refuses `small.svs` the way the real one refuses a slide
scanned coarser than its feature recipe (`SlideResolutionError`); tests/inference/test_low_resolution.py
drives the real pipeline through the same `ChatService`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_pipeline import FakePipeline
from serve_helpers import Served, serve_app

from pathchat.inference.notices import INSUFFICIENT_RESOLUTION_SECTION
from pathchat.inference.recipe import SlideResolutionError

pytest.importorskip("gradio_client")


class CoarseSmallPipeline(FakePipeline):
    def prepare(self, path, progress=None):
        if Path(path).stem == "small":
            raise SlideResolutionError(path, 28.97, 0.5, "small", (16, 16))
        return super().prepare(path, progress)


@pytest.fixture(scope="module")
def served_coarse(tmp_path_factory) -> Iterator[Served]:
    yield from serve_app(tmp_path_factory.mktemp("serve"), auth=None, pipeline=CoarseSmallPipeline(delay_s=0.0))


def _text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def test_a_coarse_slide_opens_with_the_message_and_answers_without_a_model(served_coarse, tmp_path):
    from gradio_client import Client

    client = Client(served_coarse.url, verbose=False, download_files=str(tmp_path))
    chat, spec, evidence, status, tiles = client.predict(served_coarse.slide_id("small"), api_name="/open_slide")
    assert json.loads(spec)["width"] == 16  # the viewer still shows the slide
    assert "Resolution too low for this model" in status and "28.97 µm/px" in status and "0.5 µm/px" in status
    calls = served_coarse.pipeline.model_calls
    chat, evidence, tiles, _ = client.predict("What tissue is this?", [], api_name="/ask")
    answer = _text(chat[-1])
    assert answer.startswith("Resolution too low for this model:") and "28.97 µm/px" in answer
    assert evidence == "" and tiles == ""
    region_chat = client.predict("Here?", [], "0,0,8,8", api_name="/ask_region")[0]
    assert _text(region_chat[-1]) == answer
    files, report_status = client.predict(api_name="/report")
    assert report_status == "Report written (4 files)."
    report = json.loads(next(Path(f) for f in files if f.endswith(".json")).read_text())
    assert report["status"] == "insufficient_resolution" and "28.97 µm/px" in report["status_reason"]
    assert {s["answer"] for s in report["sections"]} == {INSUFFICIENT_RESOLUTION_SECTION}
    assert served_coarse.pipeline.model_calls == calls  # nothing asked a model

    # a good slide on the same server is unaffected
    _, _, _, status, _ = client.predict(served_coarse.slide_id("CMU-1-Small-Region"), api_name="/open_slide")
    assert "88 tiles" in status
