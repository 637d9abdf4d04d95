"""Reading user images safely and turning them into tensors and back.

`load_image` (a file) and `load_image_bytes` (bytes: an upload, a shard member) are the one door
through which duomodal reads an image: they open only regular files under a size cap, refuse empty
files, non-images, and images whose header claims more pixels than a limit (a decompression bomb)
or an extreme aspect ratio (a few bytes that claim 20,000,000 x 1 pixels) before decoding anything,
decode fully (so a truncated file fails here, not halfway through training), apply the EXIF
orientation, take the first frame of an animation, and normalise every mode to RGB (transparency
composited on a background colour, palette/grey/CMYK/16-bit converted). `decode_file` does the same
for a file already opened with `files.open_regular`.
"""

from __future__ import annotations

import io
import math
import operator
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from duomodal.files import UnsafeFileError, atomic_write_bytes, open_regular

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# 50 megapixels: a 7000x7000 photo passes; decoding it takes ~150 MB. Pillow's own guard also applies
# (it refuses more than 2 * Image.MAX_IMAGE_PIXELS, about 179 megapixels, before we see the header).
DEFAULT_MAX_PIXELS = 50_000_000
# Panoramas and banners are at most ~10:1; beyond 20:1 the centre square that every model sees is a
# sliver of the image, and a header of 20,000,000 x 1 is an attack, not a picture.
DEFAULT_MAX_ASPECT = 20.0
DEFAULT_MAX_FILE_BYTES = 256 * 2**20  # a 50-megapixel PNG is at most ~150 MB
WHITE = (255, 255, 255)
# The only decoders Pillow may use, whatever a file's name says: a TIFF, PSD or EPS (which Pillow
# hands to Ghostscript) renamed .png is refused. ("JPEG" also opens the multi-picture MPO files of
# many cameras.)
PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF")

# Kinds of ImageError, used by `duomodal data check` to count problems.
EMPTY = "empty"
UNREADABLE = "unreadable"
TOO_LARGE = "too-large"
DEGENERATE = "degenerate"  # no pixels, or an extreme aspect ratio
SPECIAL_FILE = "special-file"  # a named pipe, device or socket under an image's name

_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class ImageError(ValueError):
    """An image file that cannot be used; names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str, kind: str = UNREADABLE):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason
        self.kind = kind


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether the file name has one of the accepted image extensions (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS  # as Path.suffix, without a Path


def parse_color(value: str | Sequence[int], what: str = "background colour") -> tuple[int, int, int]:
    """A colour as (r, g, b): from "#rrggbb", "#rgb", "rgb(1,2,3)", a colour name, or three integers in 0..255.

    `what` names the colour in the error message. Raises ValueError for anything else.
    """
    if isinstance(value, str):
        try:
            color = ImageColor.getrgb(value.strip())
        except ValueError:
            raise ValueError(f"{what} {value!r} is not a colour; use e.g. '#ffffff' or 'white'") from None
        return tuple(color[:3])  # type: ignore[return-value]
    try:
        rgb = tuple(operator.index(v) for v in value)
    except TypeError:  # not a sequence, or not of integers
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"{what} {value!r} must be a colour name, '#rrggbb' or three integers in 0..255")
    return rgb  # type: ignore[return-value]


def load_image(
    path: str | os.PathLike,
    background: tuple[int, int, int] = WHITE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    draft_size: int | None = None,
) -> Image.Image:
    """Open, check, fully decode and normalise one image file to an RGB PIL image.

    Only a regular file of at most `max_bytes` is opened (a named pipe or a link to a device is
    refused without blocking); the header's size must stay within `max_pixels` and `max_aspect`
    before anything is decoded, so one decode holds at most about 4 * max_pixels bytes. With
    `draft_size`, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale whose sides are still at
    least `draft_size` (for callers that only need that many pixels: training, thumbnails).
    Raises ImageError (kind EMPTY, TOO_LARGE, DEGENERATE, SPECIAL_FILE or UNREADABLE) naming the
    file and the reason.
    """
    path = Path(path)
    try:
        file = open_regular(path, max_bytes)
    except UnsafeFileError as e:
        kind = SPECIAL_FILE if e.reason.startswith("not a regular file") else TOO_LARGE
        raise ImageError(path, e.reason, kind) from None
    except OSError as e:
        raise ImageError(path, f"cannot read file ({e.strerror or e})") from None
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise ImageError(path, "empty file (0 bytes)", EMPTY)
        return _decode(file, path, background, max_pixels, max_aspect, draft_size)


def load_image_bytes(
    data: bytes,
    name: str,
    background: tuple[int, int, int] = WHITE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    draft_size: int | None = None,
) -> Image.Image:
    """`load_image` for an image held in memory (an upload, a member of a tar shard); `name` says
    where it is from in errors. Same checks, same normalisation, same ImageError kinds."""
    if not data:
        raise ImageError(name, "empty file (0 bytes)", EMPTY)
    return _decode(io.BytesIO(data), name, background, max_pixels, max_aspect, draft_size)


def decode_file(
    file: BinaryIO,
    name: str | os.PathLike,
    background: tuple[int, int, int] = WHITE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    draft_size: int | None = None,
) -> Image.Image:
    """`load_image` for a file already opened (with `files.open_regular`); `name` is used in errors."""
    return _decode(file, name, background, max_pixels, max_aspect, draft_size)


def check_dimensions(name: str | os.PathLike, width: int, height: int, max_pixels: int, max_aspect: float) -> None:
    """Raise ImageError (TOO_LARGE or DEGENERATE) unless a width x height image may be decoded."""
    if width < 1 or height < 1:
        raise ImageError(name, f"image header claims {width}x{height} pixels: no pixels to use", DEGENERATE)
    if width * height > max_pixels:
        raise ImageError(name, _too_large_reason(width * height, max_pixels, (width, height)), TOO_LARGE)
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect:
        raise ImageError(
            name,
            f"image is {width}x{height} pixels, an aspect ratio of {aspect:.0f}:1, over the limit of "
            f"{max_aspect:g}:1 (a square crop of it would hold almost nothing); crop it first",
            DEGENERATE,
        )


def _decode(
    file: BinaryIO,
    name: str | os.PathLike,
    background: tuple[int, int, int],
    max_pixels: int,
    max_aspect: float,
    draft_size: int | None,
) -> Image.Image:
    try:
        with Image.open(file, formats=PILLOW_FORMATS) as image:
            width, height = image.size  # from the header: nothing is decoded yet
            check_dimensions(name, width, height, max_pixels, max_aspect)
            if draft_size is not None and image.format == "JPEG":
                image.draft(None, (draft_size, draft_size))
            image.load()  # the first frame of an animation; raises on truncated or corrupt data
            image = _exif_transpose(image)
            return to_rgb(image, background)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        found = _PIL_BOMB_PIXELS.search(str(e))
        pixels = int(found.group(1)) if found else None
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0)) or max_pixels
        raise ImageError(name, _too_large_reason(pixels, limit), TOO_LARGE) from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image Pillow can read (JPEG, PNG, WebP, BMP or GIF)") from None
    except MemoryError:
        raise ImageError(name, "decoding it needs more memory than is free", TOO_LARGE) from None
    except OSError as e:
        raise ImageError(name, f"corrupt or truncated image data: {e}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file can make any decoder raise anything
        raise ImageError(name, f"corrupt image data: {type(e).__name__}: {e}") from None


def _too_large_reason(pixels: int | None, limit: int, size: tuple[int, int] | None = None) -> str:
    if pixels is None:
        claimed = "more pixels than Pillow's limit"
    elif size is None:
        claimed = f"{pixels} pixels"
    else:
        claimed = f"{size[0]}x{size[1]} = {pixels} pixels"
    return f"image header claims {claimed}, over the limit of {limit} pixels (decompression-bomb guard)"


def _exif_transpose(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. A broken EXIF block leaves the pixels as stored: the image data
    itself is fine, and refusing a photo over its metadata would be worse."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - malformed EXIF raises assorted errors inside Pillow
        return image


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any Pillow mode -> RGB. Transparency is composited on `background`; 16/32-bit grey is scaled
    from 0..65535 to 0..255 (Pillow's own conversion clips instead)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = np.asarray(image, dtype=np.float64)
        if mode != "F":
            grey = grey / 257.0  # 65535 -> 255
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if mode == "1" and "transparency" in image.info:
        image = image.convert("L")
        mode = "L"
    if mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> FloatTensor (3, size, size) in [0, 1]: shortest side resized to `size`, then
    the centre cropped square. Non-RGB images are normalised with `to_rgb` (white background)."""
    if size < 1:
        raise ValueError(f"image size must be at least 1, got {size}")
    image = to_rgb(image)
    if image.size != (size, size):
        # The centre square is cut out of the source and only it is resized: the memory is that of
        # the size x size result whatever the aspect ratio (scaling a 20000x1 image's short side up
        # to `size` first would allocate gigabytes).
        width, height = image.size
        scale = size / min(width, height)
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        left = (resized[0] - size) // 2
        top = (resized[1] - size) // 2
        if scale == 1:
            image = image.crop((left, top, left + size, top + size))
        else:
            box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
            image = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, S, S)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """FloatTensor (3, H, W) in [0, 1] (values outside are clamped) -> RGB PIL image."""
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"to_pil needs a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    array = tensor.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)  # (H, W, 3)
    return Image.fromarray(array.cpu().numpy(), "RGB")


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> Image.Image:
    """(N, 3, H, W) in [0, 1] -> one PIL image, `nrow` images per row, white padding between."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"a grid needs an (N, 3, H, W) tensor, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("a grid needs at least one image, got none")
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    N, _, H, W = images.shape
    columns = min(nrow, N)
    rows = math.ceil(N / columns)
    grid = torch.ones(3, rows * (H + padding) + padding, columns * (W + padding) + padding)
    for i in range(N):
        top = padding + (i // columns) * (H + padding)
        left = padding + (i % columns) * (W + padding)
        grid[:, top : top + H, left : left + W] = images[i].detach().float().cpu().clamp(0, 1)
    return to_pil(grid)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> None:
    """Save (N, 3, H, W) images in [0, 1] as one grid picture (format from the suffix), atomically."""
    path = Path(path)
    buffer = io.BytesIO()
    grid = make_grid(images, nrow)
    try:
        grid.save(buffer, format=Image.registered_extensions().get(path.suffix.lower()))
    except (KeyError, ValueError):
        raise ValueError(f"cannot save a grid as {path}: use a .png or .jpg file name") from None
    atomic_write_bytes(path, buffer.getvalue())
