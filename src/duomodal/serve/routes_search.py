"""Search routes: by text, by an uploaded image, by an indexed image ("more like this"); the
images themselves and their thumbnails, by id only."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Depends, File, Form, HTTPException, Path, Query, UploadFile
from fastapi.responses import Response, StreamingResponse

from duomodal.search.hybrid import DEFAULT_TEXT_WEIGHT, MAX_TEXT_WEIGHT
from duomodal.search.query import CancelledQueryError
from duomodal.serve.media import FileChangedError, browser_media_type, encode_png
from duomodal.serve.schemas import (
    MAX_ID,
    MAX_K,
    MAX_QUERY_CHARS,
    TEXT_WEIGHT_HELP,
    ErrorResponse,
    QueryText,
    SearchFilterFields,
    SearchHit,
    SearchResponse,
    TextSearchRequest,
)
from duomodal.serve.protocols import Hit
from duomodal.serve.state import ServerState, server_state
from duomodal.serve.words import filtered_text_search, has_words, hybrid_text_search, match_of, search_filters

# 503: the index's vector store (a Milvus server) did not answer
ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 413, 415, 422, 503)}
IMAGE_RESPONSES = {
    200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "the image"},
    **{status: {"model": ErrorResponse} for status in (404, 422)},
}

ImageId = Annotated[int, Path(ge=0, le=MAX_ID, description="an image id from a search result")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]


def _hits(hits: list[Hit], skip_id: int | None = None, k: int | None = None) -> list[SearchHit]:
    results = [
        SearchHit(
            id=hit.id,
            score=float(hit.score),
            path=str(hit.path),
            width=int(hit.width),
            height=int(hit.height),
            caption=hit.caption,
            image_url=f"/api/image/{hit.id}",
            thumb_url=f"/api/thumb/{hit.id}",
        )
        for hit in hits
        if hit.id != skip_id
    ]
    return results if k is None else results[:k]


def _unknown_id(image_id: int) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no image with id {image_id} in the index")


def _unservable(image_id: int, error: FileChangedError) -> HTTPException:
    return HTTPException(
        status_code=404,
        detail=f"image {image_id} is in the index but {error}: run `duomodal index update` on the index",
    )


def _chunks(file: BinaryIO, size: int = 256 * 1024) -> Iterator[bytes]:
    with file:
        while chunk := file.read(size):
            yield chunk


State = Annotated[ServerState, Depends(server_state)]
router = APIRouter(prefix="/api", tags=["search"])
QueryString = Annotated[
    str,
    Query(min_length=1, max_length=MAX_QUERY_CHARS,
          description='words describing the image; "-word" subtracts, "2*word" weights'),
    QueryText,
]


# The text routes are `async`: they only parse and wait for the batcher (batching.py), so they
# need no worker thread of their own.
async def text_search(state: ServerState, query: str, k: int, text_weight: float = DEFAULT_TEXT_WEIGHT,
                      fields: SearchFilterFields | None = None) -> SearchResponse:
    start = time.perf_counter()
    index = state.current_index()
    filters = search_filters(fields)
    try:
        if text_weight > 0 and has_words(index):
            found = await hybrid_text_search(state, index, query, k, text_weight, filters)
            results = [h.model_copy(update={"words": f.text, "match": match_of(f)})
                       for h, f in zip(_hits([f.hit for f in found]), found)]
            took_ms = (time.perf_counter() - start) * 1000
            return SearchResponse(kind="text", query=query, took_ms=took_ms, results=results)
        if filters.active:
            hits = await filtered_text_search(state, index, query, k, filters)
        else:
            hits = await state.search_text(index, query, k)
    except CancelledQueryError as e:  # valid syntax, only the embedding shows it: an answer, not an error
        took_ms = (time.perf_counter() - start) * 1000
        return SearchResponse(kind="text", query=query, took_ms=took_ms, results=[], note=str(e))
    took_ms = (time.perf_counter() - start) * 1000
    return SearchResponse(kind="text", query=query, took_ms=took_ms, results=_hits(hits))


@router.get("/search", response_model=SearchResponse, responses=ERRORS)
async def search_get(
    q: QueryString,
    state: State,
    k: K = 24,
    text_weight: Annotated[float, Query(ge=0, le=MAX_TEXT_WEIGHT, description=TEXT_WEIGHT_HELP)] = DEFAULT_TEXT_WEIGHT,
    filters: Annotated[SearchFilterFields, Query()] = None,
) -> SearchResponse:
    """Search by text (query string form, for links and quick tests)."""
    return await text_search(state, q, k, text_weight, filters)


@router.post("/search", response_model=SearchResponse, responses=ERRORS)
async def search_post(request: TextSearchRequest, state: State) -> SearchResponse:
    """Search by text."""
    return await text_search(state, request.query, request.k, request.text_weight, request)


@router.post("/search/image", response_model=SearchResponse, responses=ERRORS)
def search_image(
    file: Annotated[UploadFile, File(description="the query image (PNG, JPEG, GIF, WebP, BMP)")],
    state: State,
    k: Annotated[int, Form(ge=1, le=MAX_K)] = 24,
) -> SearchResponse:
    """Search by an uploaded image."""
    name = file.filename or "the upload"
    data = file.file.read(state.files.max_upload_bytes + 1)
    start = time.perf_counter()
    hits = state.current_index().search(state.upload_vector(data, name), k)
    took_ms = (time.perf_counter() - start) * 1000
    return SearchResponse(kind="image", query=name, took_ms=took_ms, results=_hits(hits))


@router.get("/similar/{image_id}", response_model=SearchResponse, responses=ERRORS)
def similar(image_id: ImageId, state: State, k: K = 24) -> SearchResponse:
    """More like this: the images nearest to an indexed image (itself left out)."""
    index = state.current_index()
    if index.get(image_id) is None:
        raise _unknown_id(image_id)
    start = time.perf_counter()
    hits = index.search(index.vector(image_id), min(k + 1, index.count))
    took_ms = (time.perf_counter() - start) * 1000
    results = _hits(hits, skip_id=image_id, k=k)
    return SearchResponse(kind="similar", query=str(image_id), took_ms=took_ms, results=results)


@router.get("/image/{image_id}", response_class=Response, responses=IMAGE_RESPONSES)
def image(image_id: ImageId, state: State) -> Response:
    """The original file of an indexed image (converted to PNG if a browser can't show it)."""
    index, files = state.current_index(), state.files
    hit = index.get(image_id)
    if hit is None:
        raise _unknown_id(image_id)
    media_type = browser_media_type(PurePosixPath(hit.path))
    try:
        if media_type is None:
            return Response(encode_png(files.read_image(index, hit)), media_type="image/png")
        if files.is_member(index, hit):  # a shard member: its bytes as they are in the shard
            return Response(files.read_member(index, hit), media_type=media_type)
        file = files.open_file(index, hit)
    except FileChangedError as e:
        raise _unservable(image_id, e) from None
    size = os.fstat(file.fileno()).st_size
    return StreamingResponse(_chunks(file), media_type=media_type, headers={"Content-Length": str(size)})


@router.get("/thumb/{image_id}", response_class=Response, responses=IMAGE_RESPONSES)
def thumbnail(image_id: ImageId, state: State) -> Response:
    """A small version of an indexed image, at most `thumb_size` pixels on its longer side."""
    files = state.files
    cached = files.thumbnails.get(image_id)
    if cached is None:
        index = state.current_index()
        hit = index.get(image_id)
        if hit is None:
            raise _unknown_id(image_id)
        try:
            cached = files.thumbnail(index, hit)
        except FileChangedError as e:
            raise _unservable(image_id, e) from None
        files.thumbnails.put(image_id, cached)
    data, media_type = cached
    return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=300"})
