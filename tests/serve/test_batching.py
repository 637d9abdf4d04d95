"""Micro-batched text search (batching.py): requests that arrive together share one embedding call
and one index search, and each gets exactly the answer it would get alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from duomodal.search.query import QueryError, parse_query, query_vector
from duomodal.serve.app import create_app
from duomodal.serve.batching import TextSearchBatcher

pytestmark = pytest.mark.timeout(60)
QUERIES = ["red circle", "blue square", "2*green -triangle", "yellow", "triangle +0.5*blue", "circle -red"]


class CountingIndex:
    """The fake index, counting batched searches; each search waits a little so requests pile up."""

    def __init__(self, index):
        self.inner = index
        self.batches: list[int] = []
        self.gate = threading.Event()

    def search_batch(self, vectors, k):
        self.gate.wait(5)
        self.batches.append(len(vectors))
        return [self.inner.search(vector, k) for vector in vectors]


def test_requests_that_arrive_together_share_one_embedding_and_one_search(fake_index, fake_clip):
    calls: list[list[str]] = []

    def embed_texts(texts):
        calls.append(list(texts))
        return fake_clip.embed_texts(texts)

    batcher = TextSearchBatcher(embed_texts, fake_clip.dim)
    index = CountingIndex(fake_index)
    results: dict[str, list] = {}
    first = threading.Thread(target=lambda: results.update(first=batcher.search(index, parse_query("red"), 3)))
    first.start()  # the worker takes it alone and waits at the gate; the others queue meanwhile
    while not calls:
        threading.Event().wait(0.005)
    threads = [threading.Thread(target=lambda q=q: results.update({q: batcher.search(index, parse_query(q), 5)}))
               for q in QUERIES]
    for thread in threads:
        thread.start()
    while len(batcher._queue) < len(QUERIES):
        threading.Event().wait(0.005)
    index.gate.set()
    for thread in (first, *threads):
        thread.join(10)
    batcher.close()
    assert index.batches == [1, len(QUERIES)]
    assert len(calls) == 2 and sorted(calls[1]) == sorted({t for q in QUERIES for _, t in parse_query(q)})
    for query in QUERIES:  # the same answer as one search alone
        alone = fake_index.search(query_vector(fake_clip, parse_query(query)), 5)
        assert [h.id for h in results[query]] == [h.id for h in alone]
        assert np.allclose([h.score for h in results[query]], [h.score for h in alone])


def test_one_bad_query_in_a_batch_fails_alone(fake_index, fake_clip):
    batcher = TextSearchBatcher(fake_clip.embed_texts, fake_clip.dim)
    with pytest.raises(QueryError, match="cancel out"):
        batcher.search(fake_index, [(1.0, "red"), (-1.0, "red")], 3)
    assert len(batcher.search(fake_index, parse_query("red"), 3)) == 3

    def broken(texts):
        raise RuntimeError("the CLIP broke")

    broken_batcher = TextSearchBatcher(broken, fake_clip.dim)
    with pytest.raises(RuntimeError, match="the CLIP broke"):
        broken_batcher.search(fake_index, parse_query("red"), 3)
    with pytest.raises(RuntimeError, match="the CLIP broke"):  # the worker survived the first failure
        broken_batcher.search(fake_index, parse_query("blue"), 3)


def test_concurrent_http_searches_all_get_their_own_answers(fake_index, fake_clip):
    app = create_app(fake_index, fake_clip)
    with TestClient(app, base_url="http://localhost") as client:
        expected = {q: client.get("/api/search", params={"q": q, "k": 4}).json()["results"] for q in QUERIES}
        got: dict[str, list] = {}

        def ask(query: str) -> None:
            got[query] = client.get("/api/search", params={"q": query, "k": 4}).json()["results"]

        threads = [threading.Thread(target=ask, args=(q,)) for q in QUERIES * 3]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert got == expected
