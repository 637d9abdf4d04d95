"""Schemathesis hooks for the live contract test: an upload's `file` part is declared in the
OpenAPI schema as one of the image media types; these strategies make files of those types (small
images of any size and colour within the server's aspect-ratio limit) instead of random bytes."""

from __future__ import annotations

import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image

from duomodal.data.images import DEFAULT_MAX_ASPECT

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WEBP", "image/bmp": "BMP"}


@st.composite
def image_file(draw, image_format: str) -> bytes:
    width = draw(st.integers(1, 48))
    low, high = max(1, -(-width // int(DEFAULT_MAX_ASPECT))), min(48, width * int(DEFAULT_MAX_ASPECT))
    height = draw(st.integers(low, high))
    color = draw(st.tuples(*[st.integers(0, 255)] * 3))
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format=image_format)
    return buffer.getvalue()


for media_type, image_format in FORMATS.items():
    schemathesis.openapi.media_type(media_type, image_file(image_format))
