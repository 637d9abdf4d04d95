"""Micro-batching of text searches: the queries that arrive together share one CLIP forward and
one faiss search.

Request threads hand their parsed query to `TextSearchBatcher.search` and wait. One worker thread
takes everything queued (up to `max_batch`) whenever it is free, so nothing waits on a timer: a
lone request is served at once, and under a crowd each batch holds the requests that arrived while
the previous one ran. Concurrent requests no longer fight over the cores with one small forward
each, and the tokenizer is only ever used from this one thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from duomodal.search.query import QueryError, combine_terms

logger = logging.getLogger(__name__)
WAIT_S = 60.0  # a request that waits longer than this for the worker gets an error, not a hang


@dataclass(eq=False)
class _Request:
    index: Any
    terms: list[tuple[float, str]]
    k: int
    vector: np.ndarray | None  # from the cache; None: embed it
    notify: Callable[[], None]  # called once, from the worker, when hits or error is set
    finished: bool = False
    hits: list | None = None
    error: BaseException | None = None

    def finish(self, hits: list | None = None, error: BaseException | None = None) -> None:
        self.hits, self.error, self.finished = hits, error, True
        self.notify()


class TextSearchBatcher:
    def __init__(
        self,
        embed_texts: Callable[[list[str]], Any],
        dim: int,
        on_vector: Callable[[list[tuple[float, str]], np.ndarray], None] = lambda terms, vector: None,
        max_batch: int = 64,
    ):
        self.embed_texts = embed_texts
        self.dim = dim
        self.on_vector = on_vector  # e.g. put the vector in the server's query cache
        self.max_batch = max_batch
        self.batch_sizes: list[int] = []  # the last batches' sizes, for tests and the log
        self._queue: list[_Request] = []
        self._wake = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False

    def search(self, index: Any, terms: list[tuple[float, str]], k: int, vector: np.ndarray | None = None) -> list:
        """The hits of the query `terms` (parsed by `parse_query`) in `index`; QueryError as
        `query_vector` raises it. Blocks until the batch holding this request is done."""
        done = threading.Event()
        request = _Request(index, terms, k, vector, done.set)
        self._submit(request)
        if not done.wait(WAIT_S):
            raise TimeoutError(f"the text search worker did not answer within {WAIT_S:.0f} s")
        return self._result(request)

    async def search_async(
        self, index: Any, terms: list[tuple[float, str]], k: int, vector: np.ndarray | None = None
    ) -> list:
        """`search` for the event loop (an `async def` route: no thread-pool hop per request)."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        request = _Request(index, terms, k, vector, lambda: loop.call_soon_threadsafe(done.set))
        self._submit(request)
        try:
            await asyncio.wait_for(done.wait(), WAIT_S)
        except TimeoutError:
            raise TimeoutError(f"the text search worker did not answer within {WAIT_S:.0f} s") from None
        return self._result(request)

    @staticmethod
    def _result(request: _Request) -> list:
        if request.error is not None:
            raise request.error
        return request.hits or []

    def _submit(self, request: _Request) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._queue.append(request)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="duomodal-text-batcher", daemon=True)
                self._worker.start()
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed and not self._queue:
                    return
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                self._answer(batch)
            except BaseException as e:  # noqa: BLE001 - delivered to the waiting requests; the worker lives on
                logger.exception("a batch of %d text searches failed", len(batch))
                for request in batch:
                    if not request.finished:
                        request.finish(error=e)

    def _answer(self, batch: Sequence[_Request]) -> None:
        self.batch_sizes = (self.batch_sizes + [len(batch)])[-100:]
        missing = [r for r in batch if r.vector is None]
        phrases = list(dict.fromkeys(text for r in missing for _, text in r.terms))
        if phrases:
            embedded = np.asarray(self.embed_texts(phrases), dtype=np.float64)
            if embedded.shape != (len(phrases), self.dim):
                raise QueryError(f"the embedder returned shape {embedded.shape}, expected ({len(phrases)}, {self.dim})")
            position = {text: n for n, text in enumerate(phrases)}
            for request in missing:
                rows = embedded[[position[text] for _, text in request.terms]]
                try:
                    request.vector = combine_terms([w for w, _ in request.terms], rows)
                except QueryError as e:
                    request.finish(error=e)
                    continue
                self.on_vector(request.terms, request.vector)
        ready = [r for r in batch if not r.finished]
        by_index: dict[int, list[_Request]] = {}
        for request in ready:
            by_index.setdefault(id(request.index), []).append(request)
        for group in by_index.values():
            index = group[0].index
            k = max(r.k for r in group)
            vectors = np.stack([r.vector for r in group])
            if hasattr(index, "search_batch"):
                found = index.search_batch(vectors, k)
            else:  # an index without batched search (a test double): one call each
                found = [index.search(vector, k) for vector in vectors]
            for request, hits in zip(group, found):
                request.finish(hits=hits[: request.k])
