"""Text search in an index with words (built with --ocr): the words read in the images fused with
CLIP (duomodal.search.hybrid), for the search routes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from duomodal.search.hybrid import HybridHit, hybrid_search, split_query
from duomodal.search.query import parse_query, query_vector
from duomodal.search.text_index import STORE_FILE, TextIndex
from duomodal.serve.schemas import SearchMatch


def has_words(index: Any) -> bool:
    """Whether `index` holds words read from its images (an index directory built with --ocr)."""
    index_dir = getattr(index, "index_dir", None)
    if index_dir is None or not (Path(index_dir) / STORE_FILE).is_file():
        return False
    with TextIndex(index_dir) as text_index:
        return bool(text_index.engine())


async def hybrid_text_search(state: Any, index: Any, text: str, k: int, text_weight: float) -> list[HybridHit]:
    """The hybrid hits of a text query; the CLIP vector of its unquoted text is cached like any query's."""
    query = split_query(text)
    terms = parse_query(query.clip_text)
    vector = state.query_vectors.get(state.cache_key(terms))
    if vector is None:
        vector = await asyncio.to_thread(query_vector, state.embedder, terms)
        state.query_vectors.put(state.cache_key(terms), vector)

    def search() -> list[HybridHit]:
        with TextIndex(index.index_dir) as text_index:
            return hybrid_search(index, text_index, vector, query, k, text_weight)

    return await asyncio.to_thread(search)


def match_of(hit: HybridHit) -> SearchMatch:
    return SearchMatch(fused=hit.fused, clip_rank=hit.clip_rank, text_rank=hit.text_rank,
                       matched_words=list(hit.matched), why=hit.reason)
