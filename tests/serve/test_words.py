"""REST text search in an index with words (--ocr): the words found and why each image matched,
agreeing with `duomodal search --json` on the same query."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from duomodal import cli
from duomodal.cli import search as cli_search
from duomodal.data.images import load_image
from duomodal.data.memes import write_corpus
from duomodal.search.build import build_index
from duomodal.search.index import ImageIndex
from duomodal.serve.app import create_app

from ..search.conftest import FakeEmbedder
from ..search.test_text_index import FakeOcr
from .conftest import CHROMIUM

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def word_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    memes = write_corpus(root / "memes", 6, seed=11, textless=1)
    texts = {FakeOcr.key(load_image(root / "memes" / m.file)): m.text for m in memes}
    build_index(root / "memes", root / "idx", FakeEmbedder(), progress=False, ocr=FakeOcr(texts))
    return root / "idx", memes


def test_rest_search_shows_words_and_why_and_agrees_with_the_cli(word_index, tmp_path, monkeypatch, capsys):
    index_dir, memes = word_index
    target = next(m for m in memes if m.phrase)
    with ImageIndex.open(index_dir) as index:
        client = TestClient(create_app(index, FakeEmbedder()), base_url="http://localhost")
        response = client.get("/api/search", params={"q": target.phrase, "k": 4})
        assert response.status_code == 200, response.text
        body = response.json()
        best = body["results"][0]
        assert best["path"] == target.file and best["words"] == target.text
        assert best["match"]["text_rank"] == 1 and set(best["match"]["matched_words"]) == set(target.phrase.split())
        assert best["match"]["why"].startswith("words ")
        posted = client.post("/api/search", json={"query": f'"{target.phrase}"', "k": 4}).json()
        assert [r["path"] for r in posted["results"]] == [target.file]
        pictures = client.post("/api/search", json={"query": target.phrase, "k": 4, "text_weight": 0}).json()
        assert all(r["match"] is None and r["words"] is None for r in pictures["results"])
        bad = client.post("/api/search", json={"query": '"open quote', "k": 4})
        assert bad.status_code == 400 and "unpaired" in bad.json()["detail"]
        assert client.get("/api/search", params={"q": "x", "text_weight": 101}).status_code == 422

    monkeypatch.setattr(cli_search, "_search_load_clip", lambda path, device, precision: FakeEmbedder())
    assert cli.main(["search", str(index_dir), target.phrase, "-k", "4", "--json", "--clip", str(tmp_path)]) == 0
    from_cli = json.loads(capsys.readouterr().out)["results"]
    assert [r["path"] for r in from_cli] == [r["path"] for r in body["results"]]
    assert [r["why"] for r in from_cli] == [r["match"]["why"] for r in body["results"]]


def test_rest_filters_agree_with_the_cli(word_index, tmp_path, monkeypatch, capsys):
    index_dir, memes = word_index
    folder = memes[0].file.rsplit("/", 1)[0]
    with ImageIndex.open(index_dir) as index:
        client = TestClient(create_app(index, FakeEmbedder()), base_url="http://localhost")
        got = client.get("/api/search", params={"q": "monday", "k": 10, "format": ["png"], "folder": folder,
                                                "sort": "date", "text_weight": 0})
        assert got.status_code == 200, got.text
        posted = client.post("/api/search", json={"query": "monday", "k": 10, "format": ["png"], "folder": folder,
                                                  "sort": "date", "text_weight": 0}).json()
        assert [r["path"] for r in got.json()["results"]] == [r["path"] for r in posted["results"]]
        assert posted["results"] and all(r["path"].endswith(".png") for r in posted["results"])
        hybrid = client.post("/api/search", json={"query": "monday", "k": 10, "format": ["jpeg"]}).json()
        assert all(r["path"].endswith(".jpg") for r in hybrid["results"])
        bad = client.get("/api/search", params={"q": "x", "after": "yesterday", "min_size": "big"})
        assert bad.status_code == 422 and "after" in bad.json()["detail"] and "min_size" in bad.json()["detail"]
        far = client.get("/api/search", params={"q": "x", "after": "9999-12-31", "text_weight": 0})
        assert far.status_code == 200 and far.json()["results"] == []
    monkeypatch.setattr(cli_search, "_search_load_clip", lambda path, device, precision: FakeEmbedder())
    for weight, body in (("0", posted), ("1", hybrid)):
        options = ["--format", "png", "--folder", folder, "--sort", "date"] if weight == "0" else ["--format", "jpeg"]
        assert cli.main(["search", str(index_dir), "monday", "-k", "10", "--json", "--clip", str(tmp_path),
                         "--text-weight", weight, *options]) == 0
        assert [r["path"] for r in json.loads(capsys.readouterr().out)["results"]] == [r["path"] for r in body["results"]]


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium")
def test_page_shows_the_words_found_and_filters(word_index, serving, page):
    index_dir, memes = word_index
    target = next(m for m in memes if m.phrase)
    with ImageIndex.open(index_dir) as index, serving(create_app(index, FakeEmbedder())) as url:
        page.goto(url)
        page.fill("#query", target.phrase)
        page.press("#query", "Enter")
        page.wait_for_selector("#results figure .match")
        first = page.locator("#results figure >> nth=0")
        assert first.locator(".match").inner_text().split() == target.text.split()
        bold = first.locator(".match strong").all_inner_texts()
        assert {w.strip().lower() for w in bold} >= set(target.phrase.split())
        assert first.locator(".match").get_attribute("title").startswith("words ")

        page.click("#search-filters summary")
        page.select_option("#filter-format", "jpeg")
        page.press("#query", "Enter")
        page.wait_for_function("() => [...document.querySelectorAll('#results figure')].every("
                               "f => f.title.includes('.jpg'))")
        assert page.problems == []
