"""`overspill serve`: an OpenAI-compatible HTTP server over one `Engine`.

HTTP handlers only validate, tokenize, enqueue and relay: the engine thread owns the model. Its
events cross into the event loop through `loop.call_soon_threadsafe` onto an `asyncio.Queue` per
request. A client that disconnects from a stream cancels its request before the next token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Event, GenerationRequest, QueueFull
from .schemas import (
    ChatCompletionRequest, CompletionRequest, TokenAlternatives, chat_chunk, chat_logprobs, chat_response,
    completion_chunk, completion_logprobs, completion_response, error_body, new_id, usage,
)

DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_NEW_TOKENS_LIMIT = 2048
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class ServerConfig:
    """model_name: the id clients must send; context: longest prompt + completion in tokens."""

    model_name: str
    context: int
    max_queue: int = DEFAULT_MAX_QUEUE
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT
    api_key: str | None = None
    max_batch: int = 16  # sequences decoded together in one pass over the layers


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` body with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, self.headers)


class Metrics:
    """Prometheus metrics in a registry of their own (several servers can live in one process)."""

    def __init__(self, engine_ref: list[Engine], streamed_bytes_per_step: int, link_bytes_per_second: float | None):
        self.streamed_bytes_per_step = streamed_bytes_per_step
        self.link_bytes_per_second = link_bytes_per_second
        self.registry = r = CollectorRegistry()
        self.requests = Counter("overspill_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.tokens = Counter("overspill_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("overspill_time_to_first_token_seconds", "submit to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("overspill_inter_token_latency_seconds", "time between tokens of one request", buckets=_LATENCY_BUCKETS, registry=r)
        Gauge("overspill_queue_depth", "requests waiting for the engine", registry=r).set_function(lambda: engine_ref[0].queue_depth)
        Gauge("overspill_active_batch_size", "sequences the engine is decoding", registry=r).set_function(lambda: engine_ref[0].active_count)
        Gauge("overspill_streamed_bytes_per_decode_step", "weight bytes copied host->GPU per decode step (plan)",
              registry=r).set(streamed_bytes_per_step)
        self.batch = Histogram("overspill_decode_batch_size", "sequences per decode step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.step = Histogram("overspill_decode_step_seconds", "one pass over the layers for the batch",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.bytes_per_token = Gauge("overspill_streamed_bytes_per_token",
                                     "weight bytes over the link per generated token, last decode step", registry=r)
        self.link = Gauge("overspill_link_bytes_per_second", "achieved host->GPU weight streaming, last decode step",
                          registry=r)
        Gauge("overspill_link_measured_bytes_per_second", "pinned host->GPU bandwidth measured by the probe (0: unknown)",
              registry=r).set(link_bytes_per_second or 0)
        self.overlap = Gauge("overspill_link_busy_fraction", "fraction of the last decode step the link needed at "
                             "measured bandwidth (1.0: link-bound, fully overlapped)", registry=r)
        kv = Gauge("overspill_kv_blocks", "KV blocks of the engine's admission control", ["state"], registry=r)
        kv.labels("total").set_function(lambda: engine_ref[0].kv_stats().total_blocks)
        kv.labels("used").set_function(lambda: engine_ref[0].kv_stats().used_blocks)
        kv.labels("reserved").set_function(lambda: engine_ref[0].kv_stats().reserved_blocks)
        kv_bytes = Gauge("overspill_kv_bytes", "KV bytes held by running sequences, by tier", ["tier"], registry=r)
        kv_bytes.labels("gpu").set_function(lambda: engine_ref[0].kv_stats().gpu_bytes)
        kv_bytes.labels("host").set_function(lambda: engine_ref[0].kv_stats().host_bytes)

    # the engine's observer interface (called on the engine thread)
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def generated(self, tokens: int) -> None:
        self.tokens.inc(tokens)

    def decode_step(self, batch_size: int, seconds: float) -> None:
        self.batch.observe(batch_size)
        self.step.observe(seconds)
        self.bytes_per_token.set(self.streamed_bytes_per_step / batch_size)
        self.link.set(self.streamed_bytes_per_step / seconds if seconds > 0 else 0)
        if self.link_bytes_per_second and seconds > 0:
            self.overlap.set(min(self.streamed_bytes_per_step / self.link_bytes_per_second / seconds, 1.0))


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
                return await err.response()(scope, receive, counted_send)
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
    engine = Engine(model, tokenizer, config.max_queue, metrics, tok_lock, max_batch=config.max_batch)
    engine_ref.append(engine)

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

    def describe(entries) -> list[TokenAlternatives]:
        with tok_lock:
            return token_alternatives(tokenizer, entries)

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
    async def chat_completions(body: ChatCompletionRequest):
        req = generation_request(body, tokenizer, tok_lock, config)
        return await _serve(engine, body, req, config.model_name, describe, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        req = generation_request(body, tokenizer, tok_lock, config)
        return await _serve(engine, body, req, config.model_name, describe, chat=False)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return ApiError(400, f"malformed JSON body: {first.get('msg')}", code="invalid_json").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type_).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()


def _check_common(body, config: ServerConfig) -> None:
    if body.model != config.model_name:
        raise ApiError(404, f"model {body.model!r} does not exist; this server serves {config.model_name!r}",
                       "not_found_error", param="model", code="model_not_found")
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(enc["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"]


def generation_request(body: ChatCompletionRequest | CompletionRequest, tokenizer, lock: threading.Lock,
                       config: ServerConfig) -> GenerationRequest:
    """Check a chat or text completion body and tokenize its prompt; raises `ApiError` with the status to answer."""
    _check_common(body, config)
    if isinstance(body, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        with lock:
            ids = _chat_ids(tokenizer, messages)
        return _generation_request(body, ids, body.max_completion_tokens or body.max_tokens, config)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "only one prompt per request is supported yet", param="prompt")
        prompt = prompt[0]
    if body.echo:
        raise ApiError(400, "echo is not supported yet", param="echo")
    with lock:
        ids = tokenizer(prompt)["input_ids"]
    return _generation_request(body, ids, body.max_tokens if body.max_tokens is not None else 16, config)


def _generation_request(body, ids: list[int], max_tokens: int | None, config: ServerConfig) -> GenerationRequest:
    if max_tokens is not None and not 1 <= max_tokens <= config.max_new_tokens_limit:
        raise ApiError(400, f"max_tokens must be between 1 and {config.max_new_tokens_limit}, got {max_tokens}",
                       param="max_tokens")
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    room = config.context - len(ids)
    if room < 1:
        raise ApiError(413, f"the prompt is {len(ids)} tokens; this server's context is {config.context} tokens",
                       param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    wanted = max_tokens if max_tokens is not None else config.max_new_tokens_limit
    return GenerationRequest(
        prompt_ids=tuple(ids), max_new_tokens=min(wanted, room), temperature=body.temperature,
        top_p=body.top_p, top_k=body.top_k or 0, stop=body.stop_list(), seed=body.seed, logprobs=body.logprobs_k(),
    )


def _submit(engine: Engine, req: GenerationRequest) -> tuple[object, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    try:
        handle = engine.submit(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    except QueueFull:
        raise ApiError(429, "the server's queue is full; retry shortly", "rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    return handle, events


def _failed(event: Event) -> ApiError:
    if event.finish == "cancelled":
        return ApiError(503, "the request was cancelled (server shutting down)", "server_error")
    return ApiError(500, f"generation failed: {event.error}", "server_error")


def token_alternatives(tokenizer, entries) -> list[TokenAlternatives]:
    """Engine `TokenLogprob`s as (token text, logprob, top alternatives as (text, logprob))."""
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    return [(text(e.token_id), e.logprob, tuple((text(i), lp) for i, lp in e.top)) for e in entries]


def logprobs_body(chat: bool, tokens: list[TokenAlternatives], text_offset: int = 0) -> dict | None:
    """The response's `logprobs` object for these tokens (None when none were asked for)."""
    if not tokens:
        return None
    return chat_logprobs(tokens) if chat else completion_logprobs(tokens, text_offset)


async def _serve(engine: Engine, body, req: GenerationRequest, model_name: str, describe, chat: bool):
    prompt_tokens = len(req.prompt_ids)
    handle, events = _submit(engine, req)
    rid = new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        include_usage = bool((getattr(body, "stream_options", None) or {}).get("include_usage"))
        return StreamingResponse(_stream(engine, handle, events, rid, model_name, chat, prompt_tokens, include_usage,
                                         describe),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    parts: list[str] = []
    logprobs = []
    try:
        while True:
            event = await events.get()
            if event.finish in ("error", "cancelled"):
                raise _failed(event)
            parts.append(event.text)
            logprobs.extend(event.logprobs)
            if event.finish is not None:
                break
    finally:
        engine.cancel(handle)  # a no-op once finished; frees the engine's state if this handler was cancelled
    build = chat_response if chat else completion_response
    return build(rid, model_name, "".join(parts), event.finish, prompt_tokens, event.completion_tokens,
                 logprobs_body(chat, describe(logprobs)))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _stream(engine: Engine, handle, events: asyncio.Queue, rid: str, model: str, chat: bool,
                  prompt_tokens: int, include_usage: bool, describe):
    """SSE chunks; starlette cancels this generator when the client disconnects, and `finally` cancels the request.

    With logprobs, each token's entry rides on the chunk of the event that reported it (its text may
    come in a later chunk when a possible stop string holds it back)."""
    created = int(time.time())
    sent = 0  # characters of text sent: the completions API's text_offset

    def chunk(text: str | None, finish: str | None = None, logprobs: dict | None = None) -> dict:
        if chat:
            return chat_chunk(rid, model, created, {} if text is None else {"content": text}, finish, logprobs)
        return completion_chunk(rid, model, created, text or "", finish, logprobs)

    try:
        if chat:
            yield _sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if event.finish in ("error", "cancelled"):
                err = _failed(event)
                yield _sse(error_body(err.message, err.type))
                break
            if event.text or event.logprobs:
                yield _sse(chunk(event.text, logprobs=logprobs_body(chat, describe(event.logprobs), sent)))
                sent += len(event.text)
            if event.finish is not None:
                yield _sse(chunk(None, event.finish))
                if include_usage:
                    final = chunk(None)
                    final["choices"] = []
                    final["usage"] = usage(prompt_tokens, event.completion_tokens)
                    yield _sse(final)
                break
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(handle)


def serve_main(args) -> int:
    """`overspill serve`: load the model, then serve until interrupted."""
    import uvicorn

    from .api import load, placement_of
    from .errors import OverspillError

    if min(args.max_queue, args.max_new_tokens_limit, args.max_batch) < 1:
        raise OverspillError("--max-queue, --max-new-tokens-limit and --max-batch must be at least 1")
    model, tokenizer = load(
        args.model, gpu_memory=args.gpu_memory, dtype=args.dtype, random_weights=args.random_weights,
        depth=args.depth, context=args.context, batch=args.max_batch, device=args.device,
        kv_gpu_memory=args.kv_gpu_memory,
    )
    print(placement_of(model).summary())
    name = _served_name(args.model)
    config = ServerConfig(name, placement_of(model).plan.workload.context, args.max_queue,
                          args.max_new_tokens_limit, args.api_key, args.max_batch)
    app = create_app(model, tokenizer, config)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (OpenAI API)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _served_name(model: str | None) -> str:
    from pathlib import Path

    if model is None:
        return "SmolLM2-135M-Instruct"
    path = Path(model)
    return path.name if path.exists() else model
