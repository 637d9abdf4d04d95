"""The vector stores of an index behind one protocol: faiss (the default) and Milvus.

``open_vectors`` picks the one the store's meta names (``vector_store``: "faiss", "milvus:PATH.db"
or "milvus://HOST:PORT/COLLECTION") and brings it up to date with the store through the one
change-log sync (``base.sync_changes``); ``ImageIndex`` searches the ``VectorStore`` it returns,
so everything above this package is the same for both.

    base.py           the protocols, the index parameters and types, the change-log sync
    faiss_store.py    a faiss file in the index directory
    milvus_store.py   a Milvus collection (milvus-lite or a server); milvus_target.py: where and how to connect
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from duomodal.search.store import MetadataStore
from duomodal.search.vectors.base import AUTO_EXACT_MAX, INDEX_TYPES, FaissParams, VectorStore
from duomodal.search.vectors.faiss_store import open_faiss
from duomodal.search.vectors.milvus_store import open_milvus
from duomodal.search.vectors.milvus_target import MilvusTarget, connect

__all__ = [
    "AUTO_EXACT_MAX",
    "INDEX_TYPES",
    "FaissParams",
    "VectorStore",
    "check_vector_store",
    "open_vectors",
    "vector_store_spec",
]


def vector_store_spec(spec: str) -> str:
    """The canonical form of a ``--store`` value: "faiss", "milvus:/abs/path.db" or
    "milvus://HOST:PORT/COLLECTION"; ValueError naming the value otherwise."""
    if spec == "faiss":
        return spec
    return MilvusTarget.parse(spec).spec


def check_vector_store(spec: str) -> None:
    """IndexStoreError now when the vector store `spec` cannot be reached (a Milvus server that is
    down, refuses the credentials...), so a build fails before it embeds anything."""
    if spec.startswith("milvus://"):
        connect(MilvusTarget.parse(spec)).close()


def open_vectors(
    store: MetadataStore, index_dir: Path, writable: bool, progress: Callable | None = None
) -> VectorStore:
    """The index's vector store (faiss or Milvus, from the store's meta `vector_store`), holding
    exactly the store's vectors (saved when `writable`)."""
    if store.get_meta("vector_store") in (None, "", "faiss"):
        return open_faiss(store, index_dir, writable, progress)
    return open_milvus(store, writable, progress)
