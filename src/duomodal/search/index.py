"""An image index on disk: SQLite metadata + vectors (the truth) and a vector engine derived from them.

The engine is faiss (the default: a file in the index directory, below) or a Milvus collection
(``store="milvus:..."``, see ``milvus.py``); ``sync_vectors`` picks the one the store's meta names and
``ImageIndex`` searches through it, so everything above this module is the same for both.

Index directory layout (faiss)::

    INDEX_DIR/index.sqlite           rows of images with their vectors, meta, change log (store.py)
    INDEX_DIR/vectors.<seq>.faiss    faiss index holding every vector up to change number <seq>
    INDEX_DIR/lock                   held by the one process allowed to write

The faiss file is written atomically under a name carrying the last change it includes. Opening an
index compares that number with the store's change log and applies what is missing (or rebuilds the
faiss index from the stored vectors), so an interruption at any point loses nothing.

Index types: ``flat`` (exact inner product), ``hnsw`` (graph, approximate, no removal: a deletion
means a rebuild), ``ivf`` (inverted lists, approximate, trained once on a sample). ``auto`` picks
``flat`` up to ``AUTO_EXACT_MAX`` vectors and ``hnsw`` above.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from duomodal.search.sources import FolderSource, ShardSource, open_source
from duomodal.search.store import IndexStoreError, MetadataStore, ModelMismatchError

INDEX_TYPES = ("flat", "hnsw", "ivf")
AUTO_EXACT_MAX = 50_000
MAX_K = 1000
LOCK_FILE = "lock"
_FAISS_GLOB = "vectors.*.faiss"


@dataclass(frozen=True)
class FaissParams:
    hnsw_m: int = 32  # graph neighbours per node
    hnsw_ef_construction: int = 80  # search width while building
    hnsw_ef_search: int = 128  # search width per query (raised to k if larger); 64 gave recall 0.90 at 1M
    ivf_nlist: int = 0  # inverted lists; 0 = 4 * sqrt(n), at least 1
    ivf_nprobe: int = 32  # lists visited per query

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            minimum = 0 if field.name == "ivf_nlist" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{field.name} must be an integer >= {minimum}, got {value!r}")


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


def choose_index_type(option: str, count: int) -> str:
    """The index type for `count` vectors under `option` ("auto" or one of INDEX_TYPES)."""
    if option == "auto":
        return "flat" if count <= AUTO_EXACT_MAX else "hnsw"
    if option not in INDEX_TYPES:
        raise IndexStoreError(f"index type {option!r} is not one of auto, {', '.join(INDEX_TYPES)}")
    return option


def ivf_list_count(params: FaissParams, count: int) -> int:
    return params.ivf_nlist or max(1, int(4 * math.sqrt(max(count, 1))))


def ivf_training_size(params: FaissParams, count: int) -> int:
    """Vectors to train an ivf quantizer on: ~40 per list, at least 10k, at most 200k (k-means cost)."""
    return min(count, max(10_000, min(40 * ivf_list_count(params, count), 200_000)))


def make_faiss_index(
    index_type: str, dim: int, params: FaissParams, train_vectors: np.ndarray | None = None
) -> faiss.Index:
    """An empty faiss index taking 64-bit ids (`add_with_ids`), inner-product metric."""
    if index_type == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if index_type == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = params.hnsw_ef_construction
        return faiss.IndexIDMap2(hnsw)
    if index_type == "ivf":
        if train_vectors is None or len(train_vectors) == 0:
            raise IndexStoreError("an ivf index needs training vectors; index some images first")
        nlist = min(ivf_list_count(params, len(train_vectors)), len(train_vectors))
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.min_points_per_centroid = 1  # small collections: no warning, just train
        ivf.train(np.ascontiguousarray(train_vectors, dtype=np.float32))
        return ivf
    raise IndexStoreError(f"index type {index_type!r} is not one of {', '.join(INDEX_TYPES)}")


def search_params(index_type: str, params: FaissParams, k: int) -> faiss.SearchParameters | None:
    if index_type == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=max(params.hnsw_ef_search, k))
    if index_type == "ivf":
        return faiss.SearchParametersIVF(nprobe=params.ivf_nprobe)
    return None


def faiss_index_type(index: faiss.Index) -> str:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSWFlat):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVFFlat):
        return "ivf"
    return "flat"


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


def _faiss_files(index_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in index_dir.glob(_FAISS_GLOB):
        try:
            found.append((int(path.name.split(".")[1]), path))
        except ValueError:
            continue
    return sorted(found)


def _save_faiss(index: faiss.Index, index_dir: Path, seq: int) -> None:
    path = index_dir / f"vectors.{seq:012d}.faiss"
    tmp = index_dir / f".{path.name}.{os.getpid()}.tmp"
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old_seq, old in _faiss_files(index_dir):
        if old_seq != seq:
            old.unlink(missing_ok=True)


def read_params(meta: dict[str, str]) -> FaissParams:
    return FaissParams(**json.loads(meta.get("faiss_params", "{}")))


def sync_faiss(
    store: MetadataStore,
    index_dir: Path,
    writable: bool,
    progress: Callable | None = None,
) -> faiss.Index:
    """The faiss index holding exactly the store's vectors; saved (and the log pruned) if `writable`.

    Loads the newest faiss file and applies the store's changes since it was written; rebuilds
    from the stored vectors when there is no file, its type is no longer the chosen one, or it
    would need removals it does not support (hnsw).
    """
    meta = store.meta()
    dim = int(meta["dim"])
    params = read_params(meta)
    count = store.count()
    wanted = choose_index_type(meta.get("index_type_option", "auto"), count)
    seq = store.last_change()
    files = _faiss_files(index_dir)
    index = None
    if files and files[-1][0] <= seq:
        saved_seq, path = files[-1]
        index = faiss.read_index(str(path))
        if faiss_index_type(index) != wanted or index.d != dim:
            index = None
        elif saved_seq < seq:
            index = _apply_changes(index, wanted, store, dim, saved_seq)
        if index is not None and index.ntotal != count:
            index = None  # not what the store says: rebuild
    rebuilt = index is None
    if rebuilt:
        index = _rebuild(store, wanted, dim, params, progress)
    if writable and (rebuilt or not files or files[-1][0] != seq):
        _save_faiss(index, index_dir, seq)
        store.forget_changes(seq)
        if meta.get("index_type") != wanted:
            store.set_meta({"index_type": wanted})
    return index


def _apply_changes(
    index: faiss.Index, index_type: str, store: MetadataStore, dim: int, after: int
) -> faiss.Index | None:
    ids = np.array(store.changed_ids(after), dtype=np.int64)
    if len(ids) == 0:
        return index
    if index_type == "hnsw":
        present = np.isin(ids, faiss.vector_to_array(index.id_map))
        if present.any():
            return None  # hnsw cannot remove: rebuild
    else:
        index.remove_ids(ids)
    vectors = store.vectors(ids.tolist(), dim)
    if vectors:
        add_ids = np.array(sorted(vectors), dtype=np.int64)
        index.add_with_ids(np.stack([vectors[i] for i in add_ids]), add_ids)
    return index


def _rebuild(
    store: MetadataStore, index_type: str, dim: int, params: FaissParams, progress: Callable | None
) -> faiss.Index:
    count = store.count()
    train = None
    if index_type == "ivf":
        train = store.sample_vectors(dim, ivf_training_size(params, count))
    index = make_faiss_index(index_type, dim, params, train)
    bar = progress(total=count, desc=f"building {index_type} index", unit="vec") if progress else None
    for ids, vectors in store.iter_vectors(dim):
        index.add_with_ids(vectors, ids)
        if bar is not None:
            bar.update(len(ids))
    if bar is not None:
        bar.close()
    return index


class FaissVectors:
    """Search over a synced faiss index (the vector backend of ``ImageIndex`` for the default store)."""

    def __init__(self, index: faiss.Index, params: FaissParams):
        self.faiss = index
        self._params = params
        self.index_type = faiss_index_type(index)

    @property
    def count(self) -> int:
        return int(self.faiss.ntotal)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(id, inner product) of the `k` nearest stored vectors to `query` (1, D), best first."""
        return self.search_batch(query, k)[0]

    def search_batch(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """`search` for each row of `queries` (B, D) in one faiss call."""
        scores, ids = self.faiss.search(queries, k, params=search_params(self.index_type, self._params, k))
        return [
            [(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
            for row_ids, row_scores in zip(ids, scores)
        ]

    def close(self) -> None:
        pass


def vector_store_spec(spec: str) -> str:
    """The canonical form of a ``--store`` value: "faiss", "milvus:/abs/path.db" or
    "milvus://HOST:PORT/COLLECTION"; ValueError naming the value otherwise."""
    if spec == "faiss":
        return spec
    from duomodal.search.milvus_target import MilvusTarget

    return MilvusTarget.parse(spec).spec


def check_vector_store(spec: str) -> None:
    """IndexStoreError now when the vector store `spec` cannot be reached (a Milvus server that is
    down, refuses the credentials...), so a build fails before it embeds anything."""
    if spec.startswith("milvus://"):
        from duomodal.search.milvus_target import MilvusTarget, connect

        connect(MilvusTarget.parse(spec)).close()


def sync_vectors(
    store: MetadataStore, index_dir: Path, writable: bool, progress: Callable | None = None
) -> FaissVectors:
    """The index's vector backend (faiss or Milvus, from the store's meta `vector_store`), holding
    exactly the store's vectors (saved when `writable`; see `sync_faiss` and `milvus.sync_milvus`)."""
    if store.get_meta("vector_store") in (None, "", "faiss"):
        index = sync_faiss(store, index_dir, writable, progress)
        return FaissVectors(index, read_params(store.meta()))
    from duomodal.search.milvus import sync_milvus

    return sync_milvus(store, writable, progress)


class ImageIndex:
    """A searchable image index (open with ``ImageIndex.open``). Safe to search from threads."""

    def __init__(self, index_dir: Path, store: MetadataStore, vectors: FaissVectors):
        self.index_dir = index_dir
        self._store = store
        self._vectors = vectors  # FaissVectors or milvus.MilvusVectors: count, index_type, search(_batch), close
        self._meta = store.meta()
        self._seq = store.last_change()
        self._source: FolderSource | ShardSource | None = None

    @classmethod
    def open(cls, index_dir: str | os.PathLike, progress: Callable | None = None) -> ImageIndex:
        """Open an index, bringing its faiss file up to date first (saved when no build holds it)."""
        index_dir = Path(index_dir)
        store = MetadataStore.open(index_dir)
        try:
            lock = IndexLock(index_dir)
        except (IndexStoreError, OSError):
            lock = None  # a build is running (or the directory is read-only): sync in memory only
        try:
            vectors = sync_vectors(store, index_dir, writable=lock is not None, progress=progress)
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
    def source(self) -> FolderSource | ShardSource:
        """Where the indexed images are (a folder, or shards whose members `read_image_bytes` reads)."""
        if self._source is None:
            self._source = open_source(self._meta["root"], self.index_dir)
        return self._source

    def read_image_bytes(self, path: str) -> bytes:
        """The bytes of an indexed image by its recorded path; OSError when it is gone."""
        file = self.source.file_path(path)
        if file is not None:
            return file.read_bytes()
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
