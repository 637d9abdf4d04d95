"""The web page in a real browser: Debian's Chromium driven by Playwright against a server this
test starts on 127.0.0.1. Type a query, see results, click one, upload and drop an image,
generate with progress, and no console errors (a blocked external resource would be one)."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from duomodal.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)",
    ),
]


@pytest.fixture
def server_url(fake_index, fake_clip, fake_generator):
    fake_generator.seconds_per_image = 0.15  # slow enough to see the progress bar move
    app = create_app(fake_index, fake_clip, fake_generator)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.set_default_timeout(10_000)
        page.problems = []
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        yield page
        browser.close()


def card_titles(page, grid: str) -> list[str]:
    return page.eval_on_selector_all(f"{grid} figure", "cards => cards.map(c => c.title)")


def test_search_click_upload_drop_and_generate(server_url, page, shape_dataset, tmp_path):
    page.goto(server_url)
    page.wait_for_function(
        "() => document.querySelector('#server-status').textContent.includes('24 images')")
    assert page.is_hidden("#panel-generate") and page.is_visible("#tab-generate")

    # Type a query, see results best first, with scores on hover (title) and loaded thumbnails.
    page.fill("#query", "red circle")
    page.press("#query", "Enter")
    page.wait_for_selector("#results figure")
    titles = card_titles(page, "#results")
    assert len(titles) == 24
    assert titles[0].startswith("score 1.000 · red_circle_0.png") and "red_circle_1.png" in titles[1]
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].slice(0, 4).every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.inner_text("#search-info").startswith("24 results for “red circle”")
    page.screenshot(path=str(tmp_path / "results.png"))

    # Click a result: more like it, itself left out, its twin first.
    page.click("#results figure >> nth=0")
    page.wait_for_function(
        "() => document.querySelector('#search-info').textContent.includes('image red_circle_0.png')")
    titles = card_titles(page, "#results")
    assert "red_circle_1.png" in titles[0] and not any("red_circle_0.png" in t for t in titles)
    assert page.inner_text("#search-query") == "More like red_circle_0.png"

    # Upload an image with the file picker.
    page.set_input_files("#file-input", str(shape_dataset / "yellow_triangle_0.png"))
    page.wait_for_function(
        "() => document.querySelector('#search-info').textContent.includes('yellow_triangle_0.png')")
    assert all("yellow_triangle" in t for t in card_titles(page, "#results")[:2])

    # Drop an image on the page.
    data = base64.b64encode((shape_dataset / "green_square_1.png").read_bytes()).decode()
    transfer = page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            return dt;
        }""",
        data,
    )
    page.dispatch_event("main", "dragenter", {"dataTransfer": transfer})
    assert page.is_visible("#drop-overlay")
    page.dispatch_event("main", "drop", {"dataTransfer": transfer})
    page.wait_for_function(
        "() => document.querySelector('#search-info').textContent.includes('dropped.png')")
    assert page.is_hidden("#drop-overlay")
    assert all("green_square" in t for t in card_titles(page, "#results")[:2])

    # A query the server refuses shows its message.
    page.fill("#query", "-red")
    page.press("#query", "Enter")
    page.wait_for_selector("#search-error:not([hidden])")
    assert page.inner_text("#search-error") == (
        "query '-red' has only negative terms; add a positive one, e.g. 'beach -people'"
    )

    # Generate: progress while it runs, then the kept images with their CLIP scores, best first.
    page.click("#tab-generate")
    assert page.is_visible("#panel-generate") and page.is_hidden("#panel-search")
    page.fill("#prompt", "a green square")
    page.fill("#num", "6")
    page.fill("#keep", "3")
    page.fill("#guidance", "2")
    page.click("#generate-button")
    page.wait_for_function(
        "() => document.querySelector('#progress-text').textContent.startsWith('Generating · ')")
    assert page.is_disabled("#generate-button")
    page.wait_for_selector("#generated figure")
    assert page.inner_text("#progress-text") == "Done · 6/6"
    titles = card_titles(page, "#generated")
    assert len(titles) == 3 and all("CLIP " in t for t in titles)
    scores = [float(t.split("CLIP ")[1]) for t in titles]
    assert scores == sorted(scores, reverse=True)
    assert page.is_enabled("#generate-button")

    # The refused query's 400 is the only failed load; no CSP violation, no script error.
    assert page.problems == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
