"""A folder of hostile files, built here, through every entry point that reads a user's folder:
`duomodal data check`, `duomodal index build`, training (`duomodal train vae`) and the server.

Each bad file must end as a named skip (or a 4xx from the server), never a hang, a crash or a
kill: named pipes and links to /dev/zero would block or never end if opened, a caption linked to
/dev/zero would grow without end, a few-byte PNG may claim 20,000,000 x 1 pixels. The timeout
bounds each test, so a hang fails instead of stalling the suite.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from duomodal.cli import main
from duomodal.data.records import load_records
from duomodal.search.build import build_index
from duomodal.search.index import ImageIndex
from duomodal.serve.app import create_app
from duomodal.serve.config import ServeConfig

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="needs FIFOs and /dev/zero"),
]


def crafted_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def png(color: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# relative path -> (kind that `data check` reports, words its reason contains)
EXPECTED = {
    "pipe.png": ("special-file", "not a regular file: it is a named pipe (FIFO)"),
    "zero.png": ("special-file", "not a regular file: it is a character device"),
    "outside.png": ("outside-root", "a symlink that leads outside the folder"),
    "sliver.png": ("degenerate", "20000000x1 pixels, an aspect ratio of 20000000:1"),
    "thin.png": ("degenerate", "4000x10 pixels, an aspect ratio of 400:1"),
    "huge.png": ("too-large", "image header claims 10000000000 pixels, over the limit"),
    "bombcap.txt": ("special-file", "not a regular file: it is a character device"),
    "bigcap.txt": ("oversized-file", "file is 2.0 MiB, over the 1.0 MiB limit"),
    "pipecap.txt": ("special-file", "not a regular file: it is a named pipe (FIFO)"),
}


@pytest.fixture
def hostile_folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png((1, 2, 3)))
    colors = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
    for name, color in colors.items():  # the good ones
        (root / f"{name}.png").write_bytes(png(color))
        (root / f"{name}.txt").write_text(f"a {name} square\n")
    (root / "sub" / "inlink.png").symlink_to(root / "red.png")  # a link inside the folder is fine
    (root / "sub" / "inlink.txt").write_text("a red square again\n")
    os.mkfifo(root / "pipe.png")
    (root / "zero.png").symlink_to("/dev/zero")
    (root / "outside.png").symlink_to(outside / "secret.png")
    (root / "sliver.png").write_bytes(crafted_png(20_000_000, 1))
    (root / "thin.png").write_bytes(png((0, 0, 0), (4000, 10)))
    (root / "huge.png").write_bytes(crafted_png(100_000, 100_000))
    # Captions: one linked to a device, one of 2 MiB, one a pipe; their images are fine.
    for stem in ("bombcap", "bigcap", "pipecap"):
        (root / f"{stem}.png").write_bytes(png((235, 200, 20)))
    (root / "bombcap.txt").symlink_to("/dev/zero")
    (root / "bigcap.txt").write_bytes(b"a yellow square " * (2 * 2**20 // 16))
    os.mkfifo(root / "pipecap.txt")
    for name in ("pipe", "zero", "outside", "sliver", "thin", "huge"):
        (root / f"{name}.txt").write_text(f"{name}\n")
    return root


def test_data_check_names_every_hostile_file(hostile_folder, capsys):
    assert main(["data", "check", "--json", str(hostile_folder)]) == 0
    report = json.loads(capsys.readouterr().out)
    found = {p["path"]: (p["kind"], p["reason"]) for p in report["problems"]}
    for path, (kind, words) in EXPECTED.items():
        assert found[path][0] == kind and words in found[path][1], (path, found.get(path))
    counts = report["problem_counts"]
    assert counts["special-file"] == 4 and counts["outside-root"] == 1 and counts["oversized-file"] == 1
    assert counts["degenerate"] == 2 and counts["too-large"] == 1
    # red, blue, green and the link inside the folder; the caption-less bombcap/bigcap/pipecap images aren't
    assert report["usable_images"] == 4


def test_index_build_skips_each_hostile_file_with_its_reason(hostile_folder, tmp_path, fake_embedder):
    skipped: list[tuple[str, str]] = []
    report = build_index(hostile_folder, tmp_path / "index", fake_embedder, progress=False,
                         on_skip=lambda path, reason: skipped.append((path, reason)))
    reasons = dict(skipped)
    for path, (_, words) in EXPECTED.items():
        if path.endswith(".png"):
            assert words in reasons[path], (path, reasons.get(path))
    assert len(report.skipped) == 6
    with ImageIndex.open(tmp_path / "index") as index:
        hits = {hit.path: hit for hit in index.search(fake_embedder.embed_texts(["red"])[0].numpy(), 20)}
    assert set(hits) == {"red.png", "blue.png", "green.png", "sub/inlink.png", "bombcap.png", "bigcap.png",
                         "pipecap.png"}
    # Captions that are devices, pipes or oversized are not read.
    assert hits["bombcap.png"].caption is None and hits["pipecap.png"].caption is None
    assert hits["bigcap.png"].caption is None and hits["red.png"].caption == "a red square"


def test_training_reads_only_the_safe_files(hostile_folder, tmp_path, capsys):
    records = load_records(hostile_folder, val_fraction=0.0)
    names = sorted(r.path.relative_to(hostile_folder).as_posix() for r in records)
    # The degenerate and oversized images have captions, so they are records; training skips them.
    assert names == ["blue.png", "green.png", "huge.png", "red.png", "sliver.png", "sub/inlink.png", "thin.png"]
    status = main(["train", "vae", "--data", str(hostile_folder), "--out", str(tmp_path / "run"),
                   "--set", "model.image_size=16", "--set", "data.image_size=16", "--set", "model.width=16",
                   "--set", "model.max_width=32", "--set", "model.codebook_size=32", "--set", "model.codebook_dim=16",
                   "--set", "model.quantizer=vq", "--set", "train.batch_size=4", "--set", "train.steps=2",
                   "--set", "train.log_every=1", "--set", "train.val_every=100", "--set", "train.sample_every=100",
                   "--set", "data.val_fraction=0.0"])
    assert status == 0
    assert "trained vae for 2 steps" in capsys.readouterr().out


@pytest.fixture
def served(hostile_folder, tmp_path, fake_embedder):
    """A server over an index of the hostile folder, with the fake CLIP of the search tests."""
    embedder = fake_embedder
    build_index(hostile_folder, tmp_path / "index", embedder, progress=False)
    index = ImageIndex.open(tmp_path / "index")
    with TestClient(create_app(index, embedder, ServeConfig(max_upload_bytes=4 * 2**20)), base_url="http://localhost") as client:
        yield client, index
    index.close()


def test_uploads_of_degenerate_and_huge_images_are_4xx(served):
    client, _ = served
    for name, data, status, words in [
        ("sliver.png", crafted_png(20_000_000, 1), 422, "aspect ratio of 20000000:1"),
        ("thin.png", png((0, 0, 0), (4000, 10)), 422, "aspect ratio of 400:1"),
        ("huge.png", crafted_png(100_000, 100_000), 413, "pixels"),
        ("empty.png", b"", 400, "empty"),
    ]:
        response = client.post("/api/search/image", files={"file": (name, data, "image/png")})
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["detail"]
    wide = client.post("/api/search/image", files={"file": ("wide.png", png((220, 30, 30), (300, 20)), "image/png")})
    assert wide.status_code == 200  # 15:1 is within the limit


def _id_of(index: ImageIndex, path: str) -> int:
    return next(hit.id for hit in index.search(index.vector(1), 20) if hit.path == path)  # 20 > all of them


def test_a_served_file_swapped_for_a_link_out_of_the_root_is_404_and_flagged(
    served, hostile_folder, tmp_path, fake_embedder
):
    client, index = served
    image_id = _id_of(index, "blue.png")
    assert client.get(f"/api/image/{image_id}").content == (hostile_folder / "blue.png").read_bytes()
    (hostile_folder / "blue.png").unlink()
    (hostile_folder / "blue.png").symlink_to(tmp_path / "private" / "secret.png")
    for route in ("image", "thumb"):
        response = client.get(f"/api/{route}/{image_id}")
        assert response.status_code == 404
        assert response.json() == {
            "detail": f"image {image_id} is in the index but its file now leads outside the indexed folder: "
            "run `duomodal index update` on the index"
        }
        assert str(tmp_path) not in response.text
    with ImageIndex.open(tmp_path / "index") as fresh:
        assert fresh.get(image_id).mtime_ns == -1  # flagged: the next update reads it again
    report = build_index(hostile_folder, tmp_path / "index", fake_embedder, progress=False)
    assert report.removed == 1 and ("blue.png", "a symlink that leads outside the folder") in report.skipped


def test_a_served_file_replaced_or_turned_into_a_pipe_is_404(served, hostile_folder):
    client, index = served
    red, green = _id_of(index, "red.png"), _id_of(index, "green.png")
    (hostile_folder / "red.png").write_bytes(png((0, 0, 0)))  # same name, other content
    response = client.get(f"/api/image/{red}")
    assert response.status_code == 404 and "its file changed since it was indexed" in response.json()["detail"]
    (hostile_folder / "green.png").unlink()
    os.mkfifo(hostile_folder / "green.png")
    response = client.get(f"/api/image/{green}")
    assert response.status_code == 404
    assert "not a regular file: it is a named pipe (FIFO)" in response.json()["detail"]
