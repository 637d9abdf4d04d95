"""The HTTP API over a stand-in index/CLIP: answers, validation, exact error statuses and messages,
images and thumbnails by id, path safety, reopening an updated index. Uploads are in
test_uploads.py, generation jobs in test_jobs.py."""

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
        "/api/complete",
        "/api/generator",
        "/api/jobs/{job_id}/events",
        "/api/jobs/{job_id}/preview/{n}",
        "/health",
    }
    post = schema["paths"]["/api/search"]["post"]
    assert post["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    request = schema["components"]["schemas"]["TextSearchRequest"]["properties"]
    assert request["k"]["maximum"] == 200 and request["query"]["maxLength"] == 500


def test_without_a_generator_there_are_no_generation_routes(fake_index, fake_clip):
    with TestClient(create_app(fake_index, fake_clip), base_url="http://localhost") as client:
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
        ({"q": "   "}, "q: query is empty; type what to search for, e.g. 'beach -people'"),
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
        ({"query": "   "}, "query: query is empty; type what to search for, e.g. 'beach -people'"),
        ({"query": "\t\n"}, "query: should not contain control characters (NUL, tabs, line breaks...)"),
        ({"query": "red\x00"}, "query: should not contain control characters (NUL, tabs, line breaks...)"),
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


def test_queries_outside_the_syntax_are_422_with_the_parsers_reason(client):
    # The schema's pattern for q says what parse_query accepts; the reason is the parser's.
    response = client.get("/api/search", params={"q": "-red -blue"})
    assert response.status_code == 422
    assert response.json() == {
        "detail": "q: query '-red -blue' has only negative terms; add a positive one, e.g. 'beach -people'"
    }
    response = client.post("/api/search", json={"query": "0*red"})
    assert response.status_code == 422
    assert response.json() == {"detail": "query: term '0*red' has weight 0; drop it or give a weight above 0"}


def test_terms_that_cancel_out_find_nothing_and_say_why(client):
    # Valid syntax, which only embedding shows to mean nothing: an answer, not a refusal.
    response = client.get("/api/search", params={"q": "red -red"})
    assert response.status_code == 200
    body = response.json()
    assert body["results"] == []
    assert body["note"] == "the query's terms cancel out (their weighted sum is zero); change a weight or a term"
    assert client.get("/api/search", params={"q": "red"}).json()["note"] is None


def test_an_unexpected_value_error_in_a_handler_is_a_logged_500_not_a_400(fake_index, fake_clip, monkeypatch, caplog):
    def broken_search(vector, k):
        raise ValueError("an index bug, not the client's fault")

    monkeypatch.setattr(fake_index, "search", broken_search)
    with TestClient(create_app(fake_index, fake_clip), raise_server_exceptions=False, base_url="http://localhost") as client:
        response = client.get("/api/search", params={"q": "red"})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error: ValueError"}
    assert "GET /api/search failed" in caplog.text


def test_a_vector_store_that_does_not_answer_is_a_503_and_a_log_line(fake_index, fake_clip, monkeypatch, caplog):
    from duomodal.search.store import VectorStoreUnavailable

    def unreachable(vector, k):
        raise VectorStoreUnavailable("Milvus at milvus://10.0.0.5:19530/icons failed during the search: timeout")

    monkeypatch.setattr(fake_index, "search", unreachable)
    with TestClient(create_app(fake_index, fake_clip), raise_server_exceptions=False, base_url="http://localhost") as client:
        response = client.get("/api/search", params={"q": "red"})
        assert client.get("/openapi.json").json()["paths"]["/api/search"]["get"]["responses"]["503"]
    assert response.status_code == 503
    assert response.json() == {"detail": "the vector store did not answer; try again in a moment"}
    assert "GET /api/search: Milvus at milvus://10.0.0.5:19530/icons failed during the search: timeout" in caplog.text


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
    assert len(app.state.duomodal.files.thumbnails) == 1
    again = client.get(f"/api/thumb/{fake_index.ids[0]}")
    assert again.content == response.content and len(app.state.duomodal.files.thumbnails) == 1


def test_large_images_get_jpeg_thumbnails_and_odd_names_are_converted(tmp_path, fake_clip, make_fake_index):
    Image.new("RGB", (600, 300), (30, 60, 220)).save(tmp_path / "wide.png")
    Image.new("RGB", (20, 10), (220, 30, 30)).save(tmp_path / "scan.data", format="PNG")
    Image.new("RGB", (20, 10), (220, 30, 30)).save(tmp_path / "old.tiff")
    for name in ("wide", "scan", "old"):
        (tmp_path / f"{name}.txt").write_text(f"{name}\n")
    index = make_fake_index(tmp_path, fake_clip, names=["wide.png", "scan.data", "old.tiff"])
    with TestClient(create_app(index, fake_clip), base_url="http://localhost") as client:
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
        assert refused.json()["detail"] == (
            "image 102 is in the index but its file can't be read as an image (not an image Pillow can "
            "read (JPEG, PNG, WebP, BMP or GIF)): run `duomodal index update` on the index"
        )


def test_an_indexed_file_that_is_gone_is_404_with_what_to_do(tmp_path, fake_clip, make_fake_index):
    Image.new("RGB", (8, 8), (30, 60, 220)).save(tmp_path / "gone.png")
    (tmp_path / "gone.txt").write_text("gone\n")
    index = make_fake_index(tmp_path, fake_clip)
    (tmp_path / "gone.png").unlink()
    with TestClient(create_app(index, fake_clip), base_url="http://localhost") as client:
        response = client.get("/api/image/100")
        assert response.status_code == 404
        assert response.json() == {
            "detail": "image 100 is in the index but its file is gone: run `duomodal index update` on the index"
        }
        response = client.get("/api/thumb/100")
        assert response.status_code == 404
        assert response.json() == {
            "detail": "image 100 is in the index but its file is gone: run `duomodal index update` on the index"
        }
        assert index.flagged == [100, 100]  # for the next `index update`


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


def test_an_index_changed_on_disk_is_reopened_in_the_background(shape_dataset, fake_clip, make_fake_index):
    old = make_fake_index(shape_dataset, fake_clip)
    new = make_fake_index(shape_dataset, fake_clip, names=["red_circle_0.png", "blue_square_0.png"])
    opened = []

    def reopen():
        opened.append(1)
        return new

    app = create_app(old, fake_clip, config=ServeConfig(reload_check_s=0.0), reopen_index=reopen)
    with TestClient(app, base_url="http://localhost") as client:
        assert client.get("/health").json()["images"] == 24 and opened == []
        assert client.get("/api/thumb/101").status_code == 200
        old.stale = True
        deadline = time.monotonic() + 20
        while client.get("/health").json()["images"] != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/health").json()["images"] == 2 and opened == [1]
        assert len(app.state.duomodal.files.thumbnails) == 0
        body = client.get("/api/search", params={"q": "red circle", "k": 5}).json()
        assert ids_and_paths(body) == ["red_circle_0.png", "blue_square_0.png"]
        assert client.get("/api/image/105").status_code == 404  # not in the new index
