"""What the request handlers share: the index, the embedder, the optional generator, caches, jobs.

The index, embedder and generator are passed in (see `create_app`), so tests can hand in small
objects with the same methods. Their interfaces, as this package uses them:

- index: `clip_model_id`, `dim`, `count`, `root`; `search(vector (D,), k) -> list[Hit]`;
  `get(id) -> Hit | None`; `vector(id) -> np.ndarray (D,)`. A Hit has `id, path, score, width,
  height, caption`.
- embedder: `model_id`, `dim`, `embed_texts(list[str])`, `embed_images(list[PIL.Image])` (what
  `duomodal.search.query.query_vector` needs).
- generator (see `duomodal.serve.generator`): `max_num`, `generate(...)`, `edit(...)`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from duomodal.search.query import parse_query, query_vector
from duomodal.serve.jobs import JobOutput, JobQueue, Progress
from duomodal.serve.media import MAX_UPLOAD_BYTES, ThumbnailCache


class Generator(Protocol):
    max_num: int

    def generate(
        self,
        prompt: str,
        *,
        num: int,
        keep: int | None,
        guidance: float,
        temperature: float,
        top_k: int | None,
        seed: int,
        progress: Progress,
    ) -> JobOutput: ...

    def prepare_edit(
        self, image: Image.Image, box: tuple[int, int, int, int]
    ) -> tuple[Image.Image, tuple[int, int, int, int]]:
        """The upload and box as `edit` takes them (fast; runs in the request, so a box the model
        can't use is refused at once); raises ValueError with what to change."""
        ...

    def edit(
        self,
        image: Image.Image,
        box: tuple[int, int, int, int],
        prompt: str,
        *,
        num: int,
        keep: int | None,
        seed: int,
        progress: Progress,
    ) -> JobOutput: ...


class VectorCache:
    """A small LRU from query text to its vector: typing the same query twice embeds it once."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@dataclass
class ServerState:
    index: Any
    embedder: Any
    generator: Generator | None
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    thumb_size: int = 256
    thumbnails: ThumbnailCache = field(default_factory=ThumbnailCache)
    query_vectors: VectorCache = field(default_factory=lambda: VectorCache(256))
    jobs: JobQueue = field(default_factory=JobQueue)

    def text_vector(self, text: str) -> np.ndarray:
        """The query vector of a text query (weights and "-negatives" parsed); cached by text."""
        vector = self.query_vectors.get(text)
        if vector is None:
            vector = query_vector(self.embedder, texts=parse_query(text), images=[])
            self.query_vectors.put(text, vector)
        return vector

    def image_vector(self, image: Image.Image) -> np.ndarray:
        return query_vector(self.embedder, texts=[], images=[(1.0, image)])

    def file_path(self, recorded: str) -> Path:
        """Where an indexed file is: its recorded path, relative paths taken from the index root."""
        path = Path(recorded)
        return path if path.is_absolute() else Path(self.index.root) / path
