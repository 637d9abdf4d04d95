"""`duomodal serve` as a user starts it, over real parts: a tiny (untrained) duomodal CLIP, an index
built by the search library, and a tiny DALL-E run; the app the command would serve is tested
in-process."""

from __future__ import annotations

import io
import time
from dataclasses import replace

import faiss
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from duomodal import cli
from duomodal.cli import serve as cli_serve
from duomodal.config import to_dict
from duomodal.modelfile import save_model
from duomodal.models.clip import ContrastiveClip, load_clip
from duomodal.search.build import BuildOptions, build_index
from duomodal.text.tokenizer import Tokenizer

from ..conftest import VECTOR_STORES, store_spec

pytestmark = pytest.mark.timeout(60)

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, shape_dataset, tiny_clip_config):
    torch.manual_seed(0)
    captions = [p.read_text() for p in sorted(shape_dataset.glob("*.txt"))]
    tokenizer = Tokenizer.train(captions, vocab_size=64, min_frequency=1)
    config = replace(tiny_clip_config, vocab_size=tokenizer.vocab_size)
    directory = tmp_path_factory.mktemp("clip")
    save_model(directory, "clip", to_dict(config), ContrastiveClip.from_config(config).state_dict())
    tokenizer.save(directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module", params=VECTOR_STORES)
def index_dir(request, tmp_path_factory, shape_dataset, clip_dir):
    """The same index in each vector store (the serve tests run on each)."""
    directory = tmp_path_factory.mktemp("index") / "idx"
    store, drop = store_spec(request, request.param, directory.parent)
    build_index(shape_dataset, directory, load_clip(clip_dir, device="cpu"), clip_path=clip_dir,
                options=BuildOptions(store=store), progress=False)
    yield directory
    drop()


@pytest.fixture
def served(monkeypatch):
    """Run `duomodal serve ...` up to the point of serving; returns the app it would serve."""
    started = {}
    monkeypatch.setattr(
        cli_serve, "_serve_run",
        lambda app, host, port: started.update(app=app, host=host, port=port, threads=torch.get_num_threads()),
    )
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()

    def serve(*args: str):
        status = cli.main(["serve", *args])
        return status, started

    yield serve
    torch.set_num_threads(threads)  # serve sets them for the whole process
    faiss.omp_set_num_threads(faiss_threads)


def test_serve_searches_a_real_index_with_the_recorded_clip(served, index_dir, shape_dataset, capsys):
    status, started = served("--index", str(index_dir), "--device", "cpu", "--port", "8123")
    assert status == 0
    assert (started["host"], started["port"], started["threads"]) == ("127.0.0.1", 8123, 1)
    assert capsys.readouterr().err == "duomodal: serving 24 images at http://127.0.0.1:8123/ (Ctrl+C stops)\n"
    with TestClient(started["app"], base_url="http://localhost") as client:
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


def test_serving_beyond_loopback_asks_for_a_token(served, index_dir, capsys, monkeypatch):
    monkeypatch.delenv("DUOMODAL_TOKEN", raising=False)
    status, started = served("--index", str(index_dir), "--device", "cpu", "--host", "0.0.0.0",
                             "--allow-host", "photos.lan")
    assert status == 0
    err = capsys.readouterr().err.splitlines()
    url = err[0].removeprefix("duomodal: serving 24 images at ").removesuffix(" (Ctrl+C stops)")
    assert url.startswith("http://0.0.0.0:8000/?token=") and len(url.split("=", 1)[1]) >= 32
    assert err[1].startswith("duomodal: listening beyond this machine; answering Host names ")
    token = url.split("=", 1)[1]
    with TestClient(started["app"], base_url="http://photos.lan:8000") as client:
        assert client.get("/health").status_code == 401
        assert client.get("/health", headers={"authorization": f"Bearer {token}"}).status_code == 200
    with TestClient(started["app"], base_url="http://attacker.example") as client:
        assert client.get("/health", headers={"authorization": f"Bearer {token}"}).status_code == 400
    status, started = served("--index", str(index_dir), "--device", "cpu", "--token", "my-own-token")
    assert status == 0 and "/?token=my-own-token " in capsys.readouterr().err


def test_serve_errors_are_one_line_and_exit_2(served, index_dir, tmp_path, capsys):
    assert served("--index", str(index_dir), "--port", "0")[0] == 2
    assert capsys.readouterr().err == "duomodal: error: --port must be from 1 to 65535, got 0\n"
    assert served("--index", str(index_dir), "--torch-threads", "0")[0] == 2
    assert capsys.readouterr().err == "duomodal: error: --torch-threads must be at least 1, got 0\n"
    assert served("--index", str(index_dir), "--max-jobs", "2", "--max-jobs-per-client", "3")[0] == 2
    assert capsys.readouterr().err == "duomodal: error: --max-jobs-per-client must be from 1 to --max-jobs (2), got 3\n"
    assert served("--index", str(index_dir), "--max-jobs", "40")[0] == 2
    assert capsys.readouterr().err == "duomodal: error: --max-jobs must be from 1 to 32, got 40\n"
    assert served("--index", str(index_dir), "--job-max-age", "0")[0] == 2
    assert capsys.readouterr().err == "duomodal: error: --job-max-age must be above 0 seconds, got 0.0\n"
    status, started = served("--index", str(index_dir), "--max-jobs", "6", "--max-jobs-per-client", "2",
                             "--job-max-age", "60")
    jobs = started["app"].state.duomodal.jobs
    assert status == 0 and (jobs.max_pending, jobs.max_per_client, jobs.max_age_s) == (6, 2, 60.0)
    capsys.readouterr()
    assert served("--index", str(tmp_path / "nothing"))[0] == 2
    assert capsys.readouterr().err == (
        f"duomodal: error: {tmp_path / 'nothing'} is not a directory; build one with 'duomodal index build'\n"
    )


def test_serve_generates_and_edits_with_a_real_dalle_reranked_by_the_clip(served, index_dir, dalle_run, job_waiter):
    status, started = served("--index", str(index_dir), "--dalle", str(dalle_run), "--device", "cpu",
                             "--max-generate", "6")
    assert status == 0
    with TestClient(started["app"], base_url="http://localhost") as client:
        health = client.get("/health").json()
        assert health["generation"] is True and health["max_generate"] == 6
        too_many = client.post("/api/generate", json={"prompt": "a red square", "num": 7})
        assert too_many.status_code == 422
        assert too_many.json() == {"detail": "num: 7 is more than this server generates at once (6)"}
        job = client.post("/api/generate", json={"prompt": "a red square", "num": 6, "keep": 2,
                                                 "guidance": 2.0, "top_k": 8, "seed": 3}).json()
        done = job_waiter(client, job["url"], timeout=30)
        assert done["status"] == "done", done
        assert (done["done"], done["total"]) == (6, 6)
        assert done["result"]["score_kind"] == "clip"
        images = done["result"]["images"]
        assert len(images) == 2 and images[0]["score"] >= images[1]["score"]
        picture = Image.open(io.BytesIO(client.get(images[0]["url"]).content))
        assert picture.size == (16, 16) and picture.mode == "RGB"
        # A word no training caption had is left out by default, so the same seeds draw the same
        # images as without it; keep_unseen_words conditions on it and draws others.
        asked = dict(num=3, seed=3, top_k=8)
        plain, extra, kept = (job_waiter(client, client.post("/api/generate", json=body).json()["url"], timeout=30)
                              for body in ({"prompt": "a red square", **asked}, {"prompt": "a red tan square", **asked},
                                           {"prompt": "a red tan square", "keep_unseen_words": True, **asked}))
        # (in sampling order: CLIP, reading the whole prompt, may rank them otherwise)
        pixels = [[client.get(i["url"]).content for i in job["result"]["samples"]] for job in (plain, extra, kept)]
        assert pixels[0] == pixels[1] and pixels[0] != pixels[2]
        assert kept["settings"]["keep_unseen_words"] is True

        # Edit: a 32x24 upload is fitted to the model's 16x16 centre square, the box moved with it.
        upload = io.BytesIO()
        Image.new("RGB", (32, 24), (30, 60, 220)).save(upload, format="PNG")
        form = {"prompt": "a red circle", "left": "8", "top": "4", "right": "24", "bottom": "12", "num": "2"}
        response = client.post("/api/edit", files={"file": ("b.png", upload.getvalue(), "image/png")}, data=form)
        assert response.status_code == 202
        edited = job_waiter(client, response.json()["url"], timeout=30)
        assert edited["status"] == "done", edited
        assert len(edited["result"]["images"]) == 2
        form.update(left="0", top="0", right="2", bottom="24")  # left of the centre square: nothing left
        response = client.post("/api/edit", files={"file": ("b.png", upload.getvalue(), "image/png")}, data=form)
        assert response.status_code == 400
        assert response.json() == {"detail": (
            "box 0,0,2,24 lies outside the centre square of the 32x24 image that the model sees: "
            "move the box towards the centre"
        )}


def test_fit_to_model_crops_the_centre_square_and_moves_the_box():
    from duomodal.generate import fit_to_model  # the command line's and the server's fitting

    image = Image.new("RGB", (32, 24), (30, 60, 220))
    image.paste((220, 30, 30), (12, 0, 20, 24))  # a red stripe in the middle
    fitted, box = fit_to_model(image, 16, (8, 4, 24, 12))
    assert fitted.size == (16, 16)
    assert box == (2, 2, 13, 8)
    assert fitted.getpixel((8, 8))[0] > 150 and fitted.getpixel((1, 8))[2] > 150  # stripe still central
    same, same_box = fit_to_model(Image.new("RGB", (16, 16)), 16, (0, 0, 16, 16))
    assert same.size == (16, 16) and same_box == (0, 0, 16, 16)


def test_a_running_server_picks_up_duomodal_index_update(served, clip_dir, shape_dataset, tmp_path, vector_store):
    import shutil

    from duomodal.search.build import update_index

    photos = tmp_path / "photos"
    shutil.copytree(shape_dataset, photos)
    index_dir = tmp_path / "idx"
    embedder = load_clip(clip_dir, device="cpu")
    build_index(photos, index_dir, embedder, clip_path=clip_dir, options=BuildOptions(store=vector_store),
                progress=False)
    status, started = served("--index", str(index_dir), "--device", "cpu")
    assert status == 0
    started["app"].state.duomodal.indexes.reload_check_s = 0.0  # the CLI checks every 5 s
    with TestClient(started["app"], base_url="http://localhost") as client:
        assert client.get("/health").json()["images"] == 24
        Image.new("RGB", (16, 16), (250, 120, 0)).save(photos / "orange_square.png")
        Image.new("RGB", (16, 16), (120, 0, 250)).save(photos / "violet_square.png")
        (photos / "red_circle_0.png").unlink()
        update_index(index_dir, embedder, progress=False)
        deadline = time.monotonic() + 20
        while client.get("/health").json()["images"] == 24 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["images"] == 25
        paths = [hit["path"] for hit in client.get("/api/search", params={"q": "square", "k": 200}).json()["results"]]
        assert len(paths) == 25 and "orange_square.png" in paths and "red_circle_0.png" not in paths


def test_serve_watch_indexes_a_copied_file_while_answering(served, clip_dir, shape_dataset, tmp_path):
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(shape_dataset, photos)
    index_dir = tmp_path / "idx"
    build_index(photos, index_dir, load_clip(clip_dir, device="cpu"), clip_path=clip_dir, progress=False)
    status, started = served("--index", str(index_dir), "--device", "cpu", "--watch", "--interval", "0.2",
                             "--settle", "0.1")
    assert status == 0 and started["app"].state.duomodal.config.reload_check_s == 0.2
    with TestClient(started["app"], base_url="http://localhost") as client:
        time.sleep(0.5)  # the first look finds the index up to date
        Image.new("RGB", (16, 16), (250, 120, 0)).save(photos / "orange_square.png")
        copied = time.monotonic()
        deadline = copied + 20
        while time.monotonic() < deadline:
            response = client.get("/api/search", params={"q": "square", "k": 200})
            assert response.status_code == 200  # queries are answered throughout
            if "orange_square.png" in [hit["path"] for hit in response.json()["results"]]:
                break
            time.sleep(0.05)
        assert time.monotonic() - copied < 5  # the target: searchable within 5 s
        assert client.get("/health").json()["images"] == 25
    started["app"].state.watch_stop.set()
