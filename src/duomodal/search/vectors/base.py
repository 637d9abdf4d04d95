"""What every vector store of an index is, and the change-log sync that keeps one equal to the store.

The SQLite store (``search/store.py``) is the truth: every vector, and a change log of the ids whose
vector appeared, changed or disappeared. A vector store (faiss or Milvus) is derived from it. Two
small protocols meet here:

- ``VectorStore``, what ``ImageIndex`` searches through (count, index type, search, close);
- ``VectorEngine``, what ``sync_changes`` drives to bring one store up to date: it says which change
  number it holds (if its layout is still the wanted one), applies changed ids, rebuilds from every
  stored vector, and records what it holds.

``sync_changes`` is the one sync: apply the log since the engine's change number, check the count
against the store's, else rebuild; then (when writable) record the new change number and prune
the log. An interruption at any point is repaired by the next sync.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from duomodal.search.store import IndexStoreError, MetadataStore

INDEX_TYPES = ("flat", "hnsw", "ivf")
AUTO_EXACT_MAX = 50_000  # "auto" is exact (flat) up to this many vectors, hnsw above


@dataclass(frozen=True)
class FaissParams:
    """Index parameters; Milvus reads them too (the same meaning for its HNSW and IVF_FLAT)."""

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


def choose_index_type(option: str, count: int) -> str:
    """The index type for `count` vectors under `option` ("auto" or one of INDEX_TYPES)."""
    if option == "auto":
        return "flat" if count <= AUTO_EXACT_MAX else "hnsw"
    if option not in INDEX_TYPES:
        raise IndexStoreError(f"index type {option!r} is not one of auto, {', '.join(INDEX_TYPES)}")
    return option


def ivf_list_count(params: FaissParams, count: int) -> int:
    return params.ivf_nlist or max(1, int(4 * math.sqrt(max(count, 1))))


def read_params(meta: dict[str, str]) -> FaissParams:
    return FaissParams(**json.loads(meta.get("faiss_params", "{}")))


class VectorStore(Protocol):
    """A synced vector store, as ``ImageIndex`` searches it. Safe to search from threads."""

    @property
    def count(self) -> int: ...

    @property
    def index_type(self) -> str: ...

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(id, inner product) of the `k` nearest stored vectors to `query` (1, D), best first."""
        ...

    def search_batch(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """`search` for each row of `queries` (B, D) in one call."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SyncPlan:
    """What a sync aims at, read from the store once: the vectors' size, the parameters, how many
    rows there are, the index type they call for and the store's latest change number."""

    dim: int
    params: FaissParams
    count: int
    index_type: str
    seq: int

    @classmethod
    def read(cls, store: MetadataStore) -> SyncPlan:
        meta = store.meta()
        count = store.count()
        index_type = choose_index_type(meta.get("index_type_option", "auto"), count)
        return cls(int(meta["dim"]), read_params(meta), count, index_type, store.last_change())


class VectorEngine(Protocol):
    """One vector store's copy of the store's vectors, as ``sync_changes`` drives it."""

    chunk: int  # changed ids handed to one `apply` call

    def held(self, plan: SyncPlan) -> int | None:
        """The change number the engine holds, or None when it holds nothing usable for `plan`
        (nothing at all, another index type, other parameters): a rebuild."""
        ...

    def apply(self, ids: list[int], vectors: dict[int, np.ndarray]) -> bool:
        """Bring `ids` up to date: those in `vectors` get that vector, the others are removed.
        False when the engine cannot (a rebuild follows)."""
        ...

    def finish_changes(self) -> None:
        """Make what `apply` wrote durable and searchable."""
        ...

    def count(self) -> int: ...

    def rebuild(self, store: MetadataStore, plan: SyncPlan, progress: Callable | None) -> None:
        """Start over from every stored vector, in `plan`'s layout."""
        ...

    def save(self, plan: SyncPlan) -> None:
        """Record that the engine holds every change up to `plan.seq` (persisted)."""
        ...


def sync_changes(
    store: MetadataStore, engine: VectorEngine, writable: bool, progress: Callable | None = None
) -> SyncPlan:
    """Bring `engine` to exactly the store's vectors; when `writable`, record it and prune the log.

    Applies the change log since the engine's change number; rebuilds when the engine holds nothing
    usable, is older than the log (pruned by a sync of another store the index used since), cannot
    apply a change, or ends with another count than the store's.
    """
    plan = SyncPlan.read(store)
    held = engine.held(plan)
    current = held is not None and store.oldest_change() - 1 <= held <= plan.seq
    if current and held < plan.seq:
        current = apply_changes(store, engine, plan.dim, held)
    current = current and engine.count() == plan.count
    if not current:
        engine.rebuild(store, plan, progress)
    if writable and (not current or held != plan.seq):
        engine.save(plan)
        store.forget_changes(plan.seq)
        if store.get_meta("index_type") != plan.index_type:
            store.set_meta({"index_type": plan.index_type})
    return plan


def apply_changes(store: MetadataStore, engine: VectorEngine, dim: int, after: int) -> bool:
    """Hand the engine every id changed since change `after`, `engine.chunk` at a time, with its
    vector where it still has one; False as soon as the engine cannot apply a chunk."""
    ids = store.changed_ids(after)
    for start in range(0, len(ids), engine.chunk):
        chunk = ids[start : start + engine.chunk]
        if not engine.apply(chunk, store.vectors(chunk, dim)):
            return False
    if ids:
        engine.finish_changes()
    return True


def load_every_vector(
    store: MetadataStore,
    plan: SyncPlan,
    add: Callable[[np.ndarray, np.ndarray], None],
    chunk: int,
    desc: str,
    progress: Callable | None,
) -> None:
    """`add(ids (n,), vectors (n, D))` for every stored vector, `chunk` at a time, with a progress bar."""
    bar = progress(total=plan.count, desc=desc, unit="vec") if progress else None
    for ids, vectors in store.iter_vectors(plan.dim, chunk=chunk):
        add(ids, vectors)
        if bar is not None:
            bar.update(len(ids))
    if bar is not None:
        bar.close()
