"""`overspill serve`: an OpenAI-compatible HTTP server over one `Engine`.

HTTP handlers only validate, enqueue and relay: tokenizing runs in the thread pool, the engine
thread owns the model. Its events cross into the event loop through `loop.call_soon_threadsafe`
onto an `asyncio.Queue` per request. A client that disconnects cancels its request before the
next token, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Event, GenerationRequest, Handle, QueueFull
from .metrics import Metrics
from .prefix import PrefixCache
from .openai_protocol import (
    ApiError, Collected, ServerConfig, TokenTexts, failed, generation_request, load_for_serving, logprobs_body,
    served_name, validation_error,
)
from .schemas import ChatCompletionRequest, CompletionRequest, chat_chunk, completion_chunk, new_id, usage

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
_DISCONNECT_POLL_S = 0.5


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), err.status, err.headers)


class _Gate:
    """ASGI middleware: count every response by endpoint/status, and check the API key on /v1."""

    def __init__(self, app, metrics: Metrics, api_key: str | None):
        self.app, self.metrics, self.api_key = app, metrics, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path.startswith("/v1") and not self._authorized(scope):
                err = ApiError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                               "invalid_request_error", code="invalid_api_key")
                return await _error_response(err)(scope, receive, counted_send)
            return await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(path if path in _ENDPOINTS else "other", str(status[0])).inc()

    def _authorized(self, scope) -> bool:
        auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        return auth == f"Bearer {self.api_key}"


def create_app(model, tokenizer, config: ServerConfig) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine thread and stops it at shutdown; the engine is
    at `app.state.engine` (tests use its `live_requests()` and `hold()`)."""
    from .api import placement_of

    if tokenizer is None:
        from .errors import OverspillError

        raise OverspillError("serve needs a tokenizer, and this model has none (a config-only model?)")
    engine_ref: list[Engine] = []
    plan = placement_of(model).plan
    link = plan.streamed_bytes_per_step / plan.prediction.link_s if plan.prediction and plan.prediction.link_s else None
    metrics = Metrics(engine_ref, plan.streamed_bytes_per_step, link)
    tok_lock = threading.Lock()
    prefix = PrefixCache.for_model(model, config.prefix_cache_bytes) if config.prefix_cache_bytes else None
    engine = Engine(model, tokenizer, config.max_queue, metrics, tok_lock, max_batch=config.max_batch,
                    prefix_cache=prefix)
    engine_ref.append(engine)
    texts = TokenTexts(tokenizer, tok_lock)

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="overspill", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.config = config
    app.add_middleware(_Gate, metrics=metrics, api_key=config.api_key)
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue_depth": engine.queue_depth, "active": engine.active_count}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0, "owned_by": "overspill"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        req = await run_in_threadpool(generation_request, body, tokenizer, tok_lock, config)
        return await _serve(engine, request, body, req, config.model_name, texts, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        req = await run_in_threadpool(generation_request, body, tokenizer, tok_lock, config)
        return await _serve(engine, request, body, req, config.model_name, texts, chat=False)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(exc.status_code, str(exc.detail), type_))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))


def _submit(engine: Engine, req: GenerationRequest) -> tuple[Handle, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    try:
        handle = engine.submit(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    except QueueFull:
        raise ApiError(429, "the server's queue is full; retry shortly", "rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except RuntimeError:
        raise ApiError(503, "the server is shutting down", "server_error") from None
    except ValueError as exc:  # more KV than the engine's capacity: a valid body this server cannot hold
        raise ApiError(400, f"{exc}", param="max_tokens", code="kv_capacity_exceeded") from None
    return handle, events


async def _serve(engine: Engine, request: Request, body, req: GenerationRequest, model_name: str,
                 texts: TokenTexts, chat: bool):
    handle, events = _submit(engine, req)
    rid = new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        stream = _stream(engine, handle, events, rid, model_name, chat, len(req.prompt_ids), include_usage, texts)
        # the background cancel covers a client gone before the stream's first chunk (its finally never runs)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(engine.cancel, handle))
    collected = Collected(chat, len(req.prompt_ids))
    watcher = asyncio.create_task(_cancel_on_disconnect(request, engine, handle))
    try:
        while not collected.add(await events.get()):
            pass
    finally:
        watcher.cancel()
        engine.cancel(handle)  # a no-op once finished; frees the engine's state if this handler was cancelled
    status, payload = await run_in_threadpool(collected.response, model_name, texts)
    return JSONResponse(payload, status)


async def _cancel_on_disconnect(request: Request, engine: Engine, handle: Handle) -> None:
    """Cancel a non-streamed request whose client went away, so it stops holding a batch place."""
    while not await request.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_S)
    engine.cancel(handle)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _stream(engine: Engine, handle: Handle, events: asyncio.Queue, rid: str, model: str, chat: bool,
                  prompt_tokens: int, include_usage: bool, texts: TokenTexts):
    """SSE chunks; starlette cancels this generator when the client disconnects, and `finally` cancels the request.

    With logprobs, each token's entry rides on the chunk of the event that reported it (its text may
    come in a later chunk when a possible stop string holds it back)."""
    created = int(time.time())
    sent = 0  # characters of text sent: the completions API's text_offset

    def chunk(text: str | None, finish: str | None = None, logprobs: dict | None = None) -> dict:
        if chat:
            out = chat_chunk(rid, model, created, {} if text is None else {"content": text}, finish, logprobs)
        else:
            out = completion_chunk(rid, model, created, text or "", finish, logprobs)
        if include_usage:
            out["usage"] = None  # as at OpenAI: only the last chunk carries usage
        return out

    try:
        if chat:
            first = chunk("")
            first["choices"][0]["delta"]["role"] = "assistant"
            yield _sse(first)
        while True:
            event = await events.get()
            if event.finish in ("error", "cancelled"):
                yield _sse(failed(event).body())
                break
            if event.text or event.logprobs:
                logprobs = logprobs_body(chat, texts.describe(list(event.logprobs)), sent)
                yield _sse(chunk(event.text, logprobs=logprobs))
                sent += len(event.text)
            if event.finish is not None:
                yield _sse(chunk(None, event.finish))
                if include_usage:
                    yield _sse(chunk(None) | {"choices": [], "usage": usage(prompt_tokens, event.completion_tokens)})
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(handle)


def serve_main(args) -> int:
    """`overspill serve`: load the model, then serve until interrupted."""
    import uvicorn

    from .api import placement_of
    from .errors import OverspillError
    from .units import parse_bytes

    if min(args.max_queue, args.max_new_tokens_limit, args.max_batch) < 1:
        raise OverspillError("--max-queue, --max-new-tokens-limit and --max-batch must be at least 1")
    prefix_bytes = parse_bytes(args.prefix_cache)
    model, tokenizer = load_for_serving(args)
    name = served_name(args.model)
    config = ServerConfig(name, placement_of(model).plan.workload.context, args.max_queue,
                          args.max_new_tokens_limit, args.api_key, args.max_batch, prefix_bytes)
    app = create_app(model, tokenizer, config)
    if app.state.engine.batching_note:
        print(app.state.engine.batching_note)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (OpenAI API)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
