"""What the request handlers share: the index, the embedder, the optional generator, caches, jobs.

The index, embedder and generator are passed in (see `create_app`), so tests can hand in small
objects with the same methods. Their interfaces, as this package uses them:

- index: `clip_model_id`, `dim`, `count`, `root`; `search(vector (D,), k) -> list[Hit]`;
  `get(id) -> Hit | None`; `vector(id) -> np.ndarray (D,)`. A Hit has `id, path, score, width,
  height, caption`.
- embedder: `model_id`, `dim`, `embed_texts(list[str])`, `embed_images(list[PIL.Image])` (what
  `duomodal.search.query.query_vector` needs).
- generator (see `Generator` below and `duomodal.serve.generator`): `max_num`, `image_size`,
  `grid_size`, `generate(...)`, `edit(...)`, `complete(...)`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from duomodal.data.images import load_image_bytes
from duomodal.search.query import parse_query, query_vector
from duomodal.serve.jobs import JobControl, JobOutput, JobQueue
from duomodal.serve.media import MAX_UPLOAD_BYTES, ThumbnailCache, read_image_file

logger = logging.getLogger(__name__)


class Generator(Protocol):
    """What the generation routes call (`duomodal.serve.generator.DalleGenerator`, or a stand-in).
    Each job method gets the job's `JobControl` to report progress and previews through; a report
    raises JobCancelled when the job should stop."""

    max_num: int
    image_size: int  # uploads are fitted to image_size x image_size
    grid_size: int  # token grid side

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
        control: JobControl,
    ) -> JobOutput: ...

    def prepare_edit(
        self, image: Image.Image, box: tuple[int, int, int, int]
    ) -> tuple[Image.Image, tuple[int, int, int, int]]:
        """The upload and box as `edit` takes them (fast; runs in the request, so a box the model
        can't use is refused at once); raises ValueError with what to change."""
        ...

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """The upload as `complete` takes it (fitted to the model's image size)."""
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
        guidance: float,
        temperature: float,
        top_k: int | None,
        control: JobControl,
    ) -> JobOutput: ...

    def complete(
        self,
        image: Image.Image,
        rows: int,
        prompt: str,
        *,
        num: int,
        keep: int | None,
        seed: int,
        guidance: float,
        temperature: float,
        top_k: int | None,
        control: JobControl,
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
    # Given, the index is reopened in the background when `index.is_stale()` says it changed on
    # disk (`duomodal index update` while serving); checked at most every `reload_check_s`.
    reopen_index: Callable[[], Any] | None = None
    reload_check_s: float = 5.0
    _checked_at: float = field(default=float("-inf"), init=False)
    _reloading: threading.Lock = field(default_factory=threading.Lock, init=False)

    def current_index(self) -> Any:
        """The index to answer a request with (one handler uses one index throughout)."""
        if self.reopen_index is not None and time.monotonic() - self._checked_at >= self.reload_check_s:
            if self._reloading.acquire(blocking=False):
                self._checked_at = time.monotonic()
                try:
                    stale = bool(self.index.is_stale())
                except Exception:  # a store we can't read now: keep serving, try again later
                    logger.exception("checking whether the index changed failed")
                    stale = False
                if stale:
                    threading.Thread(target=self._reload, name="duomodal-reload", daemon=True).start()
                else:
                    self._reloading.release()
        return self.index

    def _reload(self) -> None:
        try:
            fresh = self.reopen_index()
            if fresh.clip_model_id != self.embedder.model_id or fresh.dim != self.embedder.dim:
                logger.error("the index on disk now uses CLIP %r; still serving the old one", fresh.clip_model_id)
                return
            self.index = fresh  # requests in flight finish with the old one
            self.thumbnails.clear()  # an updated file keeps its id
            logger.info("the index changed on disk: now serving %d images", fresh.count)
        except Exception:
            logger.exception("reopening the index failed; still serving the old one")
        finally:
            self._reloading.release()

    def text_vector(self, text: str) -> np.ndarray:
        """The query vector of a text query (weights and "-negatives" parsed); cached by text."""
        vector = self.query_vectors.get(text)
        if vector is None:
            vector = query_vector(self.embedder, texts=parse_query(text), images=[])
            self.query_vectors.put(text, vector)
        return vector

    def image_vector(self, image: Image.Image) -> np.ndarray:
        return query_vector(self.embedder, texts=[], images=[(1.0, image)])

    def file_path(self, index: Any, recorded: str) -> Path | None:
        """Where an indexed file is: its recorded path, relative paths taken from the index root;
        None for a member of a shard (read it with `index.read_image_bytes`)."""
        source = getattr(index, "source", None)
        if source is not None and source.file_path(recorded) is None:
            return None
        path = Path(recorded)
        return path if path.is_absolute() else Path(index.root) / path

    def read_image(self, index: Any, recorded: str) -> Image.Image:
        """An indexed image as RGB, from its file or shard member; ImageError (a ValueError) or
        OSError when it is gone or unreadable."""
        path = self.file_path(index, recorded)
        if path is not None:
            return read_image_file(path)
        return load_image_bytes(index.read_image_bytes(recorded), recorded)
