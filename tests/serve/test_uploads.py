"""Search by an uploaded image, and every way an upload is refused: type (by decoding, not by
name), corrupt data, size, pixels, missing fields."""

from __future__ import annotations

import io

import pytest
from PIL import Image

pytestmark = pytest.mark.timeout(60)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def result_paths(body: dict) -> list[str]:
    return [hit["path"] for hit in body["results"]]


def test_image_upload_finds_images_like_it(client, shape_dataset):
    data = (shape_dataset / "yellow_triangle_0.png").read_bytes()
    response = client.post("/api/search/image", files={"file": ("query.png", data, "image/png")}, data={"k": "4"})
    assert response.status_code == 200
    body = response.json()
    assert body["kind"] == "image" and body["query"] == "query.png"
    assert set(result_paths(body)[:2]) == {"yellow_triangle_0.png", "yellow_triangle_1.png"}
    assert len(body["results"]) == 4


def test_upload_type_is_checked_by_decoding_not_by_name(client, shape_dataset):
    jpeg = io.BytesIO()
    Image.open(shape_dataset / "green_square_0.png").convert("RGB").save(jpeg, format="JPEG", quality=95)
    # A JPEG called .txt and sent as text/plain is still an image.
    response = client.post("/api/search/image", files={"file": ("notes.txt", jpeg.getvalue(), "text/plain")})
    assert response.status_code == 200
    assert result_paths(response.json())[0].startswith("green_square")
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
    assert response.json() == {
        "detail": "bomb.png: image header claims 9000x9000 = 81000000 pixels, over the limit of 40000000 pixels "
        "(decompression-bomb guard)"
    }


@pytest.mark.parametrize(
    "files, data, detail",
    [
        ({"k": (None, "3")}, None, "file: Field required"),  # multipart, but without the file
        ({"file": ("a.png", b"x", "image/png")}, {"k": "0"}, "k: Input should be greater than or equal to 1"),
        ({"file": ("a.png", b"x", "image/png")}, {"k": "999"}, "k: Input should be less than or equal to 200"),
    ],
)
def test_bad_upload_forms_are_422(client, files, data, detail):
    response = client.post("/api/search/image", files=files, data=data)
    assert response.status_code == 422
    assert response.json() == {"detail": detail}
