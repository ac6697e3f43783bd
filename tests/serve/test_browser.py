"""The page in a real browser: Debian's chromium driven by Playwright, as a pathologist would use it.

Open the page, pick a slide, see deep-zoom tiles load, pan and zoom, ask and watch the answer stream,
toggle the heatmap and change its opacity, jump to a top tile, stop an answer, draw a region and ask
about it, write the report and download it. Screenshots go to tests/artifacts/serve/ (git-ignored).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import Served, serve_app

from pathchat.inference.notices import RESEARCH_NOTICE

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "serve"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.slow


WORD_DELAY_S = 1.2


@pytest.fixture(scope="module")
def slow_served(tmp_path_factory) -> Iterator[Served]:
    from fake_pipeline import FakePipeline

    # slow enough to watch the answer grow, and to click Stop mid-answer, even on a busy machine (0.6 s a
    # word was too short for the Stop click while the suite ran on both cores)
    yield from serve_app(tmp_path_factory.mktemp("browser"), auth=None, pipeline=FakePipeline(delay_s=WORD_DELAY_S))


@pytest.fixture(scope="module")
def page(slow_served):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}: .ci/run installs it with apt (apt-get install chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1500, "height": 1050}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(90_000)  # generous: a shared machine can be very busy; CI runs alone
        yield pg
        context.close()
        browser.close()


def _viewer(page, expr: str):
    return page.evaluate(f"() => {{ const v = window.pathchat.viewer(); return {expr}; }}")


def test_pathologist_session_in_the_browser(slow_served, page):
    tile_responses: list[tuple[str, int]] = []
    page.on("response", lambda r: tile_responses.append((r.url, r.status)) if "_files/" in r.url else None)
    page.goto(slow_served.url, wait_until="domcontentloaded")
    banner = page.locator("#pathchat-ruo")
    banner.wait_for()
    assert banner.inner_text().strip() == RESEARCH_NOTICE

    # pick a slide: deep-zoom tiles load from the app's route
    page.locator("#pathchat-picker input").click()
    page.get_by_role("option", name="CMU-1-Small-Region", exact=True).click()
    page.wait_for_function("() => Number(document.getElementById('pathchat-viewer').dataset.tilesLoaded || 0) >= 4")
    assert "88 tiles" in page.locator("#pathchat-status").inner_text()
    assert tile_responses and all(status == 200 for _, status in tile_responses)
    assert page.locator("#pathchat-scalebar").inner_text().strip().endswith(("µm", "mm"))

    # zoom in and pan: the viewport changes and deeper tiles load
    zoom0 = _viewer(page, "v.viewport.getZoom()")
    loaded0 = len(tile_responses)
    canvas = page.locator("#pathchat-viewer .openseadragon-canvas").first
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for _ in range(4):
        page.mouse.move(cx, cy)
        page.mouse.wheel(0, -400)
        time.sleep(0.2)
    centre0 = _viewer(page, "v.viewport.getCenter()")
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx - 150, cy - 100, steps=8)
    page.mouse.up()
    time.sleep(1.0)
    zoom1 = _viewer(page, "v.viewport.getZoom()")
    centre1 = _viewer(page, "v.viewport.getCenter()")
    assert zoom1 > 2 * zoom0
    assert abs(centre1["x"] - centre0["x"]) > 1e-3 or abs(centre1["y"] - centre0["y"]) > 1e-3
    assert len(tile_responses) > loaded0
    page.screenshot(path=str(ARTIFACTS / "01-zoomed.png"))

    # ask: the answer streams into the chat
    page.locator("#pathchat-question textarea").fill("Which tissue dominates this slide?")
    # an observer in the page records every text the answer shows, however busy the test process is
    page.evaluate("""() => { window.__seen = [];
        const chat = document.getElementById('pathchat-chat');
        new MutationObserver(() => {
            const bots = chat.querySelectorAll('.message.bot:not(.pending)');
            const t = bots.length ? bots[bots.length - 1].innerText.trim() : '';
            if (t && window.__seen[window.__seen.length - 1] !== t) window.__seen.push(t);
        }).observe(chat, {childList: true, subtree: true, characterData: true}); }""")
    page.locator("#pathchat-ask").click()
    page.wait_for_function("() => window.__seen.includes('Answer 1 about 88 tiles.')")
    seen = page.evaluate("() => window.__seen")
    assert seen[-1] == "Answer 1 about 88 tiles.", seen
    assert any(s.startswith("Answer 1") and s != seen[-1] for s in seen), f"no partial answer seen: {seen}"

    # evidence: the heatmap lies over the slide; toggle it and change its opacity
    page.wait_for_function("() => window.pathchat.viewer().world.getItemCount() === 2")
    page.wait_for_function("() => document.getElementById('pathchat-viewer').dataset.heatmap === 'on'")
    assert abs(_viewer(page, "v.world.getItemAt(1).getOpacity()") - 0.5) < 1e-6
    page.locator("#pathchat-tiles button").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "02-evidence.png"))
    page.locator("#pathchat-heatmap-toggle input").click()
    page.wait_for_function("() => document.getElementById('pathchat-viewer').dataset.heatmap === 'off'")
    assert _viewer(page, "v.world.getItemAt(1).getOpacity()") == 0
    page.locator("#pathchat-heatmap-toggle input").click()
    opacity_box = page.locator("#pathchat-opacity input[type=number]")
    opacity_box.fill("0.8")
    opacity_box.press("Enter")
    page.wait_for_function("() => Math.abs(window.pathchat.viewer().world.getItemAt(1).getOpacity() - 0.8) < 1e-6")

    # the top tile: a click pans the viewer onto it (tile 768,1280 of 256 px)
    page.locator("#pathchat-tiles button").first.click()
    time.sleep(1.5)
    centre = page.evaluate("() => { const v = window.pathchat.viewer(); const c = v.viewport.getCenter();"
                           " return v.world.getItemAt(0).viewportToImageCoordinates(c); }")
    assert abs(centre["x"] - (768 + 128)) < 40 and abs(centre["y"] - (1280 + 128)) < 40, centre

    # stop: a follow-up cancelled mid-answer stays partial, and its answer slot is given back
    page.locator("#pathchat-question textarea").fill("And the margins?")
    page.locator("#pathchat-ask").click()
    page.wait_for_function("() => window.__seen.some(t => t.startsWith('Answer 2'))")
    page.locator("#pathchat-stop").click()
    deadline = time.monotonic() + 30
    while slow_served.service._slots._value != 2 and time.monotonic() < deadline:  # concurrency 2
        time.sleep(0.2)
    assert slow_served.service._slots._value == 2
    time.sleep(4 * WORD_DELAY_S)  # longer than the rest of the answer would have taken
    assert "Answer 2 about 88 tiles." not in page.evaluate("() => window.__seen")

    # ask about a region: draw a rectangle, ask, the rectangle stays with its answer
    page.locator("#pathchat-draw").click()
    page.wait_for_function("() => document.getElementById('pathchat-viewer').classList.contains('pathchat-drawing')")
    box = canvas.bounding_box()
    x0, y0 = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + box["width"] * 0.35, y0 + box["height"] * 0.35, steps=10)
    page.mouse.up()
    region = page.evaluate("() => window.pathchat.region()")
    x, y, w, h = (int(v) for v in region.split(","))
    assert w > 50 and h > 50
    page.locator("#pathchat-question textarea").fill("What is in this region?")
    page.locator("#pathchat-ask-region").click()
    page.wait_for_function("() => document.querySelector('.pathchat-region-label') !== null")
    label = page.locator(".pathchat-region-label").first.inner_text()
    assert label.startswith("Answer 1 about ") and label.endswith(" tiles.")
    assert page.locator(".pathchat-region").count() == 1
    asked = [t for t in page.locator("#pathchat-chat").inner_text().splitlines() if t.startswith("[region")]
    assert asked and f"{w}x{h} px" in asked[-1]
    page.screenshot(path=str(ARTIFACTS / "03-region.png"))

    # one click writes the report; download the Markdown
    page.locator("#pathchat-report").click()
    page.wait_for_function("() => document.querySelector('#pathchat-report-status')?.innerText.includes('Report written')")
    row = page.locator("#pathchat-report-files tr", has=page.locator("td[aria-label='CMU-1-Small-Region.md']"))
    link = row.locator("a").first
    with page.expect_download() as download_info:
        link.click()
    saved = ARTIFACTS / "CMU-1-Small-Region.md"
    download_info.value.save_as(saved)
    text = saved.read_text()
    assert RESEARCH_NOTICE in text and "Report answer to:" in text
    page.screenshot(path=str(ARTIFACTS / "04-report.png"), full_page=True)
