"""Milvus as the vector engine of an index: milvus-lite (a local file) or a Milvus server or cluster.

The SQLite store stays the truth (paths, hashes, captions and every vector); a Milvus collection is
derived from it exactly as the faiss file is. The collection holds ``id`` (the store's row id,
primary key) and ``vector`` (FLOAT_VECTOR, inner product). After a sync the store's meta records
what the collection holds (``milvus_state``: the store, the change number, the index type and
params), so the next sync applies only the change log since then: deletes, then upserts by id, both
idempotent, so an interruption at any point is repaired by the next sync. Anything else (a missing
collection, another index type) is a rebuild from the stored vectors.

Store specs (``--store``): ``milvus:PATH`` (milvus-lite, one process at a time per file) and
``milvus://HOST:PORT/COLLECTION`` (a server; the token, if any, from ``$MILVUS_TOKEN``).
"""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duomodal.search.store import IndexStoreError, MetadataStore

LITE_COLLECTION = "duomodal_images"
OWNER_PROPERTY = "duomodal.index"  # collection property naming the index (meta `index_id`) that owns it
INSERT_CHUNK = 5_000  # vectors per insert call (a 512-d chunk is ~10 MB, under gRPC's message limit)
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_MILVUS_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}


@dataclass(frozen=True)
class MilvusTarget:
    uri: str  # what MilvusClient opens: an absolute .db path (lite) or http://HOST:PORT
    collection: str

    @property
    def is_lite(self) -> bool:
        return not self.uri.startswith("http://")

    @property
    def spec(self) -> str:
        """The canonical store spec, as recorded in the index meta."""
        if self.is_lite:
            return f"milvus:{self.uri}"
        return f"milvus://{self.uri.removeprefix('http://')}/{self.collection}"

    @classmethod
    def parse(cls, spec: str) -> MilvusTarget:
        """``milvus:PATH`` (relative paths are resolved now) or ``milvus://HOST:PORT/COLLECTION``."""
        if spec.startswith("milvus://"):
            match = re.fullmatch(r"milvus://([^/:]+):(\d{1,5})/(.+)", spec)
            if match is None:
                raise ValueError(f"store {spec!r} is not of the form milvus://HOST:PORT/COLLECTION")
            host, port, collection = match.groups()
            if not _COLLECTION_NAME.fullmatch(collection):
                raise ValueError(
                    f"Milvus collection name {collection!r} must start with a letter or _ and hold only "
                    "letters, digits and _"
                )
            return cls(f"http://{host}:{port}", collection)
        if spec.startswith("milvus:"):
            path = spec.removeprefix("milvus:")
            if not path.endswith(".db"):
                raise ValueError(f"store {spec!r}: a milvus-lite file name must end in .db, e.g. milvus:./icons.db")
            return cls(str(Path(path).resolve()), LITE_COLLECTION)
        raise ValueError(f"store {spec!r} is not milvus:PATH.db or milvus://HOST:PORT/COLLECTION")


def connect(target: MilvusTarget):
    """A MilvusClient for `target`; IndexStoreError (with what to do) when it cannot be opened."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise IndexStoreError(
            "this index keeps its vectors in Milvus; install pymilvus and milvus-lite "
            "(pip install 'duomodal[milvus]')"
        ) from None
    if target.is_lite:
        Path(target.uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri=target.uri, token=os.environ.get("MILVUS_TOKEN", ""))
    except Exception as e:  # pymilvus raises its own exception types, of several kinds
        extra = (
            " (milvus-lite serves one process at a time: is another duomodal process using this file?)"
            if target.is_lite else ""
        )
        raise IndexStoreError(f"cannot open Milvus at {target.spec}: {e}{extra}") from None


class MilvusVectors:
    """Search over a synced collection (the vector backend of ``ImageIndex`` for Milvus stores)."""

    def __init__(self, client, target: MilvusTarget, index_type: str, search_params: dict, count: int):
        self._client = client
        self.target = target
        self.index_type = index_type
        self._search_params = search_params
        self.count = count
        self._lock = threading.Lock()  # milvus-lite's client is not documented as thread-safe

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(id, inner product) of the `k` nearest stored vectors to `query` (1, D), best first."""
        return self.search_batch(query[:1], k)[0]

    def search_batch(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """`search` for each row of `queries` (B, D) in one request."""
        params = {"metric_type": "IP", "params": self._search_params}
        with self._lock:
            result = self._client.search(
                self.target.collection, data=[q.tolist() for q in queries], limit=k, search_params=params,
                output_fields=[],
            )
        return [[(int(hit["id"]), float(hit["distance"])) for hit in hits] for hits in result]

    def close(self) -> None:
        with self._lock:
            self._client.close()


def _index_params(index_type: str, params, count: int) -> tuple[dict, dict]:
    """(build params, search params) for a Milvus index of `index_type`."""
    from duomodal.search.index import ivf_list_count

    if index_type == "hnsw":
        return {"M": params.hnsw_m, "efConstruction": params.hnsw_ef_construction}, {"ef": params.hnsw_ef_search}
    if index_type == "ivf":
        return {"nlist": min(ivf_list_count(params, count), 65_536)}, {"nprobe": params.ivf_nprobe}
    return {}, {}


def _collection_count(client, collection: str) -> int:
    rows = client.query(collection, filter="", output_fields=["count(*)"])
    return int(rows[0]["count(*)"])


def sync_milvus(store: MetadataStore, writable: bool, progress: Callable | None = None) -> MilvusVectors:
    """The Milvus collection brought up to date with the store (when `writable`), ready to search.

    A reader that is not `writable` (a build holds the index) searches the collection as it is;
    hits whose rows are gone are dropped by ``ImageIndex.search``.
    """
    from duomodal.search.index import choose_index_type, read_params

    meta = store.meta()
    target = MilvusTarget.parse(meta["vector_store"])
    dim = int(meta["dim"])
    params = read_params(meta)
    count = store.count()
    wanted = choose_index_type(meta.get("index_type_option", "auto"), count)
    build_params, search_params = _index_params(wanted, params, count)
    state = json.loads(meta.get("milvus_state", "{}"))
    seq = store.last_change()
    client = connect(target)
    try:
        owner = meta.get("index_id", "")
        if not owner and writable:  # an index made before it had an id
            owner = uuid.uuid4().hex
            store.set_meta({"index_id": owner})
        exists = client.has_collection(target.collection)
        if exists:
            found = client.describe_collection(target.collection).get("properties", {}).get(OWNER_PROPERTY)
            if found != owner or not owner:
                raise IndexStoreError(
                    f"Milvus collection {target.collection!r} at {target.spec} belongs to another index "
                    f"({found or 'not a duomodal index'}); choose another collection or file"
                )
            client.load_collection(target.collection)  # released after a restart; a no-op when loaded
        if not writable:
            if not exists:
                raise IndexStoreError(
                    f"{target.spec} has no collection {target.collection!r} yet; "
                    "finish the build with 'duomodal index update'"
                )
            recorded = state.get("index_type", wanted)
            _, recorded_search = _index_params(recorded, params, count)
            count_now = _collection_count(client, target.collection)
            return MilvusVectors(client, target, recorded, recorded_search, count_now)
        same_layout = {"store": target.spec, "index_type": wanted, "build_params": build_params}
        current = exists and {k: state.get(k) for k in same_layout} == same_layout and state.get("seq", -1) <= seq
        if current:
            _apply_changes(client, target.collection, store, dim, int(state["seq"]))
            current = _collection_count(client, target.collection) == count
        if not current:
            _rebuild(client, target.collection, store, owner, dim, wanted, build_params, count, progress)
        store.set_meta({"milvus_state": json.dumps({**same_layout, "seq": seq}, sort_keys=True),
                        "index_type": wanted})
        store.forget_changes(seq)
        return MilvusVectors(client, target, wanted, search_params, _collection_count(client, target.collection))
    except BaseException:
        client.close()
        raise


def _apply_changes(client, collection: str, store: MetadataStore, dim: int, after: int) -> None:
    ids = store.changed_ids(after)
    for start in range(0, len(ids), INSERT_CHUNK):
        chunk = ids[start : start + INSERT_CHUNK]
        vectors = store.vectors(chunk, dim)
        gone = [i for i in chunk if i not in vectors]
        if gone:
            client.delete(collection, ids=gone)
        if vectors:
            client.upsert(collection, [{"id": i, "vector": v.tolist()} for i, v in sorted(vectors.items())])
    if ids:
        client.flush(collection)  # seal what was written: unsealed rows are searched without the index


def _rebuild(client, collection: str, store: MetadataStore, owner: str, dim: int, index_type: str,
             build_params: dict, count: int, progress: Callable | None) -> None:
    from pymilvus import DataType

    if client.has_collection(collection):
        client.drop_collection(collection)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index_params = client.prepare_index_params()
    index_params.add_index("vector", index_type=_MILVUS_TYPES[index_type], metric_type="IP", params=build_params)
    client.create_collection(collection, schema=schema, index_params=index_params,
                             consistency_level="Strong", properties={OWNER_PROPERTY: owner})
    bar = progress(total=count, desc=f"loading Milvus ({index_type})", unit="vec") if progress else None
    for ids, vectors in store.iter_vectors(dim, chunk=INSERT_CHUNK):
        client.insert(collection, [{"id": int(i), "vector": v.tolist()} for i, v in zip(ids, vectors)])
        if bar is not None:
            bar.update(len(ids))
    client.flush(collection)  # seal and index the segments (milvus-lite brute-forces unsealed rows in Python)
    if bar is not None:
        bar.close()
