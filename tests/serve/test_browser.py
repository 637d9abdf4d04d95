"""The web page in a real browser: Debian's Chromium driven by Playwright against a server this
test starts on 127.0.0.1. Type a query, see results, click one, upload and drop an image,
generate with progress, and no console errors (a blocked external resource would be one)."""

from __future__ import annotations

import base64
import time
import urllib.parse
from pathlib import Path

import pytest

from duomodal.serve.app import create_app

from .conftest import CHROMIUM

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)",
    ),
]


@pytest.fixture
def server_url(fake_index, fake_clip, fake_generator, serving):
    fake_generator.seconds_per_image = 0.15  # slow enough to see the progress bar move
    with serving(create_app(fake_index, fake_clip, fake_generator)) as url:
        yield url


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
        "query: query '-red' has only negative terms; add a positive one, e.g. 'beach -people'"
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
        "() => document.querySelector('#generate-progress-text').textContent.startsWith('Generating · ')")
    assert page.is_disabled("#generate-button")
    page.wait_for_selector("#generate-previews img")  # partial images while it samples
    page.wait_for_selector("#generated figure")
    assert page.inner_text("#generate-progress-text") == "Done · 6/6" and page.is_hidden("#generate-previews")
    titles = card_titles(page, "#generated")
    assert len(titles) == 3 and all("CLIP " in t for t in titles)
    scores = [float(t.split("CLIP ")[1].split(" ")[0]) for t in titles]
    assert scores == sorted(scores, reverse=True)
    assert page.is_enabled("#generate-button")

    # Compare: the sampling order beside the reranked one, each with its rank and score.
    assert page.is_hidden("#generated-samples")
    page.check("#compare-toggle")
    sampled = card_titles(page, "#generated-sampled")
    assert [t.split(" · ")[0] for t in sampled] == [f"sample {n}" for n in range(1, 7)]
    ranks = sorted(int(t.split(" · ")[1].removeprefix("rank ")) for t in sampled)
    assert ranks == list(range(1, 7))

    # The kept images are in the gallery, with a link that makes each one again.
    page.wait_for_function("() => document.querySelector('#gallery-count').textContent === '3'")
    page.click("#tab-gallery")
    links = page.eval_on_selector_all("#gallery a.again", "links => links.map(a => a.href)")
    made = [dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(a).fragment)) for a in links]  # in any order
    assert len(links) == 3 and all(list(m)[:2] == ["generate", "prompt"] and m["prompt"] == "a green square" and
                                   (m["generate"], m["num"], m["keep"], m["guidance"]) == ("1", "1", "1", "2")
                                   for m in made)
    seed = links[0].split("&seed=")[1].split("&")[0]
    page.goto(links[0])
    page.wait_for_function("() => document.querySelectorAll('#generated figure').length === 1")
    assert page.input_value("#prompt") == "a green square" and page.input_value("#num") == "1"
    assert card_titles(page, "#generated")[0].endswith(f" · seed {seed}")

    # The refused query's 422 is the only failed load; no CSP violation, no script error.
    assert page.problems == ["Failed to load resource: the server responded with a status of 422 (Unprocessable Entity)"]


# --- the studio over a tiny real DALL-E ---------------------------------------------------------

ROW_SECONDS = 0.3  # each sampled token row takes this long, so previews and cancelling can be seen


@pytest.fixture
def studio_url(fake_index, fake_clip, dalle_run, monkeypatch, serving):
    from duomodal.models.dalle import load_dalle
    from duomodal.serve import generator as generator_module

    original = generator_module._Previews.__call__

    def slow_rows(self, tokens, first, rows):
        time.sleep(ROW_SECONDS)
        original(self, tokens, first, rows)

    monkeypatch.setattr(generator_module._Previews, "__call__", slow_rows)
    generator = generator_module.DalleGenerator(load_dalle(dalle_run, device="cpu"), scorer=fake_clip, max_num=8,
                                                batch_size=4)
    with serving(create_app(fake_index, fake_clip, generator)) as url:
        yield url


# Pixels of two images (URLs of this page) compared in the page: how many differ inside the box
# (x0, y0, x1, y1) and how many outside it.
COMPARE_IMAGES = """async ([a, b, box]) => {
    const load = (url) => new Promise((ok, fail) => { const i = new Image(); i.onload = () => ok(i); i.onerror = fail; i.src = url; });
    const pixels = (image) => {
        const canvas = document.createElement("canvas");
        canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
        const context = canvas.getContext("2d");
        context.drawImage(image, 0, 0);
        return context.getImageData(0, 0, canvas.width, canvas.height);
    };
    const [pa, pb] = [pixels(await load(a)), pixels(await load(b))];
    let inside = 0, outside = 0;
    for (let y = 0; y < pa.height; y++) for (let x = 0; x < pa.width; x++) {
        const k = 4 * (y * pa.width + x);
        const differs = [0, 1, 2].some((c) => pa.data[k + c] !== pb.data[k + c]);
        const inBox = x >= box[0] && x < box[2] && y >= box[1] && y < box[3];
        if (differs) { if (inBox) inside++; else outside++; }
    }
    return {inside, outside, size: [pa.width, pa.height]};
}"""


def test_studio_edit_undo_complete_preview_cancel(studio_url, page, shape_dataset):
    page.goto(studio_url)
    page.wait_for_function("() => !document.querySelector('#tab-studio').hidden")

    # Open a search result in the studio.
    page.fill("#query", "blue square")
    page.press("#query", "Enter")
    page.wait_for_selector("#results figure")
    source_id = page.get_attribute("#results figure >> nth=0", "data-id")
    page.hover("#results figure >> nth=0")
    page.click("#results figure >> nth=0 >> button[title='edit this image in the studio']")
    page.wait_for_selector("#studio-history figure")
    assert page.is_visible("#panel-studio") and page.is_hidden("#studio-empty")

    # Draw a box with real mouse events: from cell (1, 1) to cell (2, 2) of the 4x4 token grid.
    canvas = page.locator("#studio-canvas").bounding_box()
    cell = canvas["width"] / 4
    page.mouse.move(canvas["x"] + 1.4 * cell, canvas["y"] + 1.6 * cell)
    page.mouse.down()
    page.mouse.move(canvas["x"] + 2.5 * cell, canvas["y"] + 2.3 * cell, steps=6)
    page.mouse.up()
    expected = "Redraw 4 of 16 tokens: columns 2–3, rows 2–3 (pixels 4,4 to 12,12)"
    assert page.inner_text("#studio-selection") == expected
    page.keyboard.press("ArrowRight")  # the keyboard moves it...
    assert page.inner_text("#studio-selection").startswith("Redraw 4 of 16 tokens: columns 3–4, rows 2–3")
    page.keyboard.press("Shift+ArrowDown")  # ...and resizes it
    assert page.inner_text("#studio-selection").startswith("Redraw 6 of 16 tokens: columns 3–4, rows 2–4")
    page.keyboard.press("Shift+ArrowUp")
    page.keyboard.press("ArrowLeft")
    assert page.inner_text("#studio-selection") == expected

    # The sampling controls take their defaults from the server; min-p is off until given.
    assert page.input_value("#studio-guidance") == "3" and page.input_value("#studio-min-p") == ""
    page.fill("#studio-min-p", "0.05")

    # Edit: two candidates, reranked; keep the best; only the box changed.
    page.fill("#studio-prompt", "a red circle")
    page.fill("#studio-num", "2")
    page.fill("#studio-keep", "2")
    page.click("#studio-run")
    page.wait_for_selector("#studio-candidates figure", timeout=30_000)
    assert page.locator("#studio-candidates figure").count() == 2
    page.click("#studio-candidates figure >> nth=0")
    page.wait_for_function("() => document.querySelectorAll('#studio-history figure').length === 2")
    steps = page.eval_on_selector_all("#studio-history img", "images => images.map(i => i.src)")
    diff = page.evaluate(COMPARE_IMAGES, [steps[0], steps[1], [4, 4, 12, 12]])
    assert diff["size"] == [16, 16] and diff["outside"] == 0 and diff["inside"] > 0, diff
    assert page.is_enabled("#studio-undo")

    # The kept edit is in the gallery, with a link that makes it again from the indexed image.
    page.wait_for_function("() => document.querySelector('#gallery-count').textContent === '1'")
    link = page.get_attribute("#gallery .gallery-card a.again", "href")
    assert "#edit=1&prompt=a+red+circle" in link and "box=4%2C4%2C12%2C12" in link
    assert "min_p=0.05" in link  # the page sent the studio's min-p, and the job echoes it
    assert link.endswith(f"&src={source_id}")

    # Undo: back to the original.
    page.click("#studio-undo")
    assert page.locator("#studio-history figure").count() == 1 and page.is_disabled("#studio-undo")

    # Complete: drag the line from row 2 up to row 1; partial previews come before the candidates.
    page.click("#mode-complete")
    page.mouse.move(canvas["x"] + 2 * cell, canvas["y"] + 2 * cell)
    page.mouse.down()
    page.mouse.move(canvas["x"] + 2 * cell, canvas["y"] + 1.1 * cell, steps=4)
    page.mouse.up()
    assert page.inner_text("#studio-selection") == (
        "Keep the top 1 of 4 token rows (4 px); the model draws the other 3.")
    page.fill("#studio-num", "2")
    page.click("#studio-run")
    page.wait_for_function(
        """() => [...document.querySelectorAll('#studio-previews img')].some(i => i.complete && i.naturalWidth > 0)
                 && document.querySelectorAll('#studio-candidates figure').length === 0""", timeout=20_000)
    assert page.inner_text("#studio-progress-text").startswith("Generating")
    page.wait_for_selector("#studio-candidates figure", timeout=30_000)
    assert page.is_hidden("#studio-previews") and page.inner_text("#studio-progress-text") == "Done · 2/2"
    page.click("#studio-candidates figure >> nth=0")
    page.wait_for_function("() => document.querySelectorAll('#studio-history figure').length === 2")
    steps = page.eval_on_selector_all("#studio-history img", "images => images.map(i => i.src)")
    diff = page.evaluate(COMPARE_IMAGES, [steps[0], steps[1], [0, 4, 16, 16]])
    assert diff["outside"] == 0 and diff["inside"] > 0, diff

    # Cancel a running job from the page (a completion of the whole image: 2 batches x 3 slow rows).
    page.focus("#studio-canvas")
    page.keyboard.press("ArrowUp")
    assert page.inner_text("#studio-selection").startswith("Keep the top 0 of 4 token rows")
    page.fill("#studio-num", "8")
    page.click("#studio-run")
    page.wait_for_selector("#studio-cancel:not([hidden])")
    page.click("#studio-cancel")
    page.wait_for_function("() => document.querySelector('#studio-progress-text').textContent === 'Cancelled · 0/8'"
                           " || document.querySelector('#studio-progress-text').textContent.startsWith('Cancelled')",
                           timeout=20_000)
    assert page.locator("#studio-candidates figure").count() == 0 and page.is_hidden("#studio-cancel")
    assert page.is_enabled("#studio-run")
    page.click("#tab-gallery")
    assert page.locator("#gallery .gallery-card").count() == 2

    # The edit's link opens the indexed image in the studio with the box and prompt, and runs it.
    page.goto(link)
    page.wait_for_selector("#studio-candidates figure", timeout=30_000)
    assert page.input_value("#studio-prompt") == "a red circle" and page.input_value("#studio-num") == "1"
    assert page.inner_text("#studio-selection") == expected
    assert page.locator("#studio-history figure").count() == 1

    # Open an upload, then a gallery item, in the studio.
    page.set_input_files("#studio-file", str(shape_dataset / "green_circle_0.png"))
    page.wait_for_function("() => document.querySelector('#studio-history img').src.startsWith('blob:')"
                           " && document.querySelectorAll('#studio-candidates figure').length === 0")
    first = page.get_attribute("#studio-history img", "src")
    page.click("#tab-gallery")
    page.click("#gallery .gallery-card >> nth=0 >> button[title='edit this image in the studio']")
    page.wait_for_function(f"() => document.querySelector('#studio-history img').src !== '{first}'")
    assert page.is_visible("#panel-studio") and page.locator("#studio-history figure").count() == 1
    assert page.problems == []
