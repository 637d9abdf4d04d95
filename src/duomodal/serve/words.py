"""Text search with words (an index built with --ocr: the words read in the images fused with CLIP,
duomodal.search.hybrid) and with filters (duomodal.search.filters), for the search routes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException

from duomodal.search.filters import FilterError, SearchFilters, filtered_search, filters_from_text
from duomodal.search.hybrid import HybridHit, hybrid_search, split_query
from duomodal.search.query import parse_query, query_vector
from duomodal.search.text_index import STORE_FILE, TextIndex
from duomodal.serve.schemas import SearchFilterFields, SearchMatch


def has_words(index: Any) -> bool:
    """Whether `index` holds words read from its images (an index directory built with --ocr)."""
    index_dir = getattr(index, "index_dir", None)
    if index_dir is None or not (Path(index_dir) / STORE_FILE).is_file():
        return False
    with TextIndex(index_dir) as text_index:
        return bool(text_index.engine())


def search_filters(fields: SearchFilterFields | None) -> SearchFilters:
    """The filters of a request (none: no filter); a value that cannot be read is a 400."""
    if fields is None:
        return SearchFilters()
    try:
        return filters_from_text(fields.folder, fields.after, fields.before, fields.min_size, fields.max_size,
                                 fields.format, fields.min_score, fields.sort)
    except FilterError as e:
        raise HTTPException(status_code=400, detail=str(e)) from None


async def _text_vector(state: Any, text: str) -> np.ndarray:
    """The CLIP vector of a text query, cached like the batched searches' vectors."""
    terms = parse_query(text)
    vector = state.query_vectors.get(state.cache_key(terms))
    if vector is None:
        vector = await asyncio.to_thread(query_vector, state.embedder, terms)
        state.query_vectors.put(state.cache_key(terms), vector)
    return vector


async def hybrid_text_search(state: Any, index: Any, text: str, k: int, text_weight: float,
                             filters: SearchFilters | None = None) -> list[HybridHit]:
    """The hybrid hits of a text query (the CLIP side embeds its text without quotes)."""
    query = split_query(text)
    vector = await _text_vector(state, query.clip_text)

    def search() -> list[HybridHit]:
        with TextIndex(index.index_dir) as text_index:
            return hybrid_search(index, text_index, vector, query, k, text_weight, filters)

    return await asyncio.to_thread(search)


async def filtered_text_search(state: Any, index: Any, text: str, k: int, filters: SearchFilters) -> list:
    """The hits of a text query within `filters` (pictures only)."""
    vector = await _text_vector(state, text)
    try:
        return await asyncio.to_thread(filtered_search, index, vector, k, filters)
    except FilterError as e:
        raise HTTPException(status_code=400, detail=str(e)) from None


def match_of(hit: HybridHit) -> SearchMatch:
    return SearchMatch(fused=hit.fused, clip_rank=hit.clip_rank, text_rank=hit.text_rank,
                       matched_words=list(hit.matched), why=hit.reason)
