"""Generation and edit jobs over a stand-in generator: 202 and polling, progress, reranked
results, validation, refusals, a full queue, shutdown."""

from __future__ import annotations

import io
import re
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from duomodal.serve.app import create_app
from duomodal.serve.config import ServeConfig

pytestmark = pytest.mark.timeout(60)


def test_generate_runs_in_the_background_and_returns_reranked_images(client, fake_generator, job_waiter):
    request = {"prompt": "a red circle", "num": 6, "keep": 3, "guidance": 3.0, "seed": 7}
    response = client.post("/api/generate", json=request)
    assert response.status_code == 202
    job = response.json()
    assert re.fullmatch(r"[0-9a-f]{32}", job["id"]) and job["kind"] == "generate"
    assert response.headers["location"] == job["url"] == f"/api/jobs/{job['id']}"
    assert job["status"] in ("queued", "running") and job["result"] is None
    done = job_waiter(client, job["url"])
    assert done["status"] == "done" and done["progress"] == 1.0
    assert (done["done"], done["total"]) == (6, 6)
    images = done["result"]["images"]
    assert done["result"]["prompt"] == "a red circle" and len(images) == 3
    assert done["result"]["score_kind"] == "clip"
    scores = [image["score"] for image in images]
    assert scores == sorted(scores, reverse=True)
    assert fake_generator.calls == [dict(prompt="a red circle", num=6, keep=3, guidance=3.0, seed=7)]
    png = client.get(images[0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (16, 16)
    # Every sample stays, in sampling order with its rank, to compare with the reranked order.
    samples = done["result"]["samples"]
    assert [s["sample"] for s in samples] == list(range(6)) and [s["seed"] for s in samples] == list(range(7, 13))
    assert sorted(s["index"] for s in samples) == list(range(6))
    assert [s["score"] for s in sorted(samples, key=lambda s: s["index"])][:3] == scores
    assert images == sorted(samples, key=lambda s: s["index"])[:3]
    assert done["settings"] == {"num": 6, "keep": 3, "guidance": 3.0, "temperature": 1.0, "top_k": 64, "seed": 7,
                                "top_p": None, "min_p": None, "box": None, "rows": None, "keep_unseen_words": False}
    assert done["preview"] is None  # finished: the result replaces the previews
    missing = client.get(f"{job['url']}/images/6")
    assert missing.status_code == 404
    assert missing.json() == {"detail": f"job {job['id']} has 6 images, not 7"}


def test_progress_is_visible_while_the_job_runs(client, fake_generator):
    fake_generator.seconds_per_image = 0.1
    job = client.post("/api/generate", json={"prompt": "blue square", "num": 8}).json()
    seen = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = client.get(job["url"]).json()
        seen.add(body["done"])
        if body["status"] == "done":
            break
        time.sleep(0.03)
    assert body["status"] == "done"
    assert len(seen - {0, 8}) >= 2, f"saw only {sorted(seen)}"


@pytest.mark.parametrize(
    "request_body, detail",
    [
        ({"prompt": "red", "num": 9}, "num: 9 is more than this server generates at once (8)"),
        ({"prompt": "red", "num": 4, "keep": 5}, "keep (5) is larger than num (4): keep at most num"),
        ({"prompt": "red", "num": 0}, "num: Input should be greater than or equal to 1"),
        ({"prompt": " "}, "prompt: should contain words, not only spaces: type what the image shows"),
        ({"prompt": "red", "guidance": 21}, "guidance: Input should be less than or equal to 20"),
        ({"prompt": "red", "temperature": 5.5}, "temperature: Input should be less than or equal to 5"),
        ({"prompt": "red", "top_p": 0}, "top_p: Input should be greater than 0"),
        ({"prompt": "red", "min_p": 1.5}, "min_p: Input should be less than or equal to 1"),
        ({"prompt": "red", "top_k": 0}, "top_k: Input should be greater than or equal to 1"),
        ({"prompt": "red", "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"num": 2}, "prompt: Field required"),
    ],
)
def test_bad_generation_requests_are_422(client, fake_generator, request_body, detail):
    response = client.post("/api/generate", json=request_body)
    assert response.status_code == 422
    assert response.json() == {"detail": detail}
    assert fake_generator.calls == []


def test_a_prompt_the_library_refuses_fails_the_job_with_its_message(client, job_waiter):
    job = client.post("/api/generate", json={"prompt": "explode", "num": 2}).json()
    done = job_waiter(client, job["url"])
    assert done["status"] == "failed" and done["result"] is None
    assert done["error"] == "prompt 'explode' has a word the tokenizer refuses"
    response = client.get(f"{job['url']}/images/0")
    assert response.status_code == 404
    assert response.json() == {"detail": f"job {job['id']} has no images (yet)"}


def test_too_many_waiting_jobs_is_429(fake_index, fake_clip, fake_generator):
    fake_generator.seconds_per_image = 0.2
    app = create_app(fake_index, fake_clip, fake_generator, ServeConfig(max_pending_jobs=1, max_jobs_per_client=1))
    with TestClient(app, base_url="http://localhost") as client:
        assert client.post("/api/generate", json={"prompt": "red", "num": 8}).status_code == 202
        response = client.post("/api/generate", json={"prompt": "red", "num": 1})
        assert response.status_code == 429
        assert response.json() == {
            "detail": "1 generation jobs are already queued or running: try again when one has finished"
        }


@pytest.mark.parametrize(
    "path, status, detail",
    [
        ("/api/jobs/" + "0" * 32, 404, f"no job {'0' * 32} (finished jobs are kept a while)"),
        ("/api/jobs/../../etc/passwd", 404, "Not Found"),
        ("/api/jobs/xyz", 422, "job_id: String should match pattern '^[0-9a-f]{32}$'"),
        ("/api/jobs/" + "0" * 32 + "/images/0", 404, f"job {'0' * 32} has no images (yet)"),
        ("/api/jobs/" + "0" * 32 + "/images/-1", 422, "n: Input should be greater than or equal to 0"),
    ],
)
def test_job_lookup_errors(client, path, status, detail):
    response = client.get(path)
    assert response.status_code == status
    assert response.json() == {"detail": detail}


def test_edit_repaints_the_box(client, shape_dataset, job_waiter, fake_generator):
    data = (shape_dataset / "blue_square_0.png").read_bytes()
    form = {"prompt": "red", "left": "0", "top": "0", "right": "16", "bottom": "8", "num": "2", "seed": "3"}
    response = client.post("/api/edit", files={"file": ("sq.png", data, "image/png")}, data=form)
    assert response.status_code == 202
    done = job_waiter(client, response.json()["url"])
    assert done["status"] == "done" and done["kind"] == "edit" and len(done["result"]["images"]) == 2
    edited = Image.open(io.BytesIO(client.get(done["result"]["images"][0]["url"]).content))
    assert edited.getpixel((8, 2)) == (220, 30, 30) and edited.getpixel((8, 12)) == (30, 60, 220)
    assert fake_generator.calls[0]["box"] == (0, 0, 16, 8)


@pytest.mark.parametrize(
    "form, status, detail",
    [
        ({"left": "0", "top": "0", "right": "17", "bottom": "8"}, 422,
         "box (0, 0, 17, 8) must lie inside the 16x16 image with left < right and top < bottom"),
        ({"left": "8", "top": "0", "right": "8", "bottom": "8"}, 422,
         "box (8, 0, 8, 8) must lie inside the 16x16 image with left < right and top < bottom"),
        ({"left": "-1", "top": "0", "right": "8", "bottom": "8"}, 422,
         "left: Input should be greater than or equal to 0"),
        ({"left": "0", "top": "0", "right": "8"}, 422, "bottom: Field required"),
        ({"left": "0", "top": "0", "right": "8", "bottom": "8", "num": "100"}, 422,
         "num: 100 is more than this server generates at once (8)"),
    ],
)
def test_bad_edit_requests(client, shape_dataset, form, status, detail):
    data = (shape_dataset / "blue_square_0.png").read_bytes()
    response = client.post(
        "/api/edit", files={"file": ("sq.png", data, "image/png")}, data={"prompt": "red", **form}
    )
    assert response.status_code == status
    assert response.json() == {"detail": detail}


def test_edit_of_a_non_image_is_415(client):
    form = {"prompt": "red", "left": "0", "top": "0", "right": "8", "bottom": "8"}
    response = client.post("/api/edit", files={"file": ("a.gif", b"GIF89a-nope", "image/gif")}, data=form)
    assert response.status_code == 415
    assert response.json() == {"detail": "a.gif is not an image: upload a PNG, JPEG, GIF, WebP or BMP file"}


def test_shutting_down_stops_a_running_job_at_its_next_progress_report():
    from duomodal.serve.jobs import JobOutput, JobQueue

    jobs = JobQueue(max_pending=2)
    started = time.monotonic()

    def slow(control):
        for step in range(1000):
            time.sleep(0.01)
            control.progress(step + 1, 1000)
        return JobOutput([], None)

    running = jobs.submit("generate", "slow", slow)
    waiting = jobs.submit("generate", "never runs", slow)
    while running.done == 0:
        time.sleep(0.01)
    jobs.shutdown()
    while not running.finished and time.monotonic() - started < 5:
        time.sleep(0.01)
    assert running.status == "failed" and running.error == "the server is shutting down"
    assert running.done < 1000 and time.monotonic() - started < 5
    assert waiting.status == "queued"


def test_generate_request_defaults_to_top_k_64_and_guidance_3():
    from duomodal.serve.schemas import GenerateRequest

    request = GenerateRequest(prompt="a red heart icon")
    assert (request.top_k, request.guidance, request.temperature) == (64, 3.0, 1.0)
    assert GenerateRequest(prompt="red", top_k=None, guidance=1.0).top_k is None  # plain sampling on request
    # the defaults are SamplingOptions', as for `duomodal generate` and `duomodal eval`
    from duomodal.models.sampling import SamplingOptions
    from duomodal.serve.schemas import sampling_options

    assert sampling_options(request) == SamplingOptions()
    assert sampling_options(GenerateRequest(prompt="red", temperature=0)).temperature == 0  # greedy, as the CLI
    assert sampling_options(GenerateRequest(prompt="red", min_p=0.1)).min_p == 0.1


def test_without_num_a_server_whose_limit_is_below_the_default_samples_its_limit(client, fake_generator, job_waiter):
    # the fake generator's limit is 8, below /api/generate's default of 16: leaving num out is not an error
    assert fake_generator.max_num == 8
    job = client.post("/api/generate", json={"prompt": "a red circle"})
    assert job.status_code == 202, job.text
    done = job_waiter(client, job.json()["url"])
    assert done["status"] == "done" and done["total"] == 8 and done["settings"]["num"] == 8
    assert client.post("/api/generate", json={"prompt": "a red circle", "keep": 9}).status_code == 422
