"""The FastAPI application: `create_app(index, embedder, generator=None, config=ServeConfig())`.

Routes live in `routes_search.py` and `routes_generate.py`; this file wires them together with the
error handling every route shares (bad input is a 4xx with a one-line `detail`, never a 500), the
request-size limit, the health check and the web page in `static/`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from duomodal import __version__
from duomodal.models.sampling import GenerationError
from duomodal.search.query import QueryError
from duomodal.search.store import VectorStoreUnavailable
from duomodal.serve.config import ServeConfig
from duomodal.serve.jobs import QueueFullError
from duomodal.serve.media import UploadError, human_bytes
from duomodal.serve.protocols import Embedder, Generator, Index
from duomodal.serve.routes_generate import router as generate_router
from duomodal.serve.routes_search import router as search_router
from duomodal.serve.schemas import MAX_K, HealthResponse
from duomodal.serve.security import AccessGuard
from duomodal.serve.state import ServerState, server_state

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small form fields beside a file
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    # The page loads nothing from elsewhere; the browser enforces it.
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
]
# The library's errors that a request's input can cause (a query of only negatives, an edit box
# outside what the model sees), answered with their message and this status. Any other exception,
# a ValueError included, is a bug of ours: logged, and a 500.
REQUEST_ERRORS: dict[type[Exception], int] = {QueryError: 400, GenerationError: 400}


def _json_error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """Pydantic's error list as one line: `k: Input should be less than or equal to 200; ...`."""
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ())]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if len(loc) > 1 and loc[0] in ("body", "query", "path", "form", "header", "cookie"):
            loc = loc[1:]
        elif error.get("type") == "value_error":  # a check across fields: its message says it all
            parts.append(message)
            continue
        parts.append(f"{'.'.join(loc) or 'body'}: {message}")
    return "; ".join(parts)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413 before reading them (or as soon as the
    streamed body passes the limit), so an upload can't fill the disk or memory."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body is larger than the {human_bytes(self.max_bytes)} limit"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_large = int(value) > self.max_bytes
                except ValueError:
                    too_large = False
                if too_large:
                    await _json_error(413, self._message())(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing to the handlers.
                    raise StarletteHTTPException(status_code=413, detail=self._message())
            return message

        await self.app(scope, limited_receive, send)


class SecurityHeaders:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


def _answer_with(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """An exception handler that answers `status` with the exception's message."""

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        return _json_error(status, str(exc))

    return refused


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(422, describe_validation_errors(list(exc.errors())))

    @app.exception_handler(pydantic.ValidationError)
    async def model_invalid(request: Request, exc: pydantic.ValidationError) -> JSONResponse:
        return _json_error(422, describe_validation_errors(list(exc.errors())))

    @app.exception_handler(UploadError)
    async def upload_refused(request: Request, exc: UploadError) -> JSONResponse:
        return _json_error(exc.status, str(exc))

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        return _json_error(429, str(exc))

    for error_type, status in REQUEST_ERRORS.items():
        app.add_exception_handler(error_type, _answer_with(status))

    @app.exception_handler(VectorStoreUnavailable)
    async def vector_store_unavailable(request: Request, exc: VectorStoreUnavailable) -> JSONResponse:
        # the message names the store's host: logged for the operator, not shown to the client
        logger.error("%s %s: %s", request.method, request.url.path, exc)
        return _json_error(503, "the vector store did not answer; try again in a moment")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return _json_error(500, f"internal error: {type(exc).__name__}")


UPLOAD_TYPES = "image/png, image/jpeg, image/gif, image/webp, image/bmp"


def _state_the_server_options(app: FastAPI, generator: Generator | None) -> None:
    """Finish the OpenAPI schema with what depends on this server's options or model, or can't be
    said in the route signatures: `num` and `keep` bounded by --max-generate, a completion's `rows`
    by the model's grid, and the media types an upload's `file` part may have (a client generated
    from the schema then sends what the server takes)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)
        components = schema.get("components", {}).get("schemas", {})
        _flatten_forms(components)
        if generator is not None:
            for name, body in components.items():  # the generation bodies: JSON and multipart forms
                if name == "GenerateRequest" or name.startswith("Body_"):
                    _set_maximum(body.get("properties", {}).get("num"), int(generator.max_num))
                    _set_maximum(body.get("properties", {}).get("keep"), int(generator.max_num))
            rows = components.get("Body_complete_api_complete_post", {}).get("properties", {}).get("rows")
            _set_maximum(rows, max(0, int(generator.grid_size) - 1))
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
                if form is not None:
                    form["encoding"] = {"file": {"contentType": UPLOAD_TYPES}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _flatten_forms(components: dict[str, Any]) -> None:
    """One flat object per multipart body: FastAPI states a form model beside a file part as
    `allOf` the model's schema plus the file; clients and fuzzers handle a flat object best."""
    merged = set()
    for name, body in components.items():
        if not name.startswith("Body_") or "allOf" not in body:
            continue
        properties, required = {}, []
        for part in body.pop("allOf"):
            model = part["$ref"].rsplit("/", 1)[-1]
            merged.add(model)
            properties.update(components[model].get("properties", {}))
            required += components[model].get("required", [])
        body["properties"] = {**properties, **body.get("properties", {})}
        body["required"] = [*required, *body.get("required", [])]
    for model in merged:
        del components[model]


def _set_maximum(field: dict[str, Any] | None, maximum: int) -> None:
    """Put `maximum` on an integer field's schema (or on the integer branch of `anyOf`)."""
    if field is None:
        return
    for branch in field.get("anyOf", [field]):
        if branch.get("type") == "integer":
            branch["maximum"] = maximum


def _allow_lists_every_method(app: FastAPI) -> None:
    """A 405 answers with an `Allow` header listing every documented method of the path: Starlette
    lists only those of the first route it tried, and /api/search has a GET and a POST route."""
    paths: list[tuple[re.Pattern[str], str]] = []

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        if not paths:
            for template, operations in app.openapi().get("paths", {}).items():
                expression = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
                paths.append((re.compile(expression), ", ".join(sorted(m.upper() for m in operations))))
        allow = next((methods for expression, methods in paths if expression.fullmatch(request.url.path)), None)
        if allow is None:
            return await http_exception_handler(request, exc)
        return JSONResponse({"detail": exc.detail}, status_code=405, headers={"Allow": allow})


def create_app(
    index: Index,
    embedder: Embedder,
    generator: Generator | None = None,
    config: ServeConfig | None = None,
    *,
    reopen_index: Callable[[], Index] | None = None,
) -> FastAPI:
    """The web app over an opened index and a CLIP embedder (and a generator, for /api/generate),
    within the limits of `config` (default: `ServeConfig()`).

    With `reopen_index` (e.g. `functools.partial(ImageIndex.open, index_dir)`), an index that
    changed on disk (its `is_stale()` says so) is reopened in the background and served from then on.
    Raises ValueError when the embedder is not the CLIP model the index was built with.
    """
    if embedder.model_id != index.clip_model_id:
        raise ValueError(
            f"the index was built with CLIP model {index.clip_model_id!r} but the server was given "
            f"{embedder.model_id!r}: pass the CLIP the index was built with (--clip), "
            "or rebuild the index"
        )
    if embedder.dim != index.dim:
        raise ValueError(f"the CLIP embeds {embedder.dim}-d vectors but the index holds {index.dim}-d")
    config = config or ServeConfig()
    state = ServerState(index, embedder, generator, config, reopen_index=reopen_index)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.close()

    app = FastAPI(
        lifespan=lifespan,
        title="duomodal",
        version=__version__,
        description="Search an image collection by what it shows, and generate images from text.",
        # FastAPI's /docs and /redoc pages load their scripts from a CDN; the schema is enough.
        docs_url=None,
        redoc_url=None,
    )
    app.state.duomodal = state
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes + FORM_OVERHEAD_BYTES)
    app.add_middleware(AccessGuard, policy=config.access)
    app.add_middleware(SecurityHeaders)  # outermost: refusals carry the headers too
    app.include_router(search_router)
    if generator is not None:
        app.include_router(generate_router)
    app.include_router(meta_router)
    _state_the_server_options(app, generator)
    _allow_lists_every_method(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


meta_router = APIRouter()


@meta_router.get("/health", response_model=HealthResponse, tags=["meta"])
def health(state: Annotated[ServerState, Depends(server_state)]) -> HealthResponse:
    """Whether the server is up, what it serves, and its limits."""
    current = state.current_index()
    return HealthResponse(
        status="ok",
        images=int(current.count),
        dim=int(current.dim),
        clip_model_id=str(current.clip_model_id),
        generation=state.generator is not None,
        max_k=MAX_K,
        max_upload_bytes=state.config.max_upload_bytes,
        max_generate=0 if state.generator is None else int(state.generator.max_num),
    )


@meta_router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
