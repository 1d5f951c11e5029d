"""The OpenAI-compatible HTTP server: a thin FastAPI router over `serve/serving.py`, plus the web chat.

Routes parse the request (pydantic, `serve/protocol.py`), call the handler and send what it returns;
a handler's `APIError`, a request pydantic refuses and an unknown route all leave as OpenAI's error
body, with the status the OpenAPI schema declares (400 for a refused request, never FastAPI's 422).
Streams are server-sent events ending in `data: [DONE]`. A client that disconnects cancels its
request, streamed or not, so the engine stops spending steps on it.

With an API key, everything but `GET /health` (which then says only that the server is up) needs it,
the OpenAPI schema included, and the interactive docs are off. Every response carries a
Content-Security-Policy of `default-src 'self'`, and the docs page loads Swagger UI from the
installed `swagger-ui-bundle` package: nothing is fetched from outside.
The app's state (`app.state.serving`, `app.state.api_key`) is all the routes read.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.serve import serving
from corral.serve.metrics import CONTENT_TYPE, Metrics
from corral.serve.models import ServedModel
from corral.serve.protocol import APIError, ChatRequest, CompletionRequest, Vote
from corral.serve.serving import Chunks, Limits, Serving

WEB_DIR = Path(__file__).parent / "web"
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def build_app(models: dict[str, ServedModel], api_key: str | None = None, votes_path: str | Path | None = None,
              limits: Limits | None = None, max_body_bytes: int = 4_000_000) -> FastAPI:
    app = FastAPI(title="Corral", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(list({id(m.engine): m.engine for m in models.values()}.values()))
    app.state.serving = Serving(models, votes_path, limits or Limits(), metrics)
    app.state.api_key = api_key
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.include_router(router)
    if api_key is None:
        app.include_router(docs_router)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    app.openapi = lambda: openapi_schema(app)
    routes = router.routes + (docs_router.routes if api_key is None else [])
    app.add_middleware(HeadersAndCounts, metrics=metrics, paths={r.path for r in routes}, max_body_bytes=max_body_bytes)
    return app


# ---------------------------------------------------------------------------------------------- routes
def serving_state(request: Request) -> Serving:
    return request.app.state.serving


def check_key(request: Request) -> None:
    api_key = request.app.state.api_key
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                       type="authentication_error", code="invalid_api_key")


router = APIRouter()
KEYED = [Depends(check_key)]  # every route but /health and the web page's files


@router.get("/health")
async def health(request: Request, state: Serving = Depends(serving_state)):
    return serving.health(state, public=request.app.state.api_key is None)


@router.get("/metrics", dependencies=KEYED, include_in_schema=False)
async def metrics(state: Serving = Depends(serving_state)):
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/openapi.json", dependencies=KEYED, include_in_schema=False)
async def openapi(request: Request):
    return request.app.openapi()


@router.get("/v1/models", dependencies=KEYED)
async def list_models(state: Serving = Depends(serving_state)):
    return serving.list_models(state)


@router.post("/v1/chat/completions", dependencies=KEYED)
async def chat_completions(req: ChatRequest, request: Request, state: Serving = Depends(serving_state)):
    return await answer(request, serving.chat_completions(state, req))


@router.post("/v1/completions", dependencies=KEYED)
async def completions(req: CompletionRequest, request: Request, state: Serving = Depends(serving_state)):
    return await answer(request, serving.completions(state, req))


@router.post("/v1/arena/vote", dependencies=KEYED)
async def arena_vote(vote: Vote, state: Serving = Depends(serving_state)):
    return await serving.arena_vote(state, vote)


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(WEB_DIR / "index.html")


docs_router = APIRouter()  # only without an API key


@docs_router.get("/docs", include_in_schema=False)
async def docs():
    if swagger_dir() is None:
        raise APIError(404, "the API docs need the swagger-ui-bundle package (pip install swagger-ui-bundle); "
                            "the schema is at /openapi.json", type="not_found_error")  # fmt: skip
    return FileResponse(WEB_DIR / "docs.html")


@docs_router.get("/docs-assets/{name}", include_in_schema=False)
async def docs_asset(name: str):
    folder = swagger_dir()
    if folder is None or name not in ("swagger-ui-bundle.js", "swagger-ui.css"):
        raise StarletteHTTPException(404, f"no docs asset '{name}'")
    return FileResponse(folder / name)


def swagger_dir() -> Path | None:
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return Path(swagger_ui_bundle.swagger_ui_path)


async def answer(request: Request, handler):
    """The handler's reply; if the client disconnects first, the handler is cancelled (and with it its
    engine requests) instead of generating for nobody. A stream is sent as server-sent events."""
    work = asyncio.ensure_future(handler)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return Response(status_code=499)  # nobody reads it: the client is gone
    result = work.result()
    return sse(result) if isinstance(result, Chunks) else result


async def disconnected(request: Request) -> None:
    """Returns when the client goes away. The body has been read, so the next message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(chunks: Chunks) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks.bodies:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we finished): free the engine rows either way
            for stream in chunks.streams:
                stream.cancel()
            await chunks.bodies.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------------------- middleware
class HeadersAndCounts:
    """Adds the security headers to every response and counts responses by method, route and status.
    Paths that are no route count as "other", so a scan cannot grow the metrics without bound. A body
    whose Content-Length is over the limit is answered 413 before it is read; one sent without a length
    is cut off with a 413 as soon as what arrived passes the limit."""

    def __init__(self, app, metrics: Metrics, paths: set[str], max_body_bytes: int):
        self.app, self.metrics, self.paths, self.max_body_bytes = app, metrics, paths, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
                self.metrics.http.labels(scope["method"], path, str(message["status"])).inc()
            await send(message)

        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            too_large = APIError(413, f"the request body is {int(length)} bytes; this server accepts up to "
                                      f"{self.max_body_bytes}", type="invalid_request_error")  # fmt: skip
            response = JSONResponse(too_large.body(), 413, headers={"Connection": "close"})
            return await response(scope, receive, send_with_headers)
        received = 0

        async def receive_counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:  # FastAPI's body reader passes this on to `http_error`
                raise StarletteHTTPException(413, f"the request body is over this server's {self.max_body_bytes} bytes")
            return message

        await self.app(scope, receive_counted, send_with_headers)


# ---------------------------------------------------------------------------------------------- errors
async def api_error(_: Request, err: APIError):
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


_UNION_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


def field_path(loc) -> str | None:
    """pydantic's error location as a dotted field path (`messages.0.content`), without the union
    member tags it adds (`str`, `list[TextPart]`, `function-after[...]`)."""
    parts = [str(p) for p in loc if p != "body"]
    parts = [p for p in parts if not ("[" in p or "-" in p or p in _UNION_TAGS)]
    return ".".join(parts) or None


async def invalid_request(_: Request, err: RequestValidationError):
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})"
        return JSONResponse(APIError(400, message).body(), 400)
    param = field_path(first["loc"])
    if param is None:
        return JSONResponse(APIError(400, f"the request body must be a JSON object: {first['msg']}").body(), 400)
    message = "unknown or unsupported parameter" if first["type"] == "extra_forbidden" else first["msg"]
    return JSONResponse(APIError(400, f"{param}: {message}", param).body(), 400)


async def server_error(_: Request, err: Exception):
    """A bug of ours still answers in OpenAI's shape (uvicorn logs the traceback)."""
    return JSONResponse(APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").body(), 500)


async def http_error(_: Request, err: StarletteHTTPException):
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(APIError(err.status_code, str(err.detail), type=kind).body(), err.status_code,
                        headers=err.headers)


# ---------------------------------------------------------------------------------------------- schema
ERROR_BODY = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}  # fmt: skip
ERRORS = {"400": "The request is invalid; `param` names the field", "401": "Missing or wrong API key",
          "404": "Unknown model", "408": "The reply ran past the server's request timeout",
          "413": "The request body is larger than the server accepts",
          "429": "The server is busy: retry after the Retry-After header's seconds",
          "500": "Generation failed for this request"}  # fmt: skip


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema, with the errors this server really sends: OpenAI's error body, 400 for a refused
    request (FastAPI would declare 422 there), and the limits' statuses."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=router.routes)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                keyed = app.state.api_key is not None and path != "/health"
                posts = path.startswith("/v1/") and "requestBody" in operation
                for status, description in ERRORS.items():
                    if (status == "401" and not keyed) or (status != "401" and not posts):
                        continue
                    responses[status] = {"description": description,
                                         "content": {"application/json": {"schema": ERROR_BODY}}}
        app.openapi_schema = schema
    return app.openapi_schema
