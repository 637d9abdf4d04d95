"""`duomodal serve` as a user starts it, over real parts: a tiny (untrained) duomodal CLIP, an index
built by the search library, and a tiny DALL-E run; the app the command would serve is tested
in-process."""

from __future__ import annotations

import io

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from duomodal import cli
from duomodal.config import to_dict
from duomodal.modelfile import save_model
from duomodal.models.clip import ClipConfig, ContrastiveClip, load_clip
from duomodal.search.build import build_index
from duomodal.text.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)

TINY_CLIP = ClipConfig(
    image_size=16,
    patch_size=4,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    text_width=32,
    text_layers=2,
    text_heads=2,
    context_length=16,
    vocab_size=64,
    embed_dim=32,
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, shape_dataset):
    torch.manual_seed(0)
    captions = [p.read_text() for p in sorted(shape_dataset.glob("*.txt"))]
    tokenizer = Tokenizer.train(captions, vocab_size=64, min_frequency=1)
    config = ClipConfig(**{**to_dict(TINY_CLIP), "vocab_size": tokenizer.vocab_size})
    directory = tmp_path_factory.mktemp("clip")
    save_model(directory, "clip", to_dict(config), ContrastiveClip.from_config(config).state_dict())
    tokenizer.save(directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, shape_dataset, clip_dir):
    directory = tmp_path_factory.mktemp("index") / "idx"
    build_index(shape_dataset, directory, load_clip(clip_dir, device="cpu"), clip_path=clip_dir, progress=False)
    return directory


@pytest.fixture
def served(monkeypatch):
    """Run `duomodal serve ...` up to the point of serving; returns the app it would serve."""
    started = {}
    monkeypatch.setattr(cli, "_serve_run", lambda app, host, port: started.update(app=app, host=host, port=port))

    def serve(*args: str):
        status = cli.main(["serve", *args])
        return status, started

    return serve


def test_serve_searches_a_real_index_with_the_recorded_clip(served, index_dir, shape_dataset, capsys):
    status, started = served("--index", str(index_dir), "--device", "cpu", "--port", "8123")
    assert status == 0
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    assert capsys.readouterr().err == "duomodal: serving 24 images at http://127.0.0.1:8123/ (Ctrl+C stops)\n"
    with TestClient(started["app"]) as client:
        health = client.get("/health").json()
        assert health["images"] == 24 and health["dim"] == 32 and health["generation"] is False
        assert health["clip_model_id"].startswith("duomodal-clip:")
        body = client.get("/api/search", params={"q": "a red circle", "k": 5}).json()
        assert len(body["results"]) == 5
        scores = [hit["score"] for hit in body["results"]]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0001 for s in scores)
        first = body["results"][0]
        original = client.get(first["image_url"])
        assert original.content == (shape_dataset / first["path"]).read_bytes()
        assert Image.open(io.BytesIO(client.get(first["thumb_url"]).content)).size == (64, 64)
        # An image is its own nearest neighbour: uploading a file finds it first (score ~1).
        data = (shape_dataset / "green_triangle_1.png").read_bytes()
        by_image = client.post("/api/search/image", files={"file": ("q.png", data, "image/png")}).json()
        assert by_image["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert by_image["results"][0]["path"] in ("green_triangle_0.png", "green_triangle_1.png")
        similar = client.get(f"/api/similar/{first['id']}", params={"k": 3}).json()
        assert first["id"] not in [hit["id"] for hit in similar["results"]]


def test_serve_errors_are_one_line_and_exit_2(served, index_dir, tmp_path, capsys):
    assert served("--index", str(index_dir), "--port", "0")[0] == 2
    assert capsys.readouterr().err == "duomodal: error: --port must be from 1 to 65535, got 0\n"
    assert served("--index", str(tmp_path / "nothing"))[0] == 2
    assert capsys.readouterr().err == (
        f"duomodal: error: {tmp_path / 'nothing'} is not a directory; build one with 'duomodal index build'\n"
    )
