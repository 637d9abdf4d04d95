"""load_image on good and bad files (all written here), mode normalisation, tensor helpers."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from duomodal.data.images import (
    DEFAULT_MAX_PIXELS,
    DEGENERATE,
    EMPTY,
    SPECIAL_FILE,
    TOO_LARGE,
    UNREADABLE,
    ImageError,
    is_image_path,
    load_image,
    load_image_bytes,
    make_grid,
    parse_color,
    save_grid,
    to_pil,
    to_rgb,
    to_tensor,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height RGB pixels, with a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
    path.write_bytes(data + chunk(b"IEND", b""))
    return path


def noise_png(path: Path, size: int = 64) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def test_rgb_png_loads_unchanged(tmp_path):
    path = noise_png(tmp_path / "noise.png", 8)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (8, 8)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(path)))


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: empty file (0 bytes)"
    assert info.value.kind == EMPTY and info.value.path == path


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: not an image Pillow can read (JPEG, PNG, WebP, BMP or GIF)"
    assert info.value.kind == UNREADABLE


def test_other_formats_under_an_image_name_are_refused(tmp_path):
    path = tmp_path / "really_a_tiff.png"
    Image.new("RGB", (4, 4)).save(path, format="TIFF")
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.reason == "not an image Pillow can read (JPEG, PNG, WebP, BMP or GIF)"
    path = tmp_path / "jpeg_named.png"  # a supported format under another supported suffix is fine
    Image.new("RGB", (4, 4), RED).save(path, format="JPEG", quality=95)
    assert np.abs(np.asarray(load_image(path), dtype=int) - RED).max() <= 3
    path = tmp_path / "camera.jpg"  # a multi-picture JPEG (MPO), as many cameras write: first picture
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    frames[0].save(path, format="MPO", save_all=True, append_images=frames[1:], quality=95)
    assert np.abs(np.asarray(load_image(path), dtype=int) - RED).max() <= 3


def test_truncated_png_fails_at_load_not_later(tmp_path):
    whole = noise_png(tmp_path / "whole.png").read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.reason == "corrupt or truncated image data: image file is truncated"
    assert info.value.kind == UNREADABLE


def test_missing_file(tmp_path):
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "gone.png")
    assert info.value.reason == "cannot read file (No such file or directory)"


def test_huge_dimension_header_is_refused_without_decoding(tmp_path):
    path = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    assert path.stat().st_size < 100
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.kind == TOO_LARGE
    assert info.value.reason == (
        f"image header claims 10000000000 pixels, over the limit of {DEFAULT_MAX_PIXELS} pixels "
        "(decompression-bomb guard)"
    )


def test_pixel_limit_is_checked_on_the_header(tmp_path):
    # 3000x3000 claimed, 16 bytes of data: decoding would say "truncated"; the limit answers first.
    path = png_header_only(tmp_path / "big.png", 3000, 3000)
    with pytest.raises(ImageError) as info:
        load_image(path, max_pixels=1_000_000)
    assert info.value.kind == TOO_LARGE
    assert info.value.reason == (
        "image header claims 3000x3000 = 9000000 pixels, over the limit of 1000000 pixels "
        "(decompression-bomb guard)"
    )
    with pytest.raises(ImageError) as info:
        load_image(path, max_pixels=9_000_000)
    assert info.value.kind == UNREADABLE


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=int) - RED).max() <= 3


def test_palette_png_with_transparency_on_background(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 255, 0, 0, 0, 255] + [0] * (254 * 3))  # 0 = green (transparent), 1 = blue
    image.putpixel((1, 1), 1)
    image.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    white = load_image(path)
    assert white.mode == "RGB"
    assert white.getpixel((0, 0)) == WHITE and white.getpixel((1, 1)) == BLUE
    assert load_image(path, background=(10, 20, 30)).getpixel((0, 0)) == (10, 20, 30)


def test_rgba_and_la_are_composited(tmp_path):
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (2, 2), (255, 0, 0, 128)).save(rgba)
    assert load_image(rgba).getpixel((0, 0)) == (255, 127, 127)
    assert load_image(rgba, background=(0, 0, 0)).getpixel((0, 0)) == (128, 0, 0)
    la = tmp_path / "la.png"
    Image.new("LA", (2, 2), (0, 0)).save(la)
    assert load_image(la).getpixel((0, 0)) == WHITE


def test_animated_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE, (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((4, 4)) == RED


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128), WHITE]


def test_grayscale_and_bilevel_become_rgb(tmp_path):
    gray = tmp_path / "gray.png"
    Image.new("L", (2, 2), 77).save(gray)
    assert load_image(gray).getpixel((0, 0)) == (77, 77, 77)
    bilevel = tmp_path / "bilevel.bmp"
    Image.new("1", (2, 2), 1).save(bilevel)
    assert load_image(bilevel).getpixel((0, 0)) == WHITE


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    stored = Image.new("RGB", (32, 16), BLUE)
    stored.paste(RED, (0, 0, 16, 16))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    stored.save(path, exif=exif.tobytes(), quality=95)
    image = load_image(path)
    assert image.size == (16, 32)  # portrait once turned
    top, bottom = np.asarray(image, dtype=int)[4, 8], np.asarray(image, dtype=int)[28, 8]
    assert np.abs(top - RED).max() <= 8 and np.abs(bottom - BLUE).max() <= 8


def test_unicode_file_name_and_other_formats(tmp_path):
    for name in ("café ☕.png", "日本.webp", "pic.BMP", "photo.jpeg"):
        path = tmp_path / name
        Image.new("RGB", (4, 4), RED).save(path, quality=95, **({"lossless": True} if name.endswith("webp") else {}))
        image = load_image(path)
        assert np.abs(np.asarray(image, dtype=int) - RED).max() <= 3, name


def test_is_image_path():
    assert all(is_image_path(n) for n in ("a.jpg", "a.JPEG", "a.png", "a.webp", "a.bmp", "a.gif"))
    assert not any(is_image_path(n) for n in ("a.txt", "a.tiff", "a", "png"))


def test_to_rgb_of_rgb_is_identity():
    image = Image.new("RGB", (2, 2), RED)
    assert to_rgb(image) is image


def test_to_tensor_resizes_shortest_side_and_crops_centre():
    pixels = np.random.default_rng(1).integers(0, 256, (8, 16, 3), dtype=np.uint8)  # 16 wide, 8 high
    tensor = to_tensor(Image.fromarray(pixels, "RGB"), 8)  # no resize needed: crop columns 4..11
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.float32
    expected = torch.from_numpy(pixels[:, 4:12].astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(tensor, expected)
    small = to_tensor(Image.fromarray(pixels, "RGB"), 4)
    assert small.shape == (3, 4, 4) and 0 <= small.min() and small.max() <= 1
    tall = to_tensor(Image.new("RGB", (10, 30), BLUE), 5)
    assert tall.shape == (3, 5, 5) and torch.allclose(tall[:, 2, 2], torch.tensor([0.0, 0.0, 1.0]))


def test_to_tensor_rejects_bad_size():
    with pytest.raises(ValueError, match=r"^image size must be at least 1, got 0$"):
        to_tensor(Image.new("RGB", (2, 2)), 0)


def test_to_pil_round_trip_and_clamping():
    tensor = torch.randint(0, 256, (3, 5, 7)).float() / 255
    image = to_pil(tensor)
    assert image.size == (7, 5) and image.mode == "RGB"
    assert torch.equal(to_tensor(image, 5), tensor[:, :, 1:6])  # width 7 -> centre columns 1..5
    assert to_pil(torch.full((3, 1, 1), 2.0)).getpixel((0, 0)) == WHITE
    assert to_pil(torch.full((3, 1, 1), -1.0)).getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(ValueError, match=r"^to_pil needs a \(3, H, W\) tensor, got shape \(1, 3, 4, 4\)$"):
        to_pil(torch.zeros(1, 3, 4, 4))


def test_save_grid(tmp_path):
    images = torch.zeros(5, 3, 4, 4)
    images[:, 0] = 1.0  # red squares
    path = tmp_path / "out" / "grid.png"
    save_grid(images, path, nrow=2)
    grid = Image.open(path)
    assert grid.size == (2 * 6 + 2, 3 * 6 + 2)  # 2 columns, 3 rows, 2 px padding
    assert grid.getpixel((2, 2)) == RED and grid.getpixel((0, 0)) == WHITE
    assert grid.getpixel((10, 16)) == WHITE  # the empty sixth cell
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]
    with pytest.raises(ValueError, match=r"^cannot save a grid as .*grid\.xyz: use a \.png or \.jpg file name$"):
        save_grid(images, tmp_path / "grid.xyz")
    with pytest.raises(ValueError, match=r"^a grid needs an \(N, 3, H, W\) tensor, got shape \(3, 4, 4\)$"):
        make_grid(images[0])


def test_parse_color():
    assert parse_color("#ff0000") == RED and parse_color("white") == WHITE and parse_color("#00f") == BLUE
    with pytest.raises(ValueError, match=r"^background colour 'nope' is not a colour; use e\.g\. '#ffffff' or 'white'$"):
        parse_color("nope")


@pytest.mark.timeout(20)
def test_special_files_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer forever
    with pytest.raises(ImageError, match=r"pipe\.png: not a regular file: it is a named pipe \(FIFO\)$") as info:
        load_image(tmp_path / "pipe.png")
    assert info.value.kind == SPECIAL_FILE
    (tmp_path / "zero.png").symlink_to("/dev/zero")  # reading it never ends
    with pytest.raises(ImageError, match=r"zero\.png: not a regular file: it is a character device$"):
        load_image(tmp_path / "zero.png")
    noise_png(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"big\.png: file is \d+ bytes, over the 100 bytes limit$") as info:
        load_image(tmp_path / "big.png", max_bytes=100)
    assert info.value.kind == TOO_LARGE


def test_extreme_aspect_ratios_are_refused_from_the_header(tmp_path):
    sliver = png_header_only(tmp_path / "sliver.png", 20_000_000, 1)  # 20 megapixels, under the pixel limit
    with pytest.raises(ImageError, match=r"sliver\.png: image is 20000000x1 pixels, an aspect ratio of "
                       r"20000000:1, over the limit of 20:1 \(.*\); crop it first$") as info:
        load_image(sliver)
    assert info.value.kind == DEGENERATE
    Image.new("RGB", (200, 10), RED).save(tmp_path / "banner.png")  # 20:1 is allowed
    assert load_image(tmp_path / "banner.png").size == (200, 10)
    with pytest.raises(ImageError, match=r"^upload: image is 10x201 pixels"):
        load_image_bytes(_png_bytes(Image.new("RGB", (10, 201), RED)), "upload")
    assert load_image_bytes(_png_bytes(Image.new("RGB", (4, 4), RED)), "upload").getpixel((0, 0)) == RED


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_to_tensor_of_a_sliver_allocates_only_the_result():
    # Scaling the short side of 200000x1 up to 64 first would need 200000*64*64*3 bytes (2.4 GB);
    # cutting the centre square out first needs 64x64.
    tensor = to_tensor(Image.new("RGB", (200_000, 1), BLUE), 64)
    assert tensor.shape == (3, 64, 64) and torch.allclose(tensor[:, 10, 10], torch.tensor([0.0, 0.0, 1.0]))


def test_draft_decodes_large_jpegs_at_a_reduced_scale(tmp_path):
    Image.new("RGB", (800, 600), BLUE).save(tmp_path / "photo.jpg", quality=90)
    assert load_image(tmp_path / "photo.jpg").size == (800, 600)
    assert load_image(tmp_path / "photo.jpg", draft_size=64).size == (100, 75)  # 1/8: both sides >= 64
    assert load_image(tmp_path / "photo.jpg", draft_size=200).size == (400, 300)  # 1/2
