"""The web UI through its API (`gradio_client`), as a script or another program would drive it."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathchat.inference.notices import NO_SLIDE_ANSWER, RESEARCH_NOTICE

pytest.importorskip("gradio_client")


def _client(served):
    from gradio_client import Client

    return Client(served.url, verbose=False, download_files=False)


def _text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def test_pick_slide_ask_streams_text_and_relevance(served):
    client = _client(served)
    listed = client.predict(api_name="/list_slides")
    names = [label for label, _ in listed["choices"]]
    assert names == ["CMU-1-Small-Region", "small"]  # the symlink out of the folder is not listed
    sid = served.slide_id("CMU-1-Small-Region")
    chat, spec, evidence, status, tiles = client.predict(sid, api_name="/open_slide")
    assert chat == [] and evidence == "" and tiles == ""
    spec = json.loads(spec)
    assert spec == {"slide_id": sid, "dzi": f"slides/{sid}.dzi", "mpp": 0.499, "width": 2220, "height": 2967}
    assert "CMU-1-Small-Region" in status and "88 tiles" in status  # 8 x 11 tiles of 256 px

    calls = served.pipeline.model_calls
    job = client.submit("What tissue is this?", [], api_name="/ask")
    partial = [_text(out[0][-1]) for out in job]
    final_chat, evidence_json, tiles_html, cleared = job.result()
    assert served.pipeline.model_calls == calls + 1
    assert _text(final_chat[-1]) == "Answer 1 about 88 tiles."
    # streamed: the answer grew word by word before it was complete
    assert {"Answer 1", "Answer 1 about", "Answer 1 about 88"} <= set(partial)
    assert cleared == ""

    evidence = json.loads(evidence_json)
    png = base64.b64decode(evidence["heatmap"].split(",", 1)[1])
    heat = np.asarray(Image.open(io.BytesIO(png)))
    assert heat.shape[2] == 4 and heat[..., 3].max() == 255  # RGBA, opaque where tiles lie
    assert evidence["heatmap_rect"][:2] == [0.0, 0.0]
    tops = evidence["top_tiles"]
    assert [t["rank"] for t in tops] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(tops, tops[1:], strict=False))
    # the fake relevance peaks at the tiles nearest the grid's centre (896, 1280): four tie, tile order kept
    assert tops[0]["rect"] == [768, 1280, 256, 256] and tops[1]["rect"] == [1024, 1280, 256, 256]
    assert 'data-pathchat-rect="768,1280,256,256"' in tiles_html

    # a follow-up goes to the same session (its KV cache): the fake numbers its turns
    follow = client.predict("And the margins?", final_chat, api_name="/ask")
    assert _text(follow[0][-1]) == "Answer 2 about 88 tiles."
    assert len(follow[0]) == 4


def test_without_a_slide_the_answer_is_the_refusal_and_no_model_runs(served):
    client = _client(served)
    calls = served.pipeline.model_calls
    chat, evidence, tiles, _ = client.predict("Is this malignant?", [], api_name="/ask")
    assert _text(chat[-1]) == NO_SLIDE_ANSWER
    assert evidence == "" and tiles == ""
    region_chat = client.predict("Here?", [], "0,0,100,100", api_name="/ask_region")[0]
    assert _text(region_chat[-1]) == NO_SLIDE_ANSWER
    report_files, report_status = client.predict(api_name="/report")
    assert report_files is None and report_status == NO_SLIDE_ANSWER
    assert served.pipeline.model_calls == calls


def test_switching_slides_starts_a_new_conversation(served):
    client = _client(served)
    client.predict(served.slide_id("CMU-1-Small-Region"), api_name="/open_slide")
    chat = client.predict("First?", [], api_name="/ask")[0]
    assert _text(chat[-1]).startswith("Answer 1")
    opened = client.predict(served.slide_id("small"), api_name="/open_slide")
    assert opened[0] == [] and "small" in opened[3]
    chat = client.predict("Second?", [], api_name="/ask")[0]
    assert _text(chat[-1]) == "Answer 1 about 1 tiles."  # a 16 x 16 slide: one tile, a fresh session


def test_each_browser_session_has_its_own_conversation(served):
    a, b = _client(served), _client(served)
    a.predict(served.slide_id("CMU-1-Small-Region"), api_name="/open_slide")
    assert _text(a.predict("q", [], api_name="/ask")[0][-1]).startswith("Answer 1")
    assert _text(b.predict("q", [], api_name="/ask")[0][-1]) == NO_SLIDE_ANSWER
    assert _text(a.predict("q", [], api_name="/ask")[0][-1]).startswith("Answer 2")


def test_region_question_uses_only_the_tiles_inside(served):
    client = _client(served)
    client.predict(served.slide_id("CMU-1-Small-Region"), api_name="/open_slide")
    chat, evidence_json, _, _ = client.predict("What is here?", [], "0,0,600,600", api_name="/ask_region")
    # tiles whose 256-px square meets [0, 600) x [0, 600): columns and rows 0, 256, 512 -> 9 tiles
    assert _text(chat[-1]) == "Answer 1 about 9 tiles."
    assert _text(chat[-2]).startswith("[region 0,0 600x600 px]")
    evidence = json.loads(evidence_json)
    assert evidence["region"] == [0, 0, 600, 600] and evidence["answer"] == "Answer 1 about 9 tiles."
    assert {tuple(t["rect"][:2]) for t in evidence["top_tiles"]} <= {(x, y) for x in (0, 256, 512) for y in (0, 256, 512)}
    # no rectangle drawn: the UI asks for one instead of answering about the whole slide
    chat = client.predict("And here?", [], "", api_name="/ask_region")[0]
    assert _text(chat[-1]).startswith("Draw a rectangle")
    # the whole-slide conversation is untouched by region questions
    assert _text(client.predict("Whole slide?", [], api_name="/ask")[0][-1]) == "Answer 1 about 88 tiles."


def test_report_written_and_downloadable(served, tmp_path):
    from gradio_client import Client

    client = Client(served.url, verbose=False, download_files=str(tmp_path))
    client.predict(served.slide_id("CMU-1-Small-Region"), api_name="/open_slide")
    files, status = client.predict(api_name="/report")
    assert status == "Report written (4 files)."
    names = sorted(Path(f).name for f in files)
    assert names == ["CMU-1-Small-Region.evidence.geojson", "CMU-1-Small-Region.heatmap.png",
                     "CMU-1-Small-Region.json", "CMU-1-Small-Region.md"]
    by_name = {Path(f).name: Path(f) for f in files}
    report = json.loads(by_name["CMU-1-Small-Region.json"].read_text())
    assert report["notice"] == RESEARCH_NOTICE
    assert "Report answer to:" in by_name["CMU-1-Small-Region.md"].read_text()
    assert Image.open(by_name["CMU-1-Small-Region.heatmap.png"]).size[0] > 100
    # written inside the app's own data folder
    assert all(p.is_relative_to(served.app.state.service.reports_dir) for p in served.service.reports_dir.glob("*/*"))


def test_deep_zoom_routes(served):
    import httpx

    sid = served.slide_id("CMU-1-Small-Region")
    with httpx.Client(base_url=served.url) as http:
        dzi = http.get(f"slides/{sid}.dzi")
        assert dzi.status_code == 200 and 'Width="2220"' in dzi.text and 'Height="2967"' in dzi.text
        assert 'TileSize="254"' in dzi.text and 'Overlap="1"' in dzi.text
        top = http.get(f"slides/{sid}_files/12/0_0.jpeg")
        assert top.status_code == 200 and top.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(top.content)).size == (255, 255)  # first tile: 254 + 1 overlap
        # 2220 x 2967 px in 254-px tiles: 9 columns, 12 rows
        last = http.get(f"slides/{sid}_files/12/8_11.jpeg")
        assert last.status_code == 200
        assert Image.open(io.BytesIO(last.content)).size == (2220 - 8 * 254 + 1, 2967 - 11 * 254 + 1)
        assert http.get(f"slides/{sid}_files/12/9_0.jpeg").status_code == 404
        assert http.get(f"slides/{sid}_files/12/8_12.jpeg").status_code == 404
        assert http.get(f"slides/{sid}_files/13/0_0.jpeg").status_code == 404
        # the page's own assets, served by the app
        assert http.get("viewer-assets/osd/openseadragon.min.js").status_code == 200
        assert http.get("viewer-assets/app/viewer.js").status_code == 200
        page = http.get("")
        assert page.status_code == 200 and "viewer-assets/osd/openseadragon.min.js" in page.text


def test_upload_checked_with_openslide(served, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(served.url, verbose=False)
    fake = tmp_path / "fake.svs"
    fake.write_text("not a slide at all")
    choices, status = client.predict(handle_file(str(fake)), api_name="/upload")
    assert status.startswith("Upload refused: fake.svs: not a readable slide")
    assert not any(served.service.catalog.uploads_dir.rglob("fake.svs"))  # not kept
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "not an accepted single-file slide format" in client.predict(handle_file(str(text)), api_name="/upload")[1]
    good = tmp_path / "tiny-upload.svs"
    good.write_bytes((served.slides_dir / "small.svs").read_bytes())
    choices, status = client.predict(handle_file(str(good)), api_name="/upload")
    assert status == "Uploaded tiny-upload."
    labels = [label for label, _ in choices["choices"]]
    assert "tiny-upload (uploaded)" in labels
    kept = list(served.service.catalog.uploads_dir.rglob("tiny-upload.svs"))
    assert len(kept) == 1 and kept[0].read_bytes() == good.read_bytes()
