"""Images in and out of the server: decoding uploads, serving indexed files, cached thumbnails.

Files are only ever found through the index (an id gives a recorded path); nothing here takes a
path from a request, and a recorded file is served only while it still is the file that was
indexed, inside the indexed folder (`open_indexed_file`).
"""

from __future__ import annotations

import io
import mimetypes
import os
import threading
from collections import OrderedDict
from pathlib import Path, PurePath
from typing import BinaryIO

from PIL import Image

from duomodal.data.images import (
    DEFAULT_MAX_FILE_BYTES,
    DEGENERATE,
    TOO_LARGE,
    ImageError,
    decode_file,
    load_image_bytes,
)
from duomodal.files import UnsafeFileError, open_regular
from duomodal.serve.config import ServeConfig

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


def decode_upload(data: bytes, name: str, max_bytes: int = ServeConfig.max_upload_bytes) -> Image.Image:
    """The uploaded bytes as an RGB image, through the same checks as every image duomodal reads
    (data/images.py), or UploadError: 413 too big (bytes or pixels), 422 degenerate (extreme
    aspect ratio), 415 not an image, 400 empty."""
    if len(data) > max_bytes:
        raise UploadError(
            f"{name} is larger than the upload limit of {human_bytes(max_bytes)}", status=413
        )
    if not data:
        raise UploadError(f"{name} is empty: choose an image file", status=400)
    try:
        return load_image_bytes(data, name, max_pixels=MAX_UPLOAD_PIXELS)
    except ImageError as e:
        if e.kind == TOO_LARGE:
            raise UploadError(f"{name}: {e.reason}", status=413) from None
        if e.kind == DEGENERATE:
            raise UploadError(f"{name}: {e.reason}", status=422) from None
        if e.reason.startswith("not an image"):
            raise UploadError(
                f"{name} is not an image: upload a PNG, JPEG, GIF, WebP or BMP file", status=415
            ) from None
        raise UploadError(f"{name} is a corrupt or truncated image ({e.reason})", status=415) from None


class FileChangedError(ValueError):
    """An indexed file that must not be served as it is now; the message has no path in it."""


def open_indexed_file(root: Path, relative: str, size: int | None, mtime_ns: int | None) -> BinaryIO:
    """Open the indexed file `relative` under `root` for serving, only if its real path still lies
    inside the root, it is a regular file, and (when recorded) its size and modification time are
    those the index recorded. Raises FileChangedError otherwise (the caller answers 404)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(root / relative)
    if os.path.commonpath([real_root, real]) != real_root:
        raise FileChangedError("its file now leads outside the indexed folder")
    try:
        # The resolved path, not followed again: a link swapped in after realpath fails to open.
        file = open_regular(real, DEFAULT_MAX_FILE_BYTES, follow_symlinks=False)
    except UnsafeFileError as e:
        raise FileChangedError(f"its file is no longer servable ({e.reason})") from None
    except FileNotFoundError:
        raise FileChangedError("its file is gone") from None
    except OSError as e:  # ELOOP: the last part became a symlink after realpath
        raise FileChangedError(f"its file can't be opened ({e.strerror or 'error'})") from None
    st = os.fstat(file.fileno())
    if (size is not None and st.st_size != size) or (mtime_ns is not None and st.st_mtime_ns != mtime_ns):
        file.close()
        raise FileChangedError("its file changed since it was indexed")
    return file


def read_indexed_image(file: BinaryIO, name: str, draft_size: int | None = None) -> Image.Image:
    """An opened indexed file decoded to RGB; FileChangedError when it is no usable image now."""
    try:
        return decode_file(file, name, draft_size=draft_size)
    except ImageError as e:
        raise FileChangedError(f"its file can't be read as an image ({e.reason})") from None


def browser_media_type(path: PurePath) -> str | None:
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

    def __init__(self, max_bytes: int = ServeConfig.thumb_cache_bytes):
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
