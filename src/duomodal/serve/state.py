"""What the request handlers share, in three parts: `IndexHolder` holds the index (and reopens it
when it changed on disk), `ImageFiles` serves the indexed image files and decodes uploads, and
`ServerState` holds both with the embedder, the optional generator, the query cache and the jobs.
Handlers get the state through the `server_state` dependency.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from fastapi import Request
from PIL import Image

from duomodal.data.images import ImageError, load_image_bytes
from duomodal.search.query import parse_query, query_vector
from duomodal.serve.batching import TextSearchBatcher
from duomodal.serve.config import ServeConfig
from duomodal.serve.jobs import JobQueue
from duomodal.serve.media import (
    FileChangedError,
    ThumbnailCache,
    decode_upload,
    make_thumbnail,
    open_indexed_file,
    read_indexed_image,
)
from duomodal.serve.protocols import Embedder, Generator, Hit, Index

logger = logging.getLogger(__name__)


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


class IndexHolder:
    """The index being served. Given `reopen`, the index is reopened in the background when
    `index.is_stale()` says it changed on disk (`duomodal index update` while serving), checked at
    most every `reload_check_s`; `on_reload` is called once the new one is in place."""

    def __init__(self, index: Index, embedder: Embedder, reopen: Callable[[], Index] | None = None,
                 reload_check_s: float = 5.0, on_reload: Callable[[], None] = lambda: None):
        self.index = index
        self.embedder = embedder
        self.reopen = reopen
        self.reload_check_s = reload_check_s
        self.on_reload = on_reload
        self._checked_at = float("-inf")
        self._reloading = threading.Lock()

    def current(self) -> Index:
        """The index to answer a request with (one handler uses one index throughout)."""
        if self.reopen is not None and time.monotonic() - self._checked_at >= self.reload_check_s:
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
            fresh = self.reopen()
            if fresh.clip_model_id != self.embedder.model_id or fresh.dim != self.embedder.dim:
                logger.error("the index on disk now uses CLIP %r; still serving the old one", fresh.clip_model_id)
                return
            self.index = fresh  # requests in flight finish with the old one
            self.on_reload()
            logger.info("the index changed on disk: now serving %d images", fresh.count)
        except Exception:
            logger.exception("reopening the index failed; still serving the old one")
        finally:
            self._reloading.release()


class ImageFiles:
    """The indexed images as files (or shard members), their cached thumbnails, and uploads, all
    decoded while holding one of `max_decodes` slots: each decode may hold up to ~4 bytes per
    pixel of the pixel limit, so the slots bound the server's decode memory under a crowd."""

    def __init__(self, config: ServeConfig):
        self.max_upload_bytes = config.max_upload_bytes
        self.thumb_size = config.thumb_size
        self.thumbnails = ThumbnailCache(config.thumb_cache_bytes)
        self._decode_slots = threading.BoundedSemaphore(config.max_decodes)

    def decode_upload(self, data: bytes, name: str) -> Image.Image:
        """An upload decoded (media.decode_upload) while holding a decode slot."""
        with self._decode_slots:
            return decode_upload(data, name, self.max_upload_bytes)

    def with_upload(self, data: bytes, name: str, use: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
        """`use(image)` of the decoded upload; the slot is held until the image is no longer needed."""
        with self._decode_slots:
            return use(decode_upload(data, name, self.max_upload_bytes))

    def thumbnail(self, index: Index, hit: Hit) -> tuple[bytes, str]:
        """(bytes, media type) of the thumbnail of `hit`'s file or shard member (see `read_image`;
        the slot is held until the thumbnail is made)."""
        if self.is_member(index, hit):
            data = self.read_member(index, hit)
            with self._decode_slots:
                return make_thumbnail(self._decode_member(index, hit, data, self.thumb_size), self.thumb_size)
        with self.open_file(index, hit) as file, self._decode_slots:
            return make_thumbnail(self._decode_indexed(index, hit, file, self.thumb_size), self.thumb_size)

    @staticmethod
    def is_member(index: Index, hit: Hit) -> bool:
        """Whether `hit` is a member of a shard (served by id from its shard, see `read_member`)
        rather than a file under the index root."""
        source = getattr(index, "source", None)
        return source is not None and source.file_path(hit.path) is None

    def read_member(self, index: Index, hit: Hit) -> bytes:
        """The bytes of the shard member of `hit`; FileChangedError (the row flagged for the next
        `index update`) when its shard no longer holds it."""
        try:
            return index.read_image_bytes(hit.path)  # type: ignore[attr-defined]  # an index over shards
        except OSError:
            self._flag(index, hit.id)
            raise FileChangedError("its shard member is gone") from None

    def open_file(self, index: Index, hit: Hit) -> BinaryIO:
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

    def read_image(self, index: Index, hit: Hit, draft_size: int | None = None) -> Image.Image:
        """The indexed image of `hit` (a file, see `open_file`, or a shard member, see
        `read_member`) decoded holding a decode slot; FileChangedError when it can't be served."""
        if self.is_member(index, hit):
            data = self.read_member(index, hit)
            with self._decode_slots:
                return self._decode_member(index, hit, data, draft_size)
        with self.open_file(index, hit) as file, self._decode_slots:
            return self._decode_indexed(index, hit, file, draft_size)

    def _decode_member(self, index: Index, hit: Hit, data: bytes, draft_size: int | None) -> Image.Image:
        try:
            return load_image_bytes(data, f"image {hit.id}", draft_size=draft_size)
        except ImageError as e:
            self._flag(index, hit.id)
            raise FileChangedError(f"its shard member can't be read as an image ({e.reason})") from None

    def _decode_indexed(self, index: Index, hit: Hit, file: BinaryIO, draft_size: int | None) -> Image.Image:
        try:
            return read_indexed_image(file, f"image {hit.id}", draft_size)
        except FileChangedError:
            self._flag(index, hit.id)
            raise

    @staticmethod
    def _flag(index: Index, image_id: int) -> None:
        try:
            index.flag_changed(image_id)
        except Exception:  # a read-only index: the next update finds the change by itself anyway
            logger.warning("could not flag image %d for the next index update", image_id, exc_info=True)


class ServerState:
    """Everything the handlers share (see the module docstring)."""

    def __init__(self, index: Index, embedder: Embedder, generator: Generator | None, config: ServeConfig,
                 reopen_index: Callable[[], Index] | None = None):
        self.config = config
        self.embedder = embedder
        self.generator = generator
        self.files = ImageFiles(config)
        self.indexes = IndexHolder(index, embedder, reopen_index, config.reload_check_s,
                                   on_reload=self.files.thumbnails.clear)  # an updated file keeps its id
        self.query_vectors = VectorCache(config.query_cache_size)
        self.jobs = JobQueue(max_pending=config.max_pending_jobs, max_per_client=config.max_jobs_per_client,
                             max_kept=max(32, config.max_pending_jobs), max_age_s=config.job_max_age_s)
        self.text_batcher = TextSearchBatcher(embedder.embed_texts, int(embedder.dim),
                                              on_vector=self._remember_vector)

    def current_index(self) -> Index:
        return self.indexes.current()

    async def search_text(self, index: Index, text: str, k: int) -> list[Hit]:
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

    def upload_vector(self, data: bytes, name: str) -> np.ndarray:
        """The query vector of an uploaded image (at most `max_decodes` uploads decoded at once)."""
        return self.files.with_upload(data, name, self.image_vector)

    def close(self) -> None:
        self.text_batcher.close()
        self.jobs.shutdown()


def server_state(request: Request) -> ServerState:
    """The FastAPI dependency that hands a route the app's state."""
    return request.app.state.duomodal
