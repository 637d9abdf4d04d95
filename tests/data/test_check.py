"""`duomodal data check DIR`: every kind of bad item, the summary, the exit status."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from duomodal.cli import main
from duomodal.data.scan import check_dataset


def crafted_png(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.fixture
def messy_dataset(tmp_path) -> Path:
    root = tmp_path / "messy"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(root / "good.png")
    (root / "good.txt").write_text("a red square\n\nred\n")
    shutil.copy(root / "good.png", root / "copy.png")
    (root / "copy.txt").write_text("the same red square")
    Image.new("RGB", (4, 4), (0, 0, 255)).save(root / "nocap.png")
    (root / "orphan.txt").write_text("an image that is not there")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise, "RGB").save(root / "broken.png")
    (root / "broken.png").write_bytes((root / "broken.png").read_bytes()[:3000])
    (root / "broken.txt").write_text("noise")
    (root / "empty.png").write_bytes(b"")
    (root / "empty.txt").write_text("nothing")
    (root / "notimage.jpg").write_text("plain text pretending to be a JPEG")
    (root / "notimage.txt").write_text("text")
    crafted_png(root / "huge.png", 100_000, 100_000)
    (root / "huge.txt").write_text("a bomb")
    Image.new("RGB", (4, 4), (0, 200, 0)).save(root / "sub" / "grün ünï.png")
    (root / "sub" / "grün ünï.txt").write_text("a green square", encoding="utf-8")
    return root


def test_check_reports_every_bad_item(messy_dataset, capsys):
    status = main(["data", "check", str(messy_dataset)])
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "broken.png: corrupt or truncated image data: image file is truncated",
        "empty.png: empty file (0 bytes)",
        "good.png: duplicate: same content as copy.png",
        "huge.png: image header claims 10000000000 pixels, over the limit of 50000000 pixels "
        "(decompression-bomb guard)",
        "nocap.png: no caption (no nocap.txt next to it)",
        "notimage.jpg: not an image Pillow can read (JPEG, PNG, WebP, BMP or GIF)",
        "orphan.txt: caption without image: no image named orphan.* next to it",
        f"checked {messy_dataset} (captions from sidecar .txt files)",
        "  images found:                 8",
        "  captions found:               8 for 7 images",
        "  images without caption:       1",
        "  captions without image:       1",
        "  unreadable or corrupt images: 2",
        "  zero-byte files:              1",
        "  images over the pixel limit:  1",
        "  degenerate or sliver images:  0",
        "  pipes, devices, sockets:      0",
        "  links out of the folder:      0",
        "  files over the size cap:      0",
        "  duplicate files:              1",
        "  manifest problems:            0",
        "usable: 3 captioned images decode and can be used for training",
    ]
    assert status == 0


def test_check_json(messy_dataset, capsys):
    assert main(["data", "check", "--json", str(messy_dataset)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 8 and report["usable_images"] == 3 and report["usable"] is True
    assert report["problem_counts"] == {
        "no-caption": 1, "orphan-caption": 1, "unreadable": 2, "empty": 1, "too-large": 1, "degenerate": 0,
        "special-file": 0, "outside-root": 0, "oversized-file": 0, "duplicate": 1, "manifest": 0,
    }
    assert report["problems"][0] == {
        "path": "broken.png", "kind": "unreadable",
        "reason": "corrupt or truncated image data: image file is truncated",
    }


def test_unusable_dataset_exits_1(tmp_path, capsys):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty.txt").write_text("a caption for nothing")
    Image.new("RGB", (4, 4)).save(tmp_path / "uncaptioned.png")
    assert main(["data", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["empty.png: empty file (0 bytes)", "uncaptioned.png: no caption (no uncaptioned.txt next to it)"]
    assert out[-1] == "not usable: no captioned image that decodes"


def test_max_pixels_option(messy_dataset, capsys):
    assert main(["data", "check", "--max-pixels", "15", str(messy_dataset)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "good.png: image header claims 4x4 = 16 pixels, over the limit of 15 pixels (decompression-bomb guard)" in out
    assert "  images over the pixel limit:  6" in out  # all but the empty file and the text file
    with pytest.raises(SystemExit) as info:
        main(["data", "check", "--max-pixels", "0", str(messy_dataset)])
    assert info.value.code == 2
    assert capsys.readouterr().err.endswith("error: argument --max-pixels: must be at least 1, got 0\n")


def test_missing_folder_exits_2(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"duomodal: error: dataset folder {tmp_path / 'nowhere'} does not exist\n"


def test_check_manifest_dataset(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    rows = []
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (4, 4), color).save(tmp_path / "images" / f"dot__{color}.png")
        rows.append({"file": f"images/dot__{color}.png", "caption": [f"a {color} dot", f"dot, {color}"],
                     "icon": "dot", "color": color, "split": "train", "heldout": False})
    rows.append({"file": "images/dot__green.png", "caption": "a green dot"})
    lines = [json.dumps(r) for r in rows] + ["{broken"]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["data", "check", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        "captions.jsonl: line 4: not valid JSON (Expecting property name enclosed in double quotes, column 2)",
        "images/dot__green.png: caption without image: captions.jsonl line 3 names a file that does not exist",
        f"checked {tmp_path} (captions from captions.jsonl)",
    ]
    assert "  captions found:               4 for 2 images" in out
    assert "  manifest problems:            1" in out


def test_check_dataset_api_and_progress(shape_dataset, capsys):
    report = check_dataset(shape_dataset, progress=True)
    assert capsys.readouterr().err.count("checking") >= 1  # the tqdm bar went to stderr
    assert report.image_count == 24 and report.captioned_count == 24 and report.caption_count == 48
    assert report.usable_count == 24 and report.usable
    # the fixture draws each (shape, colour) twice, identically: the copies are flagged
    assert report.counts()["duplicate"] == 12
    assert {p.reason for p in report.problems} == {
        f"duplicate: same content as {p.path.replace('_1.png', '_0.png')}" for p in report.problems
    }
    with pytest.raises(ValueError, match=r"^max_pixels must be at least 1, got 0$"):
        check_dataset(shape_dataset, max_pixels=0)
