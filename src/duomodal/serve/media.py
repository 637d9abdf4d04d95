"""Images in and out of the server: decoding uploads, serving indexed files, cached thumbnails.

Files are only ever found through the index (an id gives a recorded path); nothing here takes a
path from a request.
"""

from __future__ import annotations

import io
import mimetypes
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from duomodal.data.images import PILLOW_FORMATS, load_image, to_rgb

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000  # 40 megapixels: more is a decompression bomb or a scan we can't use
BROWSER_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"}


class UploadError(ValueError):
    """An upload the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def human_bytes(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MB"
    return f"{n / 1024:.1f} KB"


def decode_upload(data: bytes, name: str, max_bytes: int = MAX_UPLOAD_BYTES) -> Image.Image:
    """The uploaded bytes as an RGB image, or UploadError (413 too big, 415 not an image)."""
    if len(data) > max_bytes:
        raise UploadError(
            f"{name} is larger than the upload limit of {human_bytes(max_bytes)}", status=413
        )
    if not data:
        raise UploadError(f"{name} is empty: choose an image file", status=400)
    try:
        # Only the decoders load_image allows: no TIFF/PSD, no EPS handed to Ghostscript.
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
            if image.width * image.height > MAX_UPLOAD_PIXELS:
                raise UploadError(
                    f"{name} is {image.width}x{image.height} pixels; the limit is "
                    f"{MAX_UPLOAD_PIXELS // 1_000_000} megapixels",
                    status=413,
                )
            image.load()  # the first frame of an animation
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:  # a broken EXIF block: keep the pixels as stored
                pass
            return to_rgb(image)
    except UploadError:
        raise
    except UnidentifiedImageError:
        raise UploadError(
            f"{name} is not an image: upload a PNG, JPEG, GIF, WebP or BMP file", status=415
        ) from None
    except Exception as e:  # PIL raises many types for corrupt data; all mean "not an image"
        raise UploadError(
            f"{name} is a corrupt or truncated image ({type(e).__name__}: {e})", status=415
        ) from None


def read_image_file(path: Path) -> Image.Image:
    """An indexed file as RGB; ImageError (a ValueError) when it is gone or unreadable."""
    return load_image(path)


def browser_media_type(path: Path) -> str | None:
    """The media type to send `path` as, if a browser shows it as is; None means convert it."""
    media_type, _ = mimetypes.guess_type(path.name)
    return media_type if media_type in BROWSER_TYPES else None


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def make_thumbnail(image: Image.Image, size: int) -> tuple[bytes, str]:
    """(bytes, media type): at most `size` pixels on the longer side, never upscaled past 2x.

    Small images (icons) stay PNG with nearest-neighbour scaling so they stay crisp; photos
    become JPEG.
    """
    longer = max(image.width, image.height)
    buffer = io.BytesIO()
    if longer <= size // 2:
        scale = max(1, min(4, size // max(longer, 1)))
        small = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        small.save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    small = image.copy()
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    small.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue(), "image/jpeg"


class ThumbnailCache:
    """An LRU of encoded thumbnails, bounded by total bytes; safe to use from many threads."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._items: OrderedDict[int, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: int) -> tuple[bytes, str] | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: int, item: tuple[bytes, str]) -> None:
        size = len(item[0])
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._items[key] = item
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (evicted, _) = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)
