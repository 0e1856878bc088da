"""`overspill serve`: an OpenAI-compatible HTTP server over one `Engine`.

HTTP handlers only validate, enqueue and relay: tokenizing runs in the thread pool, the engine
thread owns the model. Its events cross into the event loop through `loop.call_soon_threadsafe`
onto an `asyncio.Queue` per request. A client that disconnects cancels its request before the
next token, streamed or not.

Nothing one client sends reaches another: bodies past `max_body_bytes` are refused before they
are read whole, prompts that cannot fit the context before they are tokenized, and every failure
is answered as OpenAI's error body on a connection that stays usable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hmac
import json
import logging
import socket
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import OverspillError
from ..runtime.prefix import PrefixCache
from .engine import Engine, Event, GenerationRequest, Handle, InvalidRequest, QueueFull
from .metrics import Metrics
from .openai_protocol import (
    ApiError, Collected, ServerConfig, TokenTexts, check_at_least_one, failed, generation_request, load_for_serving,
    logprobs_body, sampling_defaults, served_name, validation_error,
)
from .prompt_bound import PromptBound
from .requests import check_speculate
from .schemas import (
    ChatCompletionRequest, CompletionRequest, TextOffsets, chat_chunk, completion_chunk, new_id, usage,
)

log = logging.getLogger(__name__)

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
_DISCONNECT_POLL_S = 0.5
_ENGINE_POLL_S = 1.0  # how often a request waiting for its next event checks that the engine thread lives
_PARAMS = {"max_new_tokens": "max_tokens", "prompt_ids": "prompt"}  # GenerationRequest field -> OpenAI param


class _AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message quoting client input can never
    fail to encode (a lone surrogate does, as UTF-8)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error_response(err: ApiError) -> JSONResponse:
    return _AsciiJSON(err.body(), err.status, err.headers)


def _too_large(limit: int, length: int | None = None) -> ApiError:
    size = f"{length} bytes" if length is not None else f"more than {limit} bytes"
    return ApiError(413, f"the request body is {size}; this server reads at most {limit} bytes: send a shorter "
                    "prompt", code="request_too_large", headers={"Connection": "close"})


class _BodyTooLarge(StarletteHTTPException):
    """Raised by the gate's counting `receive` once a body sent without a length passes the limit;
    an HTTPException, so FastAPI's body reading lets it through to its handler."""

    def __init__(self, limit: int):
        super().__init__(413)
        self.error = _too_large(limit)


class _Gate:
    """ASGI middleware: count every response by endpoint/status, check the API key on /v1, refuse a
    body past `max_body` before reading it, and answer an unexpected exception with a 500 body
    instead of re-raising it (uvicorn would log an ASGI traceback and reset the connection)."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body
        self.api_key = None if api_key is None else api_key.strip().encode()  # as a client can send it

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [0]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, counted_send)
        except Exception as exc:
            if status[0]:
                raise  # the response has begun: nothing can be answered any more
            log.exception("internal error answering %s %s", scope.get("method"), path)
            err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
            await _error_response(err)(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(path if path in _ENDPOINTS else "other", str(status[0] or 500)).inc()

    async def _guarded(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"].startswith("/v1") and not self._authorized(headers):
            err = ApiError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")
            return await _error_response(err)(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return await _error_response(_too_large(self.max_body, int(length)))(scope, receive, send)
        await self.app(scope, self._counted(receive), send)

    def _counted(self, receive):
        """`receive` that raises `_BodyTooLarge` once the body read so far passes the limit."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge(self.max_body)
            return message

        return counted

    def _authorized(self, headers: dict) -> bool:
        """`Authorization: Bearer <key>`, the scheme in any case (RFC 7235), the key compared in constant time."""
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)


def create_app(model, tokenizer, config: ServerConfig, speculate: str | None = None,
               speculate_tree: int | None = None) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine thread and stops it at shutdown; the engine is
    at `app.state.engine` (tests use its `live_requests()` and `hold()`). `speculate`: the draft source
    of a request running alone unless its body's `speculate` says otherwise; `speculate_tree`: draft
    trees of up to that many tokens instead of chains (see `Engine`)."""
    from ..api import placement_of

    if tokenizer is None:
        raise OverspillError("serve needs a tokenizer, and this model has none (a config-only model?)")
    check_api_key(config.api_key)
    engine_ref: list[Engine] = []
    plan = placement_of(model).plan
    link = plan.streamed_bytes_per_step / plan.prediction.link_s if plan.prediction and plan.prediction.link_s else None
    metrics = Metrics(engine_ref, plan.streamed_bytes_per_step, link)
    if placement_of(model).experts is not None:
        metrics.watch_experts(model)
    tok_lock = threading.Lock()
    prefix = PrefixCache.for_model(model, config.prefix_cache_bytes) if config.prefix_cache_bytes else None
    engine = Engine(model, tokenizer, config.max_queue, metrics, tok_lock, max_batch=config.max_batch,
                    prefix_cache=prefix, speculate=speculate, speculate_tree=speculate_tree)
    engine_ref.append(engine)
    texts = TokenTexts(tokenizer, tok_lock)
    bound = PromptBound(tokenizer)

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="overspill", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.config = config
    app.add_middleware(_Gate, metrics=metrics, api_key=config.api_key, max_body=config.max_body_bytes)
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        """200 while the engine thread runs and makes progress; 503 once it died or stalled."""
        state = engine.health()
        if engine.alive:
            return {"status": "ok", **state}
        return JSONResponse({"status": "unhealthy", **state}, 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    model_card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "overspill"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != config.model_name:
            raise ApiError(404, f"The model {model_id!r} does not exist; this server serves {config.model_name!r}",
                           "not_found_error", param="model", code="model_not_found")
        return model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        req = await run_in_threadpool(generation_request, body, tokenizer, tok_lock, config, bound)
        return await _serve(engine, request, body, with_speculation(req, body), config.model_name, texts, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        req = await run_in_threadpool(generation_request, body, tokenizer, tok_lock, config, bound)
        return await _serve(engine, request, body, with_speculation(req, body), config.model_name, texts, chat=False)

    return app


def with_speculation(req: GenerationRequest, body: ChatCompletionRequest | CompletionRequest) -> GenerationRequest:
    """`req` with the body's `speculate` extension field (checked by `Engine.submit`)."""
    return dataclasses.replace(req, speculate=body.speculate) if body.speculate is not None else req


def _speculation(event: Event) -> dict | None:
    return event.speculation.as_dict() if event.speculation is not None else None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(tuple(e.get("loc", ())) == ("body",) for e in errors):  # no JSON object of fields at all
            return _error_response(_not_an_object(request.headers.get("content-type"), errors))
        return _error_response(validation_error(errors))

    @app.exception_handler(_BodyTooLarge)
    async def too_large(request: Request, exc: _BodyTooLarge):
        return _error_response(exc.error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:  # as OpenAI words it, and the endpoints there are
            return _error_response(ApiError(404, f"Invalid URL ({where}): this server answers "
                                            f"{', '.join(_ENDPOINTS)}", "not_found_error"))
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "another method")
            return _error_response(ApiError(405, f"{where}: this endpoint takes {allowed}", headers=exc.headers))
        return _error_response(ApiError(exc.status_code, str(exc.detail)))


def _not_an_object(content_type: str | None, errors: list[dict]) -> ApiError:
    """The 400 for a body that is not a JSON object: sent as a form (curl -d without a Content-Type), empty, or
    JSON of another kind; its message says what to send instead of pydantic's "a valid dictionary"."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media and not (media == "application/json" or media.endswith("+json")):
        return ApiError(400, f"the request body was sent as {media!r}: send a JSON object with the header "
                        "`Content-Type: application/json`", code="invalid_content_type")
    what = "empty" if any(e.get("type") == "missing" for e in errors) else "not a JSON object"
    return ApiError(400, f"the request body is {what}: send a JSON object of the request's fields, e.g. "
                    '{"model": ..., "messages": [...]}', code="invalid_json")


def _submit(engine: Engine, req: GenerationRequest) -> tuple[Handle, asyncio.Queue]:
    if not engine.alive:
        raise ApiError(503, f"the engine is not running ({engine.health()['error'] or 'stalled'}); see /health",
                       "server_error", code="engine_unavailable")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    try:
        handle = engine.submit(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    except QueueFull:
        raise ApiError(429, "the server's queue is full; retry shortly", "rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except InvalidRequest as exc:  # valid OpenAI, but past what this engine holds (its KV, its context)
        raise ApiError(400, str(exc), param=_PARAMS.get(exc.field, exc.field), code=exc.code) from None
    except RuntimeError as exc:  # closed, or its thread died
        raise ApiError(503, f"the engine is not running: {exc}", "server_error", code="engine_unavailable") from None
    return handle, events


async def _next_event(engine: Engine, events: asyncio.Queue) -> Event:
    """The request's next event; an error event if the engine thread dies or stalls meanwhile, so no
    handler waits forever on a thread that will never answer."""
    getter = asyncio.ensure_future(events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=_ENGINE_POLL_S)
            if done:
                return getter.result()
            if not engine.alive:
                return Event(finish="error", error=f"the engine stopped: {engine.health()['error'] or 'stalled'}")
    finally:
        getter.cancel()


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
        while not collected.add(await _next_event(engine, events)):
            pass
    finally:
        watcher.cancel()
        engine.cancel(handle)  # a no-op once finished; frees the engine's state if this handler was cancelled
    if collected.last.finish == "cancelled" and watcher.done() and not watcher.cancelled():
        # the client left: nobody reads this answer, and /metrics must not count it as a server error (503)
        return _error_response(ApiError(499, "the client closed the connection before the answer",
                                        code="client_closed_request"))
    status, payload = await run_in_threadpool(collected.response, model_name, texts)
    if status == 200 and collected.last.speculation is not None:
        payload["usage"]["speculation"] = _speculation(collected.last)
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
    offsets = TextOffsets()  # the completions API's text_offset, counted across chunks

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
            event = await _next_event(engine, events)
            if event.finish in ("error", "cancelled"):
                yield _sse(failed(event).body())
                break
            if event.text or event.logprobs:
                logprobs = logprobs_body(chat, texts.describe(list(event.logprobs)), offsets)
                yield _sse(chunk(event.text, logprobs=logprobs))
            if event.finish is not None:
                yield _sse(chunk(None, event.finish))
                if include_usage:
                    yield _sse(chunk(None) | {"choices": [], "usage": usage(prompt_tokens, event.completion_tokens,
                                                                            _speculation(event))})
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(handle)


def serve_main(args) -> int:
    """`overspill serve`: check the address, load the model, then serve until interrupted."""
    import uvicorn

    from ..api import placement_of
    from ..planning.units import parse_bytes
    from .defaults import DEFAULT_MAX_BODY_BYTES

    check_at_least_one(("--max-queue", args.max_queue), ("--max-new-tokens-limit", args.max_new_tokens_limit),
                       ("--max-batch", args.max_batch))
    check_api_key(args.api_key)
    check_speculate(getattr(args, "speculate", None), getattr(args, "speculate_tree", None))
    max_body = parse_bytes(args.max_body_bytes, "--max-body-bytes") if getattr(args, "max_body_bytes", None) else DEFAULT_MAX_BODY_BYTES
    if max_body < 1:
        raise OverspillError("--max-body-bytes must be at least 1 byte, e.g. 4MiB")
    prefix_bytes = parse_bytes(args.prefix_cache, "--prefix-cache")
    check_address(args.host, args.port)
    model, tokenizer = load_for_serving(args)
    name = served_name(args.model)
    config = ServerConfig(name, placement_of(model).plan.workload.context, args.max_queue,
                          args.max_new_tokens_limit, args.api_key, args.max_batch, prefix_bytes, max_body,
                          sampling_defaults(model))
    app = create_app(model, tokenizer, config, getattr(args, "speculate", None), getattr(args, "speculate_tree", None))
    for note in (app.state.engine.batching_note, app.state.engine.speculator.note):
        if note:
            print(note)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (OpenAI API)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:  # a force quit (Ctrl+C twice) skips the app's shutdown: stop the engine thread before exiting
        app.state.engine.close()
    return 0


def check_api_key(api_key: str | None) -> None:
    """Refuse an empty or blank key, which no client can send (HTTP trims a header value's spaces), so
    the server would answer every /v1 request 401."""
    if api_key is not None and not api_key.strip():
        raise OverspillError("--api-key is empty, and no client can send an empty key: pass a key, or leave out "
                             "--api-key to serve without one")


def check_address(host: str, port: int) -> None:
    """Bind (and close) the socket uvicorn will listen on, so a bad --host or --port fails in one line
    before minutes of loading, not in a traceback after. Another program may still take the port
    between this check and uvicorn's bind."""
    if not 1 <= port <= 65535:
        raise OverspillError(f"--port {port} is not a TCP port: pass one in 1..65535 (default 8000)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            raise OverspillError(f"--host {host!r} is not an address of this machine ({exc.strerror}): "
                                 "pass an IP address or name, e.g. 127.0.0.1 or 0.0.0.0") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OverspillError(f"port {port} on {host} is in use by another program: stop it, or pass "
                                     "another --port") from None
            raise OverspillError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pass another --host "
                                 "or --port") from None
