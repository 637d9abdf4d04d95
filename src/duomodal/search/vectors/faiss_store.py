"""faiss as the vector store of an index (the default): a file in the index directory.

    INDEX_DIR/vectors.<seq>.faiss    faiss index holding every vector up to change number <seq>

The file is written atomically under a name carrying the last change it includes; opening an index
loads the newest one and ``sync_changes`` applies what the store's change log holds since then (or
rebuilds from the stored vectors), so an interruption at any point loses nothing. A reader that may
not write (a build holds the index) syncs in memory only.

Index types: ``flat`` (exact inner product), ``hnsw`` (graph, approximate, no removal: a deletion
means a rebuild), ``ivf`` (inverted lists, approximate, trained once on a sample).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from duomodal.search.store import IndexStoreError, MetadataStore
from duomodal.search.vectors.base import (
    INDEX_TYPES,
    FaissParams,
    SyncPlan,
    ivf_list_count,
    load_every_vector,
    read_params,
    sync_changes,
)

_FAISS_GLOB = "vectors.*.faiss"
_CHUNK = 10_000  # vectors per add call (bounded memory while rebuilding)


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


def _faiss_files(index_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in index_dir.glob(_FAISS_GLOB):
        try:
            found.append((int(path.name.split(".")[1]), path))
        except ValueError:
            continue
    return sorted(found)


class FaissEngine:
    """The faiss file of an index directory, as ``sync_changes`` drives it (see ``base.VectorEngine``)."""

    chunk = _CHUNK

    def __init__(self, index_dir: Path):
        self.index_dir = index_dir
        self.index: faiss.Index | None = None

    def held(self, plan: SyncPlan) -> int | None:
        files = _faiss_files(self.index_dir)
        if not files or files[-1][0] > plan.seq:
            return None
        saved_seq, path = files[-1]
        index = faiss.read_index(str(path))
        if faiss_index_type(index) != plan.index_type or index.d != plan.dim:
            return None
        self.index = index
        return saved_seq

    def apply(self, ids: list[int], vectors: dict[int, np.ndarray]) -> bool:
        changed = np.array(ids, dtype=np.int64)
        if faiss_index_type(self.index) == "hnsw":
            if np.isin(changed, faiss.vector_to_array(self.index.id_map)).any():
                return False  # hnsw cannot remove: rebuild
        else:
            self.index.remove_ids(changed)
        if vectors:
            add_ids = np.array(sorted(vectors), dtype=np.int64)
            self.index.add_with_ids(np.stack([vectors[i] for i in add_ids]), add_ids)
        return True

    def finish_changes(self) -> None:
        pass  # the index is in memory; `save` writes it

    def count(self) -> int:
        return int(self.index.ntotal)

    def rebuild(self, store: MetadataStore, plan: SyncPlan, progress: Callable | None) -> None:
        train = None
        if plan.index_type == "ivf":
            train = store.sample_vectors(plan.dim, ivf_training_size(plan.params, plan.count))
        index = make_faiss_index(plan.index_type, plan.dim, plan.params, train)
        load_every_vector(store, plan, lambda ids, vectors: index.add_with_ids(vectors, ids), self.chunk,
                          f"building {plan.index_type} index", progress)
        self.index = index

    def save(self, plan: SyncPlan) -> None:
        """Write the index as vectors.<seq>.faiss (atomically), then delete the older files."""
        path = self.index_dir / f"vectors.{plan.seq:012d}.faiss"
        tmp = self.index_dir / f".{path.name}.{os.getpid()}.tmp"
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for old_seq, old in _faiss_files(self.index_dir):
            if old_seq != plan.seq:
                old.unlink(missing_ok=True)


class FaissVectors:
    """Search over a synced faiss index (a ``VectorStore``)."""

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


def open_faiss(
    store: MetadataStore, index_dir: Path, writable: bool, progress: Callable | None = None
) -> FaissVectors:
    """The faiss index holding exactly the store's vectors; saved (and the log pruned) if `writable`."""
    engine = FaissEngine(index_dir)
    sync_changes(store, engine, writable, progress)
    return FaissVectors(engine.index, read_params(store.meta()))
