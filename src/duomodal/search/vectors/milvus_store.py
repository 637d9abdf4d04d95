"""Milvus as the vector engine of an index: milvus-lite (a local file) or a Milvus server or cluster.

The SQLite store stays the truth (paths, hashes, captions and every vector); a Milvus collection is
derived from it exactly as the faiss file is. The collection holds ``id`` (the store's row id,
primary key) and ``vector`` (FLOAT_VECTOR, inner product). After a sync the store's meta records
what the collection holds (``milvus_state``: where, the change number, the index type and params),
so the next sync (``base.sync_changes``, shared with faiss) applies only the change log since then:
deletes, then upserts by id, both idempotent, so an interruption at any point is repaired by the
next sync. Anything else (a missing collection, another index type, a count that disagrees with the
store) is a rebuild from the stored vectors. A sync ends with a flush and a count: a sync that returned has every row in Milvus's
persisted segments, and a server that restarts afterwards still holds them.

A collection carries the ``index_id`` of the index that made it; a sync never drops or writes a
collection another index owns (checked again right before a drop and right after a create, so two
builds racing for one collection on a server end with one owner and one clear refusal).

Store specs and connection settings: ``milvus_target.py``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np

from duomodal.search.store import IndexStoreError, MetadataStore, VectorStoreUnavailable
from duomodal.search.vectors.base import (
    FaissParams,
    SyncPlan,
    choose_index_type,
    ivf_list_count,
    load_every_vector,
    read_params,
    sync_changes,
)
from duomodal.search.vectors.milvus_target import ConnectionSettings, MilvusTarget, connect, milvus_error_text

OWNER_PROPERTY = "duomodal.index"  # collection property naming the index (meta `index_id`) that owns it
INSERT_CHUNK = 5_000  # vectors per insert call (a 512-d chunk is ~10 MB, under gRPC's message limit)
_MILVUS_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}


class _Calls:
    """Per-request timeouts for one target: None for milvus-lite (in process), the resolved
    connection settings for a server."""

    def __init__(self, target: MilvusTarget):
        settings = None if target.is_lite else ConnectionSettings.resolve(target)
        self.request = None if settings is None else settings.timeout
        self.wait = None if settings is None else settings.wait_timeout


class MilvusVectors:
    """Search over a synced collection (a ``VectorStore``)."""

    def __init__(self, client, target: MilvusTarget, index_type: str, search_params: dict, count: int):
        self._client = client
        self.target = target
        self.index_type = index_type
        self._search_params = search_params
        self.count = count
        self._timeout = _Calls(target).request
        # milvus-lite's client is not documented as thread-safe; a server's gRPC client is
        self._lock = threading.Lock() if target.is_lite else contextlib.nullcontext()
        # A server answers reads at "Bounded" consistency (at most its gracefulTime, 5 s, stale), not
        # "Strong" (which waits for the next time tick, ~200 ms a query). A sync ends with a Strong
        # count, after which every row it wrote is visible to Bounded reads.
        self._read_options = {} if target.is_lite else {"consistency_level": "Bounded"}

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(id, inner product) of the `k` nearest stored vectors to `query` (1, D), best first."""
        return self.search_batch(query[:1], k)[0]

    def search_batch(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """`search` for each row of `queries` (B, D) in one request."""
        params = {"metric_type": "IP", "params": self._search_params}
        with _server_errors(self.target, "search", error_type=VectorStoreUnavailable), self._lock:
            result = self._client.search(
                self.target.collection, data=[q.tolist() for q in queries], limit=k, search_params=params,
                output_fields=[], timeout=self._timeout, **self._read_options,
            )
        return [[(int(hit["id"]), float(hit["distance"])) for hit in hits] for hits in result]

    def close(self) -> None:
        with self._lock:
            self._client.close()


@contextlib.contextmanager
def _server_errors(target: MilvusTarget, doing: str, index_dir=None, error_type=IndexStoreError):
    """pymilvus errors as an IndexStoreError (or `error_type`) naming the store and what to do."""
    from pymilvus.exceptions import MilvusException  # lazily: pymilvus is an optional extra

    try:
        yield
    except MilvusException as e:
        advice = (f"; nothing is lost (the index's SQLite store keeps every vector): run 'duomodal index update "
                  f"{index_dir}' when the server answers again") if index_dir is not None else ""
        raise error_type(f"Milvus at {target.spec} failed during the {doing}: {milvus_error_text(e)}{advice}") \
            from None


def index_params(index_type: str, params: FaissParams, count: int) -> tuple[dict, dict]:
    """(build params, search params) for a Milvus index of `index_type`."""
    if index_type == "hnsw":
        return {"M": params.hnsw_m, "efConstruction": params.hnsw_ef_construction}, {"ef": params.hnsw_ef_search}
    if index_type == "ivf":
        return {"nlist": min(ivf_list_count(params, count), 65_536)}, {"nprobe": params.ivf_nprobe}
    return {}, {}


def _check_owner(client, target: MilvusTarget, owner: str, calls: _Calls) -> None:
    properties = client.describe_collection(target.collection, timeout=calls.request).get("properties", {})
    found = properties.get(OWNER_PROPERTY)
    if found != owner or not owner:
        raise IndexStoreError(
            f"Milvus collection {target.collection!r} at {target.spec} belongs to another index "
            f"({found or 'not a duomodal index'}); choose another collection or file"
        )


def open_milvus(store: MetadataStore, writable: bool, progress: Callable | None = None) -> MilvusVectors:
    """The Milvus collection brought up to date with the store (when `writable`), ready to search.

    A reader that is not `writable` (a build holds the index) searches the collection as it is;
    hits whose rows are gone are dropped by ``ImageIndex.search``. Raises IndexStoreError when the
    server cannot be reached or fails part-way (the store is untouched; the next sync repairs).
    """
    target = MilvusTarget.parse(store.meta()["vector_store"])
    client = connect(target)
    try:
        with _server_errors(target, "sync" if writable else "opening of the index", store.path.parent):
            engine = MilvusEngine(client, target, store, writable)
            if not writable:
                return engine.reader()
            plan = sync_changes(store, engine, writable=True, progress=progress)
            _, search = index_params(plan.index_type, plan.params, plan.count)
            return MilvusVectors(client, target, plan.index_type, search, plan.count)
    except BaseException:
        client.close()
        raise


class MilvusEngine:
    """One index's collection, as ``sync_changes`` drives it (see ``base.VectorEngine``)."""

    def __init__(self, client, target: MilvusTarget, store: MetadataStore, writable: bool):
        self.client = client
        self.target = target
        self.calls = _Calls(target)
        self._store = store
        meta = store.meta()
        self.state = json.loads(meta.get("milvus_state", "{}"))
        self.owner = meta.get("index_id", "")
        if not self.owner and writable:  # an index made before it had an id
            self.owner = uuid.uuid4().hex
            store.set_meta({"index_id": self.owner})
        self.exists = client.has_collection(target.collection, timeout=self.calls.request)
        if self.exists:
            _check_owner(client, target, self.owner, self.calls)
            client.load_collection(target.collection, timeout=self.calls.wait)  # released after a restart

    @property
    def chunk(self) -> int:
        return INSERT_CHUNK

    def reader(self) -> MilvusVectors:
        """The collection as it is, for a reader that may not sync it."""
        if not self.exists:
            raise IndexStoreError(
                f"{self.target.spec} has no collection {self.target.collection!r} yet; "
                "finish the build with 'duomodal index update'"
            )
        meta = self._store.meta()
        params, count = read_params(meta), self._store.count()
        recorded = self.state.get("index_type", choose_index_type(meta.get("index_type_option", "auto"), count))
        _, search = index_params(recorded, params, count)
        return MilvusVectors(self.client, self.target, recorded, search, self.count())

    def _layout(self, plan: SyncPlan) -> dict:
        # `location`, not `spec`: another timeout or TLS setting reaches the same collection
        build, _ = index_params(plan.index_type, plan.params, plan.count)
        return {"store": self.target.location, "index_type": plan.index_type, "build_params": build}

    def held(self, plan: SyncPlan) -> int | None:
        layout = self._layout(plan)
        if not self.exists or {k: self.state.get(k) for k in layout} != layout:
            return None
        return int(self.state["seq"])

    def apply(self, ids: list[int], vectors: dict[int, np.ndarray]) -> bool:
        gone = [i for i in ids if i not in vectors]
        if gone:
            self.client.delete(self.target.collection, ids=gone, timeout=self.calls.request)
        if vectors:
            rows = [{"id": i, "vector": v.tolist()} for i, v in sorted(vectors.items())]
            self.client.upsert(self.target.collection, rows, timeout=self.calls.request)
        return True

    def finish_changes(self) -> None:
        _flush(self.client, self.target.collection, self.calls)

    def count(self) -> int:
        rows = self.client.query(self.target.collection, filter="", output_fields=["count(*)"],
                                 timeout=self.calls.request)
        return int(rows[0]["count(*)"])

    def rebuild(self, store: MetadataStore, plan: SyncPlan, progress: Callable | None) -> None:
        """Drop and create the collection (never another index's), load every stored vector, flush,
        and check the count."""
        self._create(plan)
        collection = self.target.collection

        def insert(ids: np.ndarray, vectors: np.ndarray) -> None:
            rows = [{"id": int(i), "vector": v.tolist()} for i, v in zip(ids, vectors)]
            self.client.insert(collection, rows, timeout=self.calls.request)

        load_every_vector(store, plan, insert, INSERT_CHUNK, f"loading Milvus ({plan.index_type})", progress)
        _flush(self.client, collection, self.calls)
        found = self.count()
        if found != plan.count:
            raise IndexStoreError(
                f"Milvus at {self.target.spec} holds {found} vectors after loading {plan.count}; run "
                f"'duomodal index update {store.path.parent}' again (it rebuilds the collection)"
            )

    def _create(self, plan: SyncPlan) -> None:
        from pymilvus import DataType  # lazily: pymilvus is an optional extra
        from pymilvus.exceptions import MilvusException  # lazily, as above

        client, collection, calls = self.client, self.target.collection, self.calls
        if client.has_collection(collection, timeout=calls.request):
            _check_owner(client, self.target, self.owner, calls)  # again, right before the drop: never drop another's
            client.drop_collection(collection, timeout=calls.request)
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=plan.dim)
        index = client.prepare_index_params()
        build = self._layout(plan)["build_params"]
        index.add_index("vector", index_type=_MILVUS_TYPES[plan.index_type], metric_type="IP", params=build)
        try:
            client.create_collection(collection, schema=schema, index_params=index, timeout=calls.wait,
                                     consistency_level="Strong", properties={OWNER_PROPERTY: self.owner})
        except MilvusException:
            if client.has_collection(collection, timeout=calls.request):
                _check_owner(client, self.target, self.owner, calls)  # another index's build created it first
            raise
        _check_owner(client, self.target, self.owner, calls)  # the same, where the server took the create as a no-op
        self.exists = True

    def save(self, plan: SyncPlan) -> None:
        self.state = {**self._layout(plan), "seq": plan.seq}
        self._store.set_meta({"milvus_state": json.dumps(self.state, sort_keys=True)})


def _flush(client, collection: str, calls: _Calls) -> None:
    """Seal and persist what was written, then (on a server) wait until the index covers it.

    milvus-lite brute-forces unsealed rows in Python; a server searches unsealed rows and sealed
    ones not yet indexed with a temporary index of lower recall.
    """
    client.flush(collection, timeout=calls.wait)
    if calls.wait is None:
        return
    deadline = time.monotonic() + calls.wait
    while True:
        info = client.describe_index(collection, "vector", timeout=calls.request)
        if info.get("state") == "Failed":
            raise IndexStoreError(f"Milvus could not index {collection!r}: {info.get('index_state_fail_reason', '')}")
        if int(info.get("pending_index_rows", 0)) == 0:
            return
        if time.monotonic() > deadline:
            raise IndexStoreError(
                f"Milvus has not indexed {info.get('pending_index_rows')} rows of {collection!r} after "
                f"{calls.wait:.0f} s (wait_timeout); the rows are stored and searchable, run the update again later"
            )
        time.sleep(0.5)
