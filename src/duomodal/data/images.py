"""Reading user images safely and turning them into tensors and back.

`load_image` is the one door through which duomodal reads an image file: it refuses empty files,
non-images and images whose header claims more pixels than a limit (a decompression bomb) before
decoding anything, decodes fully (so a truncated file fails here, not halfway through training),
applies the EXIF orientation, takes the first frame of an animation, and normalises every mode to
RGB (transparency composited on a background colour, palette/grey/CMYK/16-bit converted).
"""

from __future__ import annotations

import io
import math
import operator
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

from duomodal.files import atomic_write_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# 50 megapixels: a 7000x7000 photo passes; decoding it takes ~150 MB. Pillow's own guard also applies
# (it refuses more than 2 * Image.MAX_IMAGE_PIXELS, about 179 megapixels, before we see the header).
DEFAULT_MAX_PIXELS = 50_000_000
WHITE = (255, 255, 255)
# The only decoders Pillow may use, whatever a file's name says: a TIFF, PSD or EPS (which Pillow
# hands to Ghostscript) renamed .png is refused. ("JPEG" also opens the multi-picture MPO files of
# many cameras.)
PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF")

# Kinds of ImageError, used by `duomodal data check` to count problems.
EMPTY = "empty"
UNREADABLE = "unreadable"
TOO_LARGE = "too-large"

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
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


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
) -> Image.Image:
    """Open, check, fully decode and normalise one image file to an RGB PIL image.

    Raises ImageError (kind EMPTY, TOO_LARGE or UNREADABLE) naming the file and the reason.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(path, f"cannot read file ({e.strerror or e})") from None
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)", EMPTY)
    return _decode(path, path, background, max_pixels)


def load_image_bytes(
    data: bytes,
    name: str,
    background: tuple[int, int, int] = WHITE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """`load_image` for an image held in memory (a member of a tar shard); `name` says where it is
    from in errors. Same checks, same normalisation, same ImageError kinds."""
    if not data:
        raise ImageError(name, "empty file (0 bytes)", EMPTY)
    return _decode(io.BytesIO(data), Path(name), background, max_pixels)


def _decode(
    source: Path | io.BytesIO, path: Path, background: tuple[int, int, int], max_pixels: int
) -> Image.Image:
    try:
        with Image.open(source, formats=PILLOW_FORMATS) as image:
            width, height = image.size  # from the header: nothing is decoded yet
            if width * height > max_pixels:
                raise ImageError(path, _too_large_reason(width * height, max_pixels, (width, height)), TOO_LARGE)
            image.load()  # the first frame of an animation; raises on truncated or corrupt data
            image = _exif_transpose(image)
            return to_rgb(image, background)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        found = _PIL_BOMB_PIXELS.search(str(e))
        pixels = int(found.group(1)) if found else None
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0)) or max_pixels
        raise ImageError(path, _too_large_reason(pixels, limit), TOO_LARGE) from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image Pillow can read (JPEG, PNG, WebP, BMP or GIF)") from None
    except OSError as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise ImageError(path, f"cannot read file ({e.strerror or e})") from None
        raise ImageError(path, f"corrupt or truncated image data: {e}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt file can make any decoder raise anything
        raise ImageError(path, f"corrupt image data: {type(e).__name__}: {e}") from None


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
        width, height = image.size
        scale = size / min(width, height)
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(resized, Image.Resampling.BICUBIC, reducing_gap=3.0)
        left = (resized[0] - size) // 2
        top = (resized[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
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
