"""What the request handlers share: the index, the embedder, the optional generator, caches, jobs.

The index, embedder and generator are passed in (see `create_app`), so tests can hand in small
objects with the same methods. Their interfaces, as this package uses them:

- index: `clip_model_id`, `dim`, `count`, `root`; `search(vector (D,), k) -> list[Hit]` (and,
  optionally, `search_batch(vectors (B, D), k)`); `get(id) -> Hit | None`; `vector(id) -> np.ndarray
  (D,)`; `flag_changed(id)`. A Hit has `id, path, score, width, height, caption` and, to check a
  file before serving it, `size, mtime_ns` (as indexed).
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
from typing import Any, BinaryIO, Protocol

import numpy as np
from PIL import Image

from duomodal.data.images import ImageError, load_image_bytes
from duomodal.search.query import parse_query, query_vector
from duomodal.serve.batching import TextSearchBatcher
from duomodal.serve.jobs import JobControl, JobOutput, JobQueue
from duomodal.serve.media import (
    MAX_UPLOAD_BYTES,
    FileChangedError,
    ThumbnailCache,
    decode_upload,
    make_thumbnail,
    open_indexed_file,
    read_indexed_image,
)

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
        unseen_words: str = "drop",  # prompt words no training caption had: "drop" or "keep"
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
        unseen_words: str = "drop",  # prompt words no training caption had: "drop" or "keep"
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
        unseen_words: str = "drop",  # prompt words no training caption had: "drop" or "keep"
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


def _cache_key(terms: list[tuple[float, str]]) -> str:
    return "\x00".join(f"{weight!r}*{text}" for weight, text in terms)


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
    # Images decoded at once (uploads, thumbnails, conversions): each may hold up to ~4 bytes per
    # pixel of the pixel limit, so this bounds the server's decode memory under a crowd.
    max_decodes: int = 2
    _checked_at: float = field(default=float("-inf"), init=False)
    _reloading: threading.Lock = field(default_factory=threading.Lock, init=False)
    _decode_slots: threading.BoundedSemaphore = field(init=False)
    text_batcher: TextSearchBatcher = field(init=False)

    def __post_init__(self) -> None:
        if self.max_decodes < 1:
            raise ValueError(f"max_decodes must be at least 1, got {self.max_decodes}")
        self._decode_slots = threading.BoundedSemaphore(self.max_decodes)
        self.text_batcher = TextSearchBatcher(
            self.embedder.embed_texts, int(self.embedder.dim), on_vector=self._remember_vector
        )

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

    async def search_text(self, index: Any, text: str, k: int) -> list:
        """The hits of a text query (weights and "-negatives" parsed), batched with the text
        searches that arrive at the same time; query vectors are cached by their parsed terms."""
        terms = parse_query(text)
        vector = self.query_vectors.get(_cache_key(terms))
        return await self.text_batcher.search_async(index, terms, k, vector)

    @staticmethod
    def cache_key(terms: list[tuple[float, str]]) -> str:
        """The key of a query's vector in `query_vectors`."""
        return _cache_key(terms)

    def _remember_vector(self, terms: list[tuple[float, str]], vector: np.ndarray) -> None:
        self.query_vectors.put(_cache_key(terms), vector)

    def image_vector(self, image: Image.Image) -> np.ndarray:
        return query_vector(self.embedder, texts=[], images=[(1.0, image)])

    def decode_upload(self, data: bytes, name: str) -> Image.Image:
        """An upload decoded (media.decode_upload) while holding one of the decode slots."""
        with self._decode_slots:
            return decode_upload(data, name, self.max_upload_bytes)

    def upload_vector(self, data: bytes, name: str) -> np.ndarray:
        """The query vector of an uploaded image; the slot is held until the decoded image is no
        longer needed, so at most `max_decodes` full-size uploads are in memory at once."""
        with self._decode_slots:
            return self.image_vector(decode_upload(data, name, self.max_upload_bytes))

    def thumbnail(self, index: Any, hit: Any) -> tuple[bytes, str]:
        """(bytes, media type) of the thumbnail of `hit`'s file or shard member (see `read_image`;
        the slot is held until the thumbnail is made)."""
        if self.is_member(index, hit):
            data = self.read_member(index, hit)
            with self._decode_slots:
                return make_thumbnail(self._decode_member(index, hit, data, self.thumb_size), self.thumb_size)
        with self.open_file(index, hit) as file, self._decode_slots:
            return make_thumbnail(self._decode_indexed(index, hit, file, self.thumb_size), self.thumb_size)

    @staticmethod
    def is_member(index: Any, hit: Any) -> bool:
        """Whether `hit` is a member of a shard (served by id from its shard, see `read_member`)
        rather than a file under the index root."""
        source = getattr(index, "source", None)
        return source is not None and source.file_path(hit.path) is None

    def read_member(self, index: Any, hit: Any) -> bytes:
        """The bytes of the shard member of `hit`; FileChangedError (the row flagged for the next
        `index update`) when its shard no longer holds it."""
        try:
            return index.read_image_bytes(hit.path)
        except OSError:
            self._flag(index, hit.id)
            raise FileChangedError("its shard member is gone") from None

    def open_file(self, index: Any, hit: Any) -> BinaryIO:
        """The indexed file of `hit`, opened only if it is still the file that was indexed, inside
        the index root (media.open_indexed_file). Otherwise the row is flagged for the next
        `index update` and FileChangedError is raised."""
        try:
            return open_indexed_file(
                Path(index.root), hit.path, getattr(hit, "size", None), getattr(hit, "mtime_ns", None)
            )
        except FileChangedError:
            self._flag(index, hit.id)
            raise

    def read_image(self, index: Any, hit: Any, draft_size: int | None = None) -> Image.Image:
        """The indexed image of `hit` (a file, see `open_file`, or a shard member, see
        `read_member`) decoded holding a decode slot; FileChangedError when it can't be served."""
        if self.is_member(index, hit):
            data = self.read_member(index, hit)
            with self._decode_slots:
                return self._decode_member(index, hit, data, draft_size)
        with self.open_file(index, hit) as file, self._decode_slots:
            return self._decode_indexed(index, hit, file, draft_size)

    def _decode_member(self, index: Any, hit: Any, data: bytes, draft_size: int | None) -> Image.Image:
        try:
            return load_image_bytes(data, f"image {hit.id}", draft_size=draft_size)
        except ImageError as e:
            self._flag(index, hit.id)
            raise FileChangedError(f"its shard member can't be read as an image ({e.reason})") from None

    def _decode_indexed(self, index: Any, hit: Any, file: BinaryIO, draft_size: int | None) -> Image.Image:
        try:
            return read_indexed_image(file, f"image {hit.id}", draft_size)
        except FileChangedError:
            self._flag(index, hit.id)
            raise

    @staticmethod
    def _flag(index: Any, image_id: int) -> None:
        try:
            index.flag_changed(image_id)
        except Exception:  # a read-only index: the next update finds the change by itself anyway
            logger.warning("could not flag image %d for the next index update", image_id, exc_info=True)
