"""Search routes: by text, by an uploaded image, by an indexed image ("more like this"); the
images themselves and their thumbnails, by id only."""

from __future__ import annotations

import time
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Path, Query, UploadFile
from fastapi.responses import FileResponse, Response

from duomodal.serve.media import browser_media_type, decode_upload, encode_png, make_thumbnail, read_image_file
from duomodal.serve.schemas import (
    MAX_ID,
    MAX_K,
    MAX_QUERY_CHARS,
    ErrorResponse,
    SearchHit,
    SearchResponse,
    TextSearchRequest,
    Words,
)
from duomodal.serve.state import ServerState

ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 413, 415, 422)}
IMAGE_RESPONSES = {
    200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "the image"},
    **{status: {"model": ErrorResponse} for status in (404, 422)},
}

ImageId = Annotated[int, Path(ge=0, le=MAX_ID, description="an image id from a search result")]
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]


def _hits(state: ServerState, hits, skip_id: int | None = None, k: int | None = None) -> list[SearchHit]:
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


def make_search_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["search"])

    def text_search(query: str, k: int) -> SearchResponse:
        start = time.perf_counter()
        hits = state.current_index().search(state.text_vector(query), k)
        took_ms = (time.perf_counter() - start) * 1000
        return SearchResponse(kind="text", query=query, took_ms=took_ms, results=_hits(state, hits))

    @router.get("/search", response_model=SearchResponse, responses=ERRORS)
    def search_get(
        q: Annotated[
            str,
            Query(
                min_length=1,
                max_length=MAX_QUERY_CHARS,
                description='words describing the image; "-word" subtracts, "2*word" weights',
            ),
            Words,
        ],
        k: K = 24,
    ) -> SearchResponse:
        """Search by text (query string form, for links and quick tests)."""
        return text_search(q, k)

    @router.post("/search", response_model=SearchResponse, responses=ERRORS)
    def search_post(request: TextSearchRequest) -> SearchResponse:
        """Search by text."""
        return text_search(request.query, request.k)

    @router.post("/search/image", response_model=SearchResponse, responses=ERRORS)
    def search_image(
        file: Annotated[UploadFile, File(description="the query image (PNG, JPEG, GIF, WebP, BMP)")],
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 24,
    ) -> SearchResponse:
        """Search by an uploaded image."""
        name = file.filename or "the upload"
        data = file.file.read(state.max_upload_bytes + 1)
        image = decode_upload(data, name, state.max_upload_bytes)
        start = time.perf_counter()
        hits = state.current_index().search(state.image_vector(image), k)
        took_ms = (time.perf_counter() - start) * 1000
        return SearchResponse(kind="image", query=name, took_ms=took_ms, results=_hits(state, hits))

    @router.get("/similar/{image_id}", response_model=SearchResponse, responses=ERRORS)
    def similar(image_id: ImageId, k: K = 24) -> SearchResponse:
        """More like this: the images nearest to an indexed image (itself left out)."""
        index = state.current_index()
        if index.get(image_id) is None:
            raise _unknown_id(image_id)
        start = time.perf_counter()
        hits = index.search(index.vector(image_id), min(k + 1, index.count))
        took_ms = (time.perf_counter() - start) * 1000
        results = _hits(state, hits, skip_id=image_id, k=k)
        return SearchResponse(kind="similar", query=str(image_id), took_ms=took_ms, results=results)

    @router.get("/image/{image_id}", response_class=Response, responses=IMAGE_RESPONSES)
    def image(image_id: ImageId) -> Response:
        """The original file of an indexed image (converted to PNG if a browser can't show it)."""
        index = state.current_index()
        hit = index.get(image_id)
        if hit is None:
            raise _unknown_id(image_id)
        path = state.file_path(index, hit.path)
        if path is None:  # a shard member
            return _member_response(state, index, image_id, hit.path)
        if not path.is_file():
            raise HTTPException(
                status_code=404,
                detail=f"image {image_id} is in the index but its file is gone: "
                "run `duomodal index update` on the index",
            )
        media_type = browser_media_type(path)
        if media_type is not None:
            return FileResponse(path, media_type=media_type)
        try:
            png = encode_png(read_image_file(path))
        except (OSError, ValueError) as e:
            raise HTTPException(status_code=404, detail=f"image {image_id} can't be read: {e}") from e
        return Response(png, media_type="image/png")

    @router.get("/thumb/{image_id}", response_class=Response, responses=IMAGE_RESPONSES)
    def thumbnail(image_id: ImageId) -> Response:
        """A small version of an indexed image, at most `thumb_size` pixels on its longer side."""
        cached = state.thumbnails.get(image_id)
        if cached is None:
            index = state.current_index()
            hit = index.get(image_id)
            if hit is None:
                raise _unknown_id(image_id)
            try:
                image = state.read_image(index, hit.path)
            except (OSError, ValueError) as e:
                raise HTTPException(
                    status_code=404, detail=f"image {image_id} can't be read: {e}"
                ) from e
            cached = make_thumbnail(image, state.thumb_size)
            state.thumbnails.put(image_id, cached)
        data, media_type = cached
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=300"})

    return router


def _member_response(state: ServerState, index: Any, image_id: int, recorded: str) -> Response:
    """An indexed shard member as is (or as PNG when a browser can't show its type)."""
    try:
        data = index.read_image_bytes(recorded)
    except OSError:
        raise HTTPException(
            status_code=404,
            detail=f"image {image_id} is in the index but its shard member is gone: "
            "run `duomodal index update` on the index",
        ) from None
    media_type = browser_media_type(PurePosixPath(recorded))
    if media_type is not None:
        return Response(data, media_type=media_type)
    try:
        png = encode_png(state.read_image(index, recorded))
    except (OSError, ValueError) as e:
        raise HTTPException(status_code=404, detail=f"image {image_id} can't be read: {e}") from e
    return Response(png, media_type="image/png")
