"""An image index on disk: SQLite metadata + vectors (the truth) and a vector store derived from them.

Index directory layout::

    INDEX_DIR/index.sqlite           rows of images with their vectors, meta, change log (store.py)
    INDEX_DIR/vectors.<seq>.faiss    the faiss index, for the default store (vectors/faiss_store.py)
    INDEX_DIR/lock                   held by the one process allowed to write

The vector store is faiss (the default) or a Milvus collection (``store="milvus:..."``); opening an
index brings it up to date with the store's change log (``vectors.open_vectors``), and
``ImageIndex`` searches through it, so everything above this module is the same for both. The
indexed images come from a source (a folder or shards, ``sources.py``).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duomodal.search.sources import ImageSource, open_source
from duomodal.search.store import IndexStoreError, MetadataStore, ModelMismatchError
from duomodal.search.vectors import VectorStore, open_vectors

MAX_K = 1000
LOCK_FILE = "lock"


@dataclass(frozen=True)
class Hit:
    id: int
    path: str  # relative to the index root, '/' separators
    score: float  # inner product of normalised vectors (cosine similarity)
    width: int
    height: int
    caption: str | None
    size: int | None = None  # the file's bytes and modification time when it was indexed
    mtime_ns: int | None = None


class IndexLock:
    """An exclusive lock on an index directory (fcntl, released when the process ends)."""

    def __init__(self, index_dir: Path, wait: bool = False):
        self.path = Path(index_dir) / LOCK_FILE
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            self._file.close()
            raise IndexStoreError(
                f"{index_dir} is being updated by another process (lock {self.path}); wait for it to finish"
            ) from None

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()

    def __enter__(self) -> IndexLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ImageIndex:
    """A searchable image index (open with ``ImageIndex.open``). Safe to search from threads."""

    def __init__(self, index_dir: Path, store: MetadataStore, vectors: VectorStore):
        self.index_dir = index_dir
        self._store = store
        self._vectors = vectors
        self._meta = store.meta()
        self._seq = store.last_change()
        self._source: ImageSource | None = None

    @classmethod
    def open(cls, index_dir: str | os.PathLike, progress: Callable | None = None) -> ImageIndex:
        """Open an index, bringing its vector store up to date first (saved when no build holds it)."""
        index_dir = Path(index_dir)
        store = MetadataStore.open(index_dir)
        try:
            lock = IndexLock(index_dir)
        except (IndexStoreError, OSError):
            lock = None  # a build is running (or the directory is read-only): sync in memory only
        try:
            vectors = open_vectors(store, index_dir, writable=lock is not None, progress=progress)
        except BaseException:
            store.close()
            raise
        finally:
            if lock is not None:
                lock.release()
        return cls(index_dir, store, vectors)

    # --- facts ------------------------------------------------------------------------------

    @property
    def clip_model_id(self) -> str:
        return self._meta["clip_model_id"]

    @property
    def clip_path(self) -> str | None:
        return self._meta.get("clip_path") or None

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def count(self) -> int:
        return self._vectors.count

    @property
    def root(self) -> Path:
        return Path(self._meta["root"])

    @property
    def index_type(self) -> str:
        return self._vectors.index_type

    @property
    def vector_store(self) -> str:
        """Where the vectors are searched: "faiss" or a Milvus store spec."""
        return self._meta.get("vector_store") or "faiss"

    def check_model(self, model_id: str) -> None:
        """Raise ModelMismatchError unless `model_id` is the CLIP model the index was built with."""
        if model_id != self.clip_model_id:
            raise ModelMismatchError(
                f"{self.index_dir} was built with CLIP model {self.clip_model_id!r} but the query CLIP is "
                f"{model_id!r}; search with the CLIP the index was built with"
                + (f" ({self.clip_path})" if self.clip_path else "")
                + " or rebuild the index with this one"
            )

    # --- lookups ----------------------------------------------------------------------------

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        """The `k` images most similar to `vector` (D,), best first."""
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self.dim:
            raise ValueError(f"query vector has {query.shape[1]} values, the index holds {self.dim}-d vectors")
        return self.search_batch(query, k)[0]

    def search_batch(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """`search` for each row of `vectors` (B, D) in one vector-store call (the server batches the
        queries that arrive together)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise ValueError(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors have shape {queries.shape}, the index holds {self.dim}-d vectors")
        if not np.isfinite(queries).all():
            raise ValueError("query vector has NaN or infinite values")
        if self.count == 0:
            return [[] for _ in range(len(queries))]
        found = self._vectors.search_batch(queries, int(k))
        rows = self._store.rows(sorted({i for hits in found for i, _ in hits}))
        return [[self._hit(rows[i], s) for i, s in hits if i in rows] for hits in found]

    @staticmethod
    def _hit(row, score: float) -> Hit:
        return Hit(row.id, row.path, score, row.width, row.height, row.caption, row.size, row.mtime_ns)

    def get(self, image_id: int) -> Hit | None:
        row = self._store.rows([int(image_id)]).get(int(image_id))
        return None if row is None else self._hit(row, 0.0)

    def flag_changed(self, image_id: int) -> None:
        """Mark an image whose file no longer matches its row (the server found it swapped or
        changed), so that the next `index update` reads it again (see MetadataStore.flag_changed)."""
        self._store.flag_changed(int(image_id))

    def vector(self, image_id: int) -> np.ndarray:
        found = self._store.vectors([int(image_id)], self.dim)
        if int(image_id) not in found:
            raise IndexStoreError(f"image id {image_id} is not in {self.index_dir}")
        return found[int(image_id)]

    def vectors(self, ids: list[int]) -> np.ndarray:
        """(len(ids), D) vectors in the order given; every id must exist."""
        found = self._store.vectors(ids, self.dim)
        missing = [i for i in ids if int(i) not in found]
        if missing:
            raise IndexStoreError(f"image id(s) {missing[:5]} are not in {self.index_dir}")
        return np.stack([found[int(i)] for i in ids]) if ids else np.zeros((0, self.dim), np.float32)

    def file_path(self, image_id: int) -> Path | None:
        """The absolute path of an indexed image (None if the id is unknown or is a shard member)."""
        hit = self.get(image_id)
        return None if hit is None else self.source.file_path(hit.path)

    @property
    def source(self) -> ImageSource:
        """Where the indexed images are (a folder, or shards whose members `read_image_bytes` reads)."""
        if self._source is None:
            self._source = open_source(self._meta["root"], self.index_dir)
        return self._source

    def read_image_bytes(self, path: str) -> bytes:
        """The bytes of an indexed image by its recorded path; OSError when it is gone."""
        return self.source.read_bytes(path)

    def is_stale(self) -> bool:
        """True when the store has changed since this index was opened (open it again)."""
        return self._store.last_change() != self._seq

    def close(self) -> None:
        self._vectors.close()
        self._store.close()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
