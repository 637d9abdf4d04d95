"""Approximate indexes agree with exact search; near-duplicate grouping."""

from __future__ import annotations

import numpy as np
import pytest

from duomodal.search.dedup import group_near_duplicates
from duomodal.search.index import Hit
from duomodal.search.vectors import FaissParams
from duomodal.search.vectors.faiss_store import make_faiss_index, search_params


def clustered_vectors(n: int, dim: int, clusters: int, spread: float, rng) -> np.ndarray:
    """Unit vectors around `clusters` random centres (embeddings cluster; iid noise does not)."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at_10(index_type: str, data: np.ndarray, queries: np.ndarray, params: FaissParams) -> float:
    ids = np.arange(len(data), dtype=np.int64) * 7 + 3  # ids need not be positions
    exact = make_faiss_index("flat", data.shape[1], params)
    exact.add_with_ids(data, ids)
    approx = make_faiss_index(index_type, data.shape[1], params, train_vectors=data)
    approx.add_with_ids(data, ids)
    _, truth = exact.search(queries, 10)
    _, found = approx.search(queries, 10, params=search_params(index_type, params, 10))
    return float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_ann_recall_at_10_against_exact(index_type):
    rng = np.random.default_rng(0)
    data = clustered_vectors(8000, 64, clusters=200, spread=0.35, rng=rng)
    queries = data[rng.choice(len(data), 200, replace=False)] + 0.05 * rng.standard_normal((200, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    recall = recall_at_10(index_type, data, queries, FaissParams())
    assert recall >= 0.95, f"{index_type} recall@10 {recall:.3f}"


def test_group_near_duplicates():
    vectors = np.array([[1, 0, 0], [0.999, 0.0447, 0], [0, 1, 0], [0.0447, 0.999, 0], [0, 0, 1]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    hits = [Hit(i, f"{i}.png", 1.0 - i / 10, 8, 8, None) for i in range(5)]
    groups = group_near_duplicates(hits, vectors, threshold=0.99)
    assert [(g.hit.id, [d.id for d in g.duplicates]) for g in groups] == [(0, [1]), (2, [3]), (4, [])]
    assert len(group_near_duplicates(hits, vectors, threshold=1.0)) == 5
    with pytest.raises(ValueError, match=r"^dedup threshold must be a number in \(0, 1\], got 1.5$"):
        group_near_duplicates(hits, vectors, threshold=1.5)
