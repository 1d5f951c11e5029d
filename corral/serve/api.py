"""The OpenAI-compatible HTTP server: a thin FastAPI router over `serve/serving.py`, plus the web chat.

Routes parse the request (pydantic, `serve/protocol.py`), call the handler and send what it returns;
a handler's `APIError`, a request pydantic refuses and an unknown route all leave as OpenAI's error
body. Streams are server-sent events ending in `data: [DONE]`; a client that disconnects cancels its
request, so the engine stops spending steps on it.
The app's state (`app.state.serving`, `app.state.api_key`) is all the routes read.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral.serve import serving
from corral.serve.models import ServedModel
from corral.serve.protocol import APIError, ChatRequest, CompletionRequest, Vote
from corral.serve.serving import Chunks, Serving

WEB_DIR = Path(__file__).parent / "web"


def build_app(models: dict[str, ServedModel], api_key: str | None = None, votes_path: str | Path | None = None,
              default_max_tokens: int = 512) -> FastAPI:
    app = FastAPI(title="Corral", docs_url="/docs")
    app.state.serving = Serving(models, votes_path, default_max_tokens)
    app.state.api_key = api_key
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.include_router(router)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
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
KEYED = [Depends(check_key)]  # every /v1 route; /health and the web page stay open


@router.get("/health")
async def health(state: Serving = Depends(serving_state)):
    return serving.health(state)


@router.get("/v1/models", dependencies=KEYED)
async def list_models(state: Serving = Depends(serving_state)):
    return serving.list_models(state)


@router.post("/v1/chat/completions", dependencies=KEYED)
async def chat_completions(req: ChatRequest, state: Serving = Depends(serving_state)):
    return respond(await serving.chat_completions(state, req))


@router.post("/v1/completions", dependencies=KEYED)
async def completions(req: CompletionRequest, state: Serving = Depends(serving_state)):
    return respond(await serving.completions(state, req))


@router.post("/v1/arena/vote", dependencies=KEYED)
async def arena_vote(vote: Vote, state: Serving = Depends(serving_state)):
    return await serving.arena_vote(state, vote)


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(WEB_DIR / "index.html")


def respond(result: dict | Chunks):
    return sse(result) if isinstance(result, Chunks) else result


def sse(chunks: Chunks) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks.bodies:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we finished): free the engine rows either way
            for stream in chunks.streams:
                stream.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------------------- errors
async def api_error(_: Request, err: APIError):
    return JSONResponse(err.body(), status_code=err.status)


async def invalid_request(_: Request, err: RequestValidationError):
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"] if p != "body"]
    param = ".".join(loc) or None
    return JSONResponse(APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param).body(), 400)


async def http_error(_: Request, err: StarletteHTTPException):
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(APIError(err.status_code, str(err.detail), type=kind).body(), err.status_code)
