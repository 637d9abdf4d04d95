"""The HTTP API over a fake index/CLIP/generator: answers, validation, exact error statuses and
messages, path safety, jobs."""

from __future__ import annotations

import io
import re
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from duomodal.serve.app import create_app

pytestmark = pytest.mark.timeout(60)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def ids_and_paths(body: dict) -> list[str]:
    return [hit["path"] for hit in body["results"]]


# --- health, page, schema ------------------------------------------------------------------------


def test_health_reports_index_and_limits(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "images": 24,
        "dim": 8,
        "clip_model_id": "fake-clip-8d",
        "generation": True,
        "max_k": 200,
        "max_upload_bytes": 64 * 1024,
        "max_generate": 8,
    }


def test_page_and_its_files_are_served_locally_with_no_external_resource(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/static/app.js"' in page.text and 'href="/static/style.css"' in page.text
    for path in ("/static/app.js", "/static/style.css"):
        assert client.get(path).status_code == 200
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), "external URL in the page"
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"


def test_no_page_that_needs_a_cdn(client):
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


def test_openapi_schema_lists_every_route_with_error_bodies(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/api/search",
        "/api/search/image",
        "/api/similar/{image_id}",
        "/api/image/{image_id}",
        "/api/thumb/{image_id}",
        "/api/generate",
        "/api/edit",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/images/{n}",
        "/health",
    }
    post = schema["paths"]["/api/search"]["post"]
    assert post["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    request = schema["components"]["schemas"]["TextSearchRequest"]["properties"]
    assert request["k"]["maximum"] == 200 and request["query"]["maxLength"] == 500


def test_without_a_generator_there_are_no_generation_routes(fake_index, fake_clip):
    with TestClient(create_app(fake_index, fake_clip)) as client:
        assert client.get("/health").json()["generation"] is False
        response = client.post("/api/generate", json={"prompt": "a red square"})
        assert response.status_code == 404
        assert "/api/generate" not in client.get("/openapi.json").json()["paths"]


def test_an_embedder_from_another_clip_is_refused(fake_index, fake_clip):
    class OtherClip(type(fake_clip)):
        model_id = "other-clip"

    with pytest.raises(ValueError, match="built with CLIP model 'fake-clip-8d' but the server was given 'other-clip'"):
        create_app(fake_index, OtherClip())


# --- text search ---------------------------------------------------------------------------------


def test_text_search_finds_the_described_shapes_best_first(client):
    response = client.get("/api/search", params={"q": "a red circle", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["kind"] == "text" and body["query"] == "a red circle" and body["took_ms"] >= 0
    assert len(body["results"]) == 5
    assert ids_and_paths(body)[:2] == ["red_circle_0.png", "red_circle_1.png"]
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)
    first = body["results"][0]
    assert first["image_url"] == f"/api/image/{first['id']}"
    assert first["thumb_url"] == f"/api/thumb/{first['id']}"
    assert (first["width"], first["height"], first["caption"]) == (16, 16, "a red circle")


def test_post_search_equals_get_search(client):
    get = client.get("/api/search", params={"q": "green triangle", "k": 7}).json()
    post = client.post("/api/search", json={"query": "green triangle", "k": 7}).json()
    assert ids_and_paths(get) == ids_and_paths(post)


def test_negative_terms_push_results_away(client):
    body = client.post("/api/search", json={"query": "circle -red", "k": 6}).json()
    paths = ids_and_paths(body)
    assert all("circle" in p for p in paths) and not any(p.startswith("red") for p in paths)


def test_k_defaults_to_24_and_is_capped_by_the_collection(client):
    assert len(client.get("/api/search", params={"q": "square"}).json()["results"]) == 24
    assert len(client.get("/api/search", params={"q": "square", "k": 200}).json()["results"]) == 24


@pytest.mark.parametrize(
    "params, detail",
    [
        ({}, "q: Field required"),
        ({"q": ""}, "q: String should have at least 1 character"),
        ({"q": "   "}, "q: should contain words, not only spaces: type what the image shows"),
        ({"q": "x" * 501}, "q: String should have at most 500 characters"),
        ({"q": "red", "k": 0}, "k: Input should be greater than or equal to 1"),
        ({"q": "red", "k": 201}, "k: Input should be less than or equal to 200"),
        ({"q": "red", "k": 10**12}, "k: Input should be less than or equal to 200"),
        ({"q": "red", "k": "ten"}, "k: Input should be a valid integer, unable to parse string as an integer"),
    ],
)
def test_bad_text_queries_get_422_with_the_reason(client, params, detail):
    response = client.get("/api/search", params=params)
    assert response.status_code == 422
    assert response.json() == {"detail": detail}


@pytest.mark.parametrize(
    "body, detail",
    [
        ({}, "query: Field required"),
        ({"query": "red", "k": 5, "extra": 1}, "extra: Extra inputs are not permitted"),
        ({"query": 5}, "query: Input should be a valid string"),
        ({"query": "\t\n"}, "query: should contain words, not only spaces: type what the image shows"),
        ({"query": "red\x00"}, "query: should not contain a NUL character"),
        ([1, 2], "body: Input should be a valid dictionary or object to extract fields from"),
    ],
)
def test_bad_search_bodies_get_422_with_the_reason(client, body, detail):
    response = client.post("/api/search", json=body)
    assert response.status_code == 422
    assert response.json() == {"detail": detail}


def test_malformed_json_is_422(client):
    response = client.post("/api/search", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("1: JSON decode error")


def test_query_the_library_refuses_is_400_with_its_message(client):
    response = client.get("/api/search", params={"q": "-red -blue"})
    assert response.status_code == 400
    assert response.json() == {
        "detail": "query '-red -blue' has only negative terms; add a positive one, e.g. 'beach -people'"
    }
    response = client.get("/api/search", params={"q": "0*red"})
    assert response.status_code == 400
    assert response.json() == {"detail": "term '0*red' has weight 0; drop it or give a weight above 0"}


# --- more like this ------------------------------------------------------------------------------


def test_similar_leaves_the_image_out_and_finds_its_twin_first(client, fake_index):
    source = fake_index.ids[fake_index.paths.index("blue_square_0.png")]
    body = client.get(f"/api/similar/{source}", params={"k": 3}).json()
    assert body["kind"] == "similar" and body["query"] == str(source)
    assert source not in [hit["id"] for hit in body["results"]]
    assert ids_and_paths(body)[0] == "blue_square_1.png"
    assert len(body["results"]) == 3


def test_similar_with_every_image_returns_all_others(client, fake_index):
    body = client.get(f"/api/similar/{fake_index.ids[0]}", params={"k": 200}).json()
    assert len(body["results"]) == 23


@pytest.mark.parametrize(
    "path, status, detail",
    [
        ("/api/similar/5", 404, "no image with id 5 in the index"),
        ("/api/similar/-1", 422, "image_id: Input should be greater than or equal to 0"),
        ("/api/similar/abc", 422, "image_id: Input should be a valid integer, unable to parse string as an integer"),
        (f"/api/similar/{10**30}", 422, "image_id: Input should be less than or equal to 9223372036854775807"),
        ("/api/similar/100?k=0", 422, "k: Input should be greater than or equal to 1"),
    ],
)
def test_similar_errors(client, path, status, detail):
    response = client.get(path)
    assert response.status_code == status
    assert response.json() == {"detail": detail}


# --- images, thumbnails, path safety -------------------------------------------------------------


def test_image_by_id_is_the_original_file(client, fake_index, shape_dataset):
    image_id = fake_index.ids[3]
    response = client.get(f"/api/image/{image_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == (shape_dataset / fake_index.paths[3]).read_bytes()


def test_small_thumbnails_are_crisp_png_enlarged_and_cached(client, app, fake_index):
    response = client.get(f"/api/thumb/{fake_index.ids[0]}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.size == (64, 64)  # 16 px icon, scaled 4x with nearest neighbour
    assert len(app.state.duomodal.thumbnails) == 1
    again = client.get(f"/api/thumb/{fake_index.ids[0]}")
    assert again.content == response.content and len(app.state.duomodal.thumbnails) == 1


def test_large_images_get_jpeg_thumbnails_and_odd_names_are_converted(tmp_path, fake_clip, make_fake_index):
    Image.new("RGB", (600, 300), (30, 60, 220)).save(tmp_path / "wide.png")
    Image.new("RGB", (20, 10), (220, 30, 30)).save(tmp_path / "scan.data", format="PNG")
    Image.new("RGB", (20, 10), (220, 30, 30)).save(tmp_path / "old.tiff")
    for name in ("wide", "scan", "old"):
        (tmp_path / f"{name}.txt").write_text(f"{name}\n")
    index = make_fake_index(tmp_path, fake_clip, names=["wide.png", "scan.data", "old.tiff"])
    with TestClient(create_app(index, fake_clip)) as client:
        thumb = client.get("/api/thumb/100")
        assert thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).size == (256, 128)
        # A name that doesn't say what the file is: decoded and sent as PNG.
        converted = client.get("/api/image/101")
        assert converted.status_code == 200 and converted.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(converted.content)).getpixel((0, 0)) == (220, 30, 30)
        # TIFF is not among the decoders duomodal uses.
        refused = client.get("/api/image/102")
        assert refused.status_code == 404
        assert refused.json()["detail"].startswith("image 102 can't be read: ")


def test_an_indexed_file_that_is_gone_is_404_with_what_to_do(tmp_path, fake_clip, make_fake_index):
    Image.new("RGB", (8, 8), (30, 60, 220)).save(tmp_path / "gone.png")
    (tmp_path / "gone.txt").write_text("gone\n")
    index = make_fake_index(tmp_path, fake_clip)
    (tmp_path / "gone.png").unlink()
    with TestClient(create_app(index, fake_clip)) as client:
        response = client.get("/api/image/100")
        assert response.status_code == 404
        assert response.json() == {
            "detail": "image 100 is in the index but its file is gone: run `duomodal index update` on the index"
        }
        response = client.get("/api/thumb/100")
        assert response.status_code == 404
        assert response.json()["detail"].startswith("image 100 can't be read: ")


@pytest.mark.parametrize(
    "path",
    [
        "/api/image/../../etc/passwd",
        "/api/image/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/image/%2e%2e/%2e%2e/etc/passwd",
        "/api/thumb/..%2f..%2fetc%2fpasswd",
        "/api/image/100/../../../../etc/passwd",
        "/api/image//etc/passwd",
        "/api/image/100%00.png",
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2f..%2fapp.py",
    ],
)
def test_no_path_from_the_request_reaches_the_disk(client, path):
    response = client.get(path)
    assert response.status_code in (404, 422)
    assert "root:" not in response.text and "import" not in response.text


@pytest.mark.parametrize("route", ["image", "thumb"])
def test_unknown_and_malformed_ids(client, route):
    response = client.get(f"/api/{route}/99999")
    assert response.status_code == 404
    assert response.json() == {"detail": "no image with id 99999 in the index"}
    response = client.get(f"/api/{route}/1.5")
    assert response.status_code == 422
    assert response.json() == {
        "detail": "image_id: Input should be a valid integer, unable to parse string as an integer"
    }


# --- search by uploaded image --------------------------------------------------------------------


def test_image_upload_finds_images_like_it(client, shape_dataset):
    data = (shape_dataset / "yellow_triangle_0.png").read_bytes()
    response = client.post("/api/search/image", files={"file": ("query.png", data, "image/png")}, data={"k": "4"})
    assert response.status_code == 200
    body = response.json()
    assert body["kind"] == "image" and body["query"] == "query.png"
    assert set(ids_and_paths(body)[:2]) == {"yellow_triangle_0.png", "yellow_triangle_1.png"}
    assert len(body["results"]) == 4


def test_upload_type_is_checked_by_decoding_not_by_name(client, shape_dataset):
    jpeg = io.BytesIO()
    Image.open(shape_dataset / "green_square_0.png").convert("RGB").save(jpeg, format="JPEG", quality=95)
    # A JPEG called .txt and sent as text/plain is still an image.
    response = client.post("/api/search/image", files={"file": ("notes.txt", jpeg.getvalue(), "text/plain")})
    assert response.status_code == 200
    assert ids_and_paths(response.json())[0].startswith("green_square")
    # Text called .png and sent as image/png is not.
    response = client.post("/api/search/image", files={"file": ("cat.png", b"hello, I am text", "image/png")})
    assert response.status_code == 415
    assert response.json() == {"detail": "cat.png is not an image: upload a PNG, JPEG, GIF, WebP or BMP file"}


def test_only_the_usual_image_formats_are_decoded(client):
    tiff, eps = io.BytesIO(), b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tiff, format="TIFF")
    for name, data in (("scan.tiff", tiff.getvalue()), ("drawing.eps", eps)):
        response = client.post("/api/search/image", files={"file": (name, data, "image/tiff")})
        assert response.status_code == 415
        assert response.json() == {"detail": f"{name} is not an image: upload a PNG, JPEG, GIF, WebP or BMP file"}


def test_truncated_and_empty_uploads(client, shape_dataset):
    data = png_bytes(Image.new("RGB", (64, 64), (10, 200, 30)))
    response = client.post("/api/search/image", files={"file": ("cut.png", data[: len(data) // 2], "image/png")})
    assert response.status_code == 415
    assert response.json()["detail"].startswith("cut.png is a corrupt or truncated image (")
    response = client.post("/api/search/image", files={"file": ("empty.png", b"", "image/png")})
    assert response.status_code == 400
    assert response.json() == {"detail": "empty.png is empty: choose an image file"}


def test_oversized_uploads_are_413(client):
    # Over the 64 KB upload limit of the test app, under the request-body limit: refused by size.
    response = client.post("/api/search/image", files={"file": ("big.bmp", b"\0" * (70 * 1024), "image/bmp")})
    assert response.status_code == 413
    assert response.json() == {"detail": "big.bmp is larger than the upload limit of 64.0 KB"}
    # Far over: refused from the Content-Length header before the body is read.
    response = client.post("/api/search/image", files={"file": ("huge.bmp", b"\0" * (1024 * 1024), "image/bmp")})
    assert response.status_code == 413
    assert response.json() == {"detail": "request body is larger than the 128.0 KB limit"}


def test_a_streamed_body_without_length_is_cut_off_at_the_limit(client):
    def chunks():
        for _ in range(40):
            yield b"\0" * (8 * 1024)

    response = client.post(
        "/api/search", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json() == {"detail": "request body is larger than the 128.0 KB limit"}


def test_decompression_bombs_are_refused_from_the_header(client):
    bomb = png_bytes(Image.new("1", (9000, 9000)))  # 81 megapixels, a few KB compressed
    assert len(bomb) < 64 * 1024
    response = client.post("/api/search/image", files={"file": ("bomb.png", bomb, "image/png")})
    assert response.status_code == 413
    assert response.json() == {"detail": "bomb.png is 9000x9000 pixels; the limit is 40 megapixels"}


@pytest.mark.parametrize(
    "files, data, detail",
    [
        (None, {"k": "3"}, "file: Field required"),
        ({"file": ("a.png", b"x", "image/png")}, {"k": "0"}, "k: Input should be greater than or equal to 1"),
        ({"file": ("a.png", b"x", "image/png")}, {"k": "999"}, "k: Input should be less than or equal to 200"),
    ],
)
def test_bad_upload_forms_are_422(client, files, data, detail):
    response = client.post("/api/search/image", files=files, data=data)
    assert response.status_code == 422
    assert response.json() == {"detail": detail}


# --- generation jobs -----------------------------------------------------------------------------


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
    missing = client.get(f"{job['url']}/images/3")
    assert missing.status_code == 404
    assert missing.json() == {"detail": f"job {job['id']} has 3 images, not 4"}


def test_progress_is_visible_while_the_job_runs(client, fake_generator):
    fake_generator.seconds_per_image = 0.1
    job = client.post("/api/generate", json={"prompt": "blue square", "num": 8}).json()
    seen = set()
    deadline = time.monotonic() + 10
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
        ({"prompt": "red", "temperature": 0}, "temperature: Input should be greater than 0"),
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
    app = create_app(fake_index, fake_clip, fake_generator, max_pending_jobs=1)
    with TestClient(app) as client:
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

    def slow(progress):
        for step in range(1000):
            time.sleep(0.01)
            progress(step + 1, 1000)
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


def test_an_index_changed_on_disk_is_reopened_in_the_background(shape_dataset, fake_clip, make_fake_index):
    old = make_fake_index(shape_dataset, fake_clip)
    new = make_fake_index(shape_dataset, fake_clip, names=["red_circle_0.png", "blue_square_0.png"])
    opened = []

    def reopen():
        opened.append(1)
        return new

    app = create_app(old, fake_clip, reopen_index=reopen, reload_check_s=0.0)
    with TestClient(app) as client:
        assert client.get("/health").json()["images"] == 24 and opened == []
        assert client.get("/api/thumb/101").status_code == 200
        old.stale = True
        deadline = time.monotonic() + 5
        while client.get("/health").json()["images"] != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/health").json()["images"] == 2 and opened == [1]
        assert len(app.state.duomodal.thumbnails) == 0
        body = client.get("/api/search", params={"q": "red circle", "k": 5}).json()
        assert ids_and_paths(body) == ["red_circle_0.png", "blue_square_0.png"]
        assert client.get("/api/image/105").status_code == 404  # not in the new index
