"""What the page's studio needs from the API: completion, partial previews (polled and as
server-sent events), cancelling, the per-client cap over HTTP, and the model's grid; then the same
over a tiny real DALL-E: previews decoded row by row, a running job cancelled between rows, an edit
that keeps every pixel outside its box, a completion that keeps the top rows."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from duomodal.serve.app import create_app
from duomodal.serve.config import ServeConfig

pytestmark = pytest.mark.timeout(60)


def png(image: Image.Image) -> bytes:
    data = io.BytesIO()
    image.save(data, format="PNG")
    return data.getvalue()


def fetch_image(client: TestClient, url: str) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)


def test_generator_info(client):
    info = client.get("/api/generator").json()
    settings = {s["name"]: s for s in info.pop("settings")}
    assert info == {"image_size": 16, "grid_size": 4, "max_generate": 8, "guidance": 3.0, "top_k": 64}
    # every sampling setting a request may choose, with its default and bounds (what the page shows)
    assert list(settings) == ["temperature", "top_k", "top_p", "min_p", "guidance", "keep_unseen_words", "seed"]
    assert settings["guidance"] | {"description": ""} == {
        "name": "guidance", "type": "number", "default": 3.0, "minimum": 0, "maximum": 20,
        "exclusive_minimum": False, "description": ""}
    assert settings["top_p"]["default"] is None and settings["top_p"]["exclusive_minimum"] is True


def test_complete_keeps_the_top_rows(client, shape_dataset, fake_generator, job_waiter):
    data = (shape_dataset / "blue_square_0.png").read_bytes()
    form = {"prompt": "a blue square", "rows": "2", "num": "3", "keep": "2", "seed": "5", "guidance": "2",
            "min_p": "0.25"}
    response = client.post("/api/complete", files={"file": ("sq.png", data, "image/png")}, data=form)
    assert response.status_code == 202, response.json()
    done = job_waiter(client, response.json()["url"])
    assert done["kind"] == "complete" and done["status"] == "done"
    assert done["settings"] == {"num": 3, "keep": 2, "guidance": 2.0, "temperature": 1.0, "top_k": 64, "seed": 5,
                                "top_p": None, "min_p": 0.25, "box": None, "rows": 2, "keep_unseen_words": False}
    assert len(done["result"]["images"]) == 2 and len(done["result"]["samples"]) == 3
    assert fake_generator.calls == [dict(prompt="a blue square", rows=2, num=3, keep=2, seed=5)]


@pytest.mark.parametrize(
    "form, detail",
    [
        ({"rows": "4"}, "rows: Input should be less than or equal to 3"),
        ({"rows": "-1"}, "rows: Input should be greater than or equal to 0"),
        ({}, "rows: Field required"),
        ({"rows": "1", "num": "9"}, "num: 9 is more than this server generates at once (8)"),
        ({"rows": "1", "top_k": "0"}, "top_k: Input should be greater than or equal to 1"),
        ({"rows": "1", "prompt": "  "}, "prompt: should contain words, not only spaces: type what the image shows"),
    ],
)
def test_bad_completions_are_422(client, shape_dataset, fake_generator, form, detail):
    data = (shape_dataset / "blue_square_0.png").read_bytes()
    response = client.post("/api/complete", files={"file": ("sq.png", data, "image/png")},
                           data={"prompt": "red", **form})
    assert response.status_code == 422
    assert response.json() == {"detail": detail}
    assert fake_generator.calls == []


def test_previews_are_polled_while_the_job_runs(client, fake_generator):
    fake_generator.seconds_per_image = 0.1
    job = client.post("/api/generate", json={"prompt": "red circle", "num": 6}).json()
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = client.get(job["url"]).json()
        if body["status"] == "done":
            break
        if body["preview"] is not None:
            seen.append(body["preview"])
            pixels = fetch_image(client, body["preview"]["images"][0])
            assert (pixels[8:] == (228, 231, 236)).all()  # the rows not drawn yet are blank
        time.sleep(0.03)
    assert body["status"] == "done" and body["preview"] is None
    assert len({p["version"] for p in seen}) >= 2, seen
    assert seen[0]["images"][0] == f"/api/jobs/{job['id']}/preview/0?v={seen[0]['version']}"
    assert (seen[0]["rows"], seen[0]["grid_rows"]) == (2, 4)
    # The last preview stays readable (a page may have its URL from just before the end); no others.
    assert client.get(seen[-1]["images"][0]).status_code == 200
    gone = client.get(f"/api/jobs/{job['id']}/preview/1")
    assert gone.status_code == 404 and gone.json() == {"detail": f"job {job['id']} has no preview 1 (now)"}


def test_job_events_stream_progress_and_end_with_the_result(client, fake_generator):
    fake_generator.seconds_per_image = 0.15  # 6 images over ~0.9 s: several of the stream's 0.1 s looks, even under load
    job = client.post("/api/generate", json={"prompt": "green square", "num": 6}).json()
    with client.stream("GET", f"/api/jobs/{job['id']}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1]["status"] == "done" and len(events[-1]["result"]["images"]) == 6
    assert any(e["preview"] is not None for e in events[:-1])
    done_counts = [e["done"] for e in events]
    assert done_counts == sorted(done_counts) and len(set(done_counts)) >= 3
    missing = client.get("/api/jobs/" + "0" * 32 + "/events")
    assert missing.status_code == 404


def test_cancel_a_running_job_over_http(client, fake_generator, job_waiter):
    fake_generator.seconds_per_image = 0.2
    job = client.post("/api/generate", json={"prompt": "red", "num": 8}).json()
    deadline = time.monotonic() + 20
    while client.get(job["url"]).json()["done"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    response = client.delete(job["url"])
    assert response.status_code == 200 and response.json()["status"] in ("cancelling", "cancelled")
    done = job_waiter(client, job["url"])
    assert (done["status"], done["error"], done["result"]) == ("cancelled", "cancelled", None)
    assert done["done"] < 8
    again = client.delete(job["url"])
    assert again.status_code == 409
    assert again.json() == {"detail": f"job {job['id']} has already finished (cancelled): nothing to cancel"}
    assert client.delete("/api/jobs/" + "0" * 32).status_code == 404
    assert client.delete("/api/jobs/nope").status_code == 422


def test_a_crashing_generator_fails_the_job_and_the_next_one_runs(client, job_waiter):
    crashed = job_waiter(client, client.post("/api/generate", json={"prompt": "crash", "num": 1}).json()["url"])
    assert (crashed["status"], crashed["error"]) == ("failed", "generation failed: MemoryError: out of memory")
    after = job_waiter(client, client.post("/api/generate", json={"prompt": "red", "num": 1}).json()["url"])
    assert after["status"] == "done"


def test_each_client_has_its_own_cap(fake_index, fake_clip, fake_generator):
    fake_generator.seconds_per_image = 0.2
    app = create_app(fake_index, fake_clip, fake_generator, ServeConfig(max_pending_jobs=4, max_jobs_per_client=1))
    one_client = TestClient(app, client=("10.0.0.1", 1000), base_url="http://localhost")
    two_client = TestClient(app, client=("10.0.0.2", 1000), base_url="http://localhost")
    with one_client as one, two_client as two:
        first = one.post("/api/generate", json={"prompt": "red", "num": 8}).json()
        refused = one.post("/api/generate", json={"prompt": "red", "num": 1})
        assert refused.status_code == 429
        assert refused.json() == {"detail": "you already have 1 generation jobs queued or running (at most 1 per "
                                            "client): wait for one to finish, or cancel one"}
        assert two.post("/api/generate", json={"prompt": "red", "num": 1}).status_code == 202
        one.delete(first["url"])


# --- a tiny real DALL-E ------------------------------------------------------------------------


@pytest.fixture
def dalle_client(fake_index, fake_clip, dalle_run):
    from duomodal.models.dalle import load_dalle
    from duomodal.serve.generator import DalleGenerator

    generator = DalleGenerator(load_dalle(dalle_run, device="cpu"), scorer=fake_clip, max_num=8, batch_size=4)
    with TestClient(create_app(fake_index, fake_clip, generator), base_url="http://localhost") as client:
        yield client, generator


def test_real_dalle_edit_keeps_every_pixel_outside_the_box(dalle_client, shape_dataset, job_waiter):
    client, _ = dalle_client
    source = Image.open(shape_dataset / "blue_square_0.png").convert("RGB")
    form = {"prompt": "a red circle", "left": "4", "top": "4", "right": "12", "bottom": "8", "num": "4", "seed": "1"}
    response = client.post("/api/edit", files={"file": ("sq.png", png(source), "image/png")}, data=form)
    done = job_waiter(client, response.json()["url"], timeout=30)
    assert done["status"] == "done", done
    assert done["settings"]["box"] == [4, 4, 12, 8] and done["result"]["score_kind"] == "clip"
    before = np.asarray(source).astype(int)
    inside = np.zeros((16, 16), dtype=bool)
    inside[4:8, 4:12] = True
    changed = 0
    for image in done["result"]["samples"]:
        after = fetch_image(client, image["url"])
        assert (after[~inside] == before[~inside]).all()
        changed += int((after[inside] != before[inside]).any())
    assert changed == 4


def test_real_dalle_completion_keeps_the_top_rows_and_previews_form_row_by_row(
        dalle_client, shape_dataset, job_waiter, monkeypatch):
    from duomodal.serve import generator as generator_module

    client, _ = dalle_client
    previews = []
    original = generator_module._Previews.__call__

    def slow_rows(self, tokens, first, rows):  # a sampling row that takes a while, as on a big model
        time.sleep(1.0)  # long beside a poll and a fetch, even on a loaded machine
        original(self, tokens, first, rows)
        if self.control._job.preview is not None:
            previews.append(self.control._job.preview)

    monkeypatch.setattr(generator_module._Previews, "__call__", slow_rows)
    source = Image.open(shape_dataset / "red_circle_0.png").convert("RGB")
    form = {"prompt": "a red circle", "rows": "1", "num": "2", "seed": "3"}
    response = client.post("/api/complete", files={"file": ("c.png", png(source), "image/png")}, data=form)
    job_url = response.json()["url"]
    polled = None
    deadline = time.monotonic() + 20
    while polled is None and time.monotonic() < deadline:
        body = client.get(job_url).json()
        polled = body["preview"]
        time.sleep(0.02)
    assert polled is not None and polled["grid_rows"] == 4 and 1 < polled["rows"] < 4
    partial = fetch_image(client, polled["images"][0])
    assert (partial[polled["rows"] * 4:] == (228, 231, 236)).all()  # not drawn yet: blank
    done = job_waiter(client, job_url, timeout=30)
    assert done["status"] == "done", done
    assert [p.rows for p in previews] == [2, 3] and all(len(p.images) == 2 for p in previews)
    # Above the line (one token row, 4 px) the image is as it was; below, the model drew.
    before = np.asarray(source).astype(int)
    for image in done["result"]["samples"]:
        after = fetch_image(client, image["url"])
        assert (after[:4] == before[:4]).all() and (after[4:] != before[4:]).any()


def test_real_dalle_job_cancelled_between_token_rows(dalle_client, job_waiter, monkeypatch):
    from duomodal.serve import generator as generator_module

    client, _ = dalle_client
    rows_seen = []
    original = generator_module._Previews.__call__

    def slow_rows(self, tokens, first, rows):
        rows_seen.append(rows)
        time.sleep(0.3)
        original(self, tokens, first, rows)

    monkeypatch.setattr(generator_module._Previews, "__call__", slow_rows)
    job = client.post("/api/generate", json={"prompt": "a red circle", "num": 8}).json()
    deadline = time.monotonic() + 20
    while not rows_seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.delete(job["url"]).status_code == 200
    done = job_waiter(client, job["url"], timeout=20)
    assert (done["status"], done["error"]) == ("cancelled", "cancelled")
    assert done["done"] == 0 and len(rows_seen) <= 3  # stopped inside the first batch of 4 (3 row calls)
