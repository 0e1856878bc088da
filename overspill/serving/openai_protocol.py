"""OpenAI request bodies in, engine requests out; engine events in, OpenAI response bodies out.

Shared by the HTTP server and `overspill batch`, so both check, tokenize and answer the same way.
Needs pydantic (the `server` extra) but no web framework.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .defaults import (  # noqa: F401 - DEFAULT_MAX_QUEUE and DEFAULT_MAX_BODY_BYTES are read from here too
    DEFAULT_COMPLETION_TOKENS, DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_NEW_TOKENS_LIMIT,
    DEFAULT_MAX_QUEUE, SERVING_CPU_RANK, host_format_refusal,
)
from .prompt_bound import PromptBound
from .requests import Event, GenerationRequest
from .sampling import TokenLogprob
from .schemas import (
    ChatCompletionRequest, ChatMessage, CompletionRequest, TextOffsets, TokenInfo, chat_logprobs, chat_response,
    completion_logprobs, completion_response, error_body, new_id,
)



@dataclass(frozen=True)
class ServerConfig:
    """model_name: the id clients must send; context: longest prompt + completion in tokens;
    max_body_bytes: longest request body read, answered 413 past it before it is read whole;
    sampling: temperature, top_p and top_k a request gets where it names none (`sampling_defaults`)."""

    model_name: str
    context: int
    max_queue: int = DEFAULT_MAX_QUEUE
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT
    api_key: str | None = None
    max_batch: int = DEFAULT_MAX_BATCH  # sequences decoded together in one pass over the layers
    prefix_cache_bytes: int = 0  # pinned host memory for prompt-prefix KV reuse (0: off)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    sampling: dict = field(default_factory=dict)


def check_at_least_one(*flags: tuple[str, int]) -> None:
    """Refuse the first of `serve`'s or `batch`'s (flag, value) counts below 1, naming the flag and its value."""
    from ..errors import OverspillError

    for flag, value in flags:
        if value < 1:
            raise OverspillError(f"{flag} must be at least 1, got {value}")


def sampling_defaults(model) -> dict:
    """The temperature, top_p and top_k the model's generation_config.json sets, as vLLM serves with them
    (and `generate` samples with them where the file turns sampling on); OpenAI's 1, 1 and no top-k stand for
    what it leaves out, and for values a request could not ask for (a top_p of 0 would refuse every request)."""
    config = getattr(model, "generation_config", None)
    given = config.to_diff_dict() if config is not None else {}
    valid = {"temperature": lambda v: 0 <= v <= 2, "top_p": lambda v: 0 < v <= 1, "top_k": lambda v: v >= 0}
    return {key: given[key] for key, ok in valid.items()
            if isinstance(given.get(key), (int, float)) and not isinstance(given[key], bool) and ok(given[key])}


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` body with `status`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def validation_error(errors: list[dict]) -> ApiError:
    """The 400 for a body that failed pydantic validation, naming the first offending field."""
    first = _most_telling(errors)
    kind, msg = first.get("type"), str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if kind == "json_invalid":
        return ApiError(400, f"malformed JSON body: {msg}", code="invalid_json")
    param = _param(first.get("loc", ()), kind)
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param)
    return ApiError(400, f"{param or 'body'}: {msg}", param=param)


def _most_telling(errors: list[dict]) -> dict:
    """The first error that is not a type mismatch: of `"stop": [5 strings]`, "at most 4 items",
    not "should be a valid string" from trying the union's `str` branch first."""
    if not errors:
        return {"msg": "invalid request", "loc": ()}
    return next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])


_FIELDS = set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields) | set(ChatMessage.model_fields)


def _param(loc, kind: str | None) -> str | None:
    """`loc` as OpenAI's `param` ("messages.0.content"), without FastAPI's "body" and pydantic's
    union branch names ("stop.list[str].3" is "stop")."""
    parts = list(loc[1:] if loc[:1] in (("body",), ["body"]) else loc)
    kept: list[str] = []
    for i, part in enumerate(parts):
        if not (isinstance(part, int) or part in _FIELDS or (kind == "extra_forbidden" and i == len(parts) - 1)):
            break
        kept.append(str(part))
    return ".".join(kept) or None


def failed(event: Event) -> ApiError:
    """The error for a request the engine ended without an answer."""
    if event.finish == "cancelled":
        return ApiError(503, "the request was cancelled (server shutting down)", "server_error")
    return ApiError(500, f"generation failed: {event.error}", "server_error")


def kv_sharing_note(workload, max_batch: int, host_kv: bool = False) -> str:
    """One line on how the planned KV is shared: by `max_batch` full-context sequences, or fewer; with some
    layers' KV in host memory (`host_kv`) one request at a time, as the engine then runs them."""
    if host_kv:
        return (f"KV reserved for {workload.batch} sequence{'s' * (workload.batch != 1)} of {workload.context} "
                "tokens, some layers' KV in host memory: requests run one at a time")
    if workload.batch >= max_batch:
        return f"KV reserved for {workload.batch} sequences of {workload.context} tokens"
    return (f"KV reserved for {workload.batch} sequences of {workload.context} tokens (more would push KV to "
            f"host memory, which does not batch): up to {max_batch} requests share it, as their prompt + "
            f"max_tokens allow")


def load_for_serving(args) -> tuple:
    """`serve` and `batch`: load `args.model` planned for the engine (the largest batch up to
    `--max-batch` whose KV stays on the GPU, activations for one engine pass) and print the plan."""
    from ..api import load, placement_of
    from ..errors import OverspillError
    from ..planning.placement import serving_pass_tokens

    if getattr(args, "cpu_compute", "off") not in ("off", "auto"):
        raise OverspillError(f"--cpu-compute {args.cpu_compute}: {SERVING_CPU_RANK}; use --cpu-compute off")
    if getattr(args, "cpu_compute_format", "bf16") != "bf16":
        raise OverspillError(host_format_refusal(args.cpu_compute_format))
    model, tokenizer = load(
        args.model, gpu_memory=args.gpu_memory, dtype=args.dtype, random_weights=args.random_weights,
        seed=getattr(args, "seed", 0),
        depth=args.depth, context=args.context, batch=args.max_batch, device=args.device,
        kv_gpu_memory=args.kv_gpu_memory, fit_batch=True, pass_tokens=serving_pass_tokens(args.max_batch),
        streaming=args.streaming, cuda_graphs=getattr(args, "cuda_graphs", False),
        stream_format=getattr(args, "stream_format", "auto"), moe_streaming=getattr(args, "moe_streaming", "auto"),
        # planned as `plan --serve --speculate` shows it: a draft model in the budget, whole MoE layers streamed
        # (expert streaming does not verify drafts), the streamed layers spread under layout "auto"
        cpu_experts=getattr(args, "cpu_experts", "off"), speculate=getattr(args, "speculate", None),
        layout=getattr(args, "layout", "auto"),
    )
    plan = placement_of(model).plan
    print(plan.summary())
    print(kv_sharing_note(plan.workload, args.max_batch, bool(plan.kv_host_layers)))
    return model, tokenizer


def served_name(model: str | None) -> str:
    """The model id clients must send: a path's last part, an HF id or shipped name as given."""
    if model is None:
        return "SmolLM2-135M-Instruct"
    path = Path(model)
    return path.name if path.exists() else model


def generation_request(body: ChatCompletionRequest | CompletionRequest, tokenizer, lock: threading.Lock,
                       config: ServerConfig, bound: PromptBound | None = None) -> GenerationRequest:
    """Check a chat or text completion body and tokenize its prompt; raises `ApiError` with the status to answer.

    With `bound`, a prompt that cannot fit the context is refused from its length, before the
    tokenizer spends seconds on it (and `lock`, which every other request waits for)."""
    _check_body(body, config)
    chat = isinstance(body, ChatCompletionRequest)
    param = "messages" if chat else "prompt"
    limit_param = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
    if chat:
        max_tokens = body.max_completion_tokens or body.max_tokens
        # "developer" is OpenAI's newer name for "system", which is the one chat templates know
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        text, special = _chat_text(tokenizer, messages)
    else:
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_TOKENS
        text, special = _single_prompt(body.prompt), True
    if max_tokens is not None and max_tokens > config.max_new_tokens_limit:
        raise ApiError(400, f"{limit_param} must be between 1 and {config.max_new_tokens_limit}, got {max_tokens}",
                       param=limit_param)
    with lock:
        if bound is not None:
            _check_fits(bound.min_tokens(text), config.context, param, "at least ")
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    if not ids:
        raise ApiError(400, f"the prompt is empty: {param} holds no text", param=param)
    _check_fits(len(ids), config.context, param)
    asked = body.max_tokens is not None or (chat and body.max_completion_tokens is not None)
    if asked and len(ids) + max_tokens > config.context:  # OpenAI and vLLM refuse, not cut, what was asked for
        raise ApiError(400, f"This model's maximum context length is {config.context} tokens. However, you requested "
                       f"{len(ids) + max_tokens} tokens ({len(ids)} in the {param}, {max_tokens} in the completion). "
                       f"Please reduce the length of the {param} or {limit_param}.",
                       param=limit_param, code="context_length_exceeded")
    wanted = max_tokens if max_tokens is not None else config.max_new_tokens_limit
    return GenerationRequest(
        prompt_ids=tuple(ids), max_new_tokens=min(wanted, config.context - len(ids)),
        temperature=config.sampling.get("temperature", 1.0) if body.temperature is None else body.temperature,
        top_p=config.sampling.get("top_p", 1.0) if body.top_p is None else body.top_p,
        top_k=config.sampling.get("top_k", 0) if body.top_k is None else body.top_k, stop=body.stop_list(),
        seed=body.seed, logprobs=body.logprobs_k(),
    )


def _check_body(body: ChatCompletionRequest | CompletionRequest, config: ServerConfig) -> None:
    """What the schema cannot check alone: the served model's name, and fields that depend on each other."""
    if body.model != config.model_name:
        raise ApiError(404, f"model {body.model!r} does not exist; this server serves {config.model_name!r}",
                       "not_found_error", param="model", code="model_not_found")
    if body.n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def _single_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) != 1:
        raise ApiError(400, "only one prompt per request is supported yet", param="prompt")
    return prompt[0]


def _check_fits(tokens: int, context: int, param: str, qualifier: str = "") -> None:
    """OpenAI's 400 for a prompt that leaves no room for a completion in the context."""
    if tokens >= context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, your {param} "
                       f"resulted in {qualifier}{tokens} tokens. Please reduce the length of the {param}.",
                       param=param, code="context_length_exceeded")


def _chat_text(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """The chat prompt as text, and whether tokenizing it should add special tokens (a chat template
    writes its own, as `apply_chat_template` then tokenizes it)."""
    if not getattr(tokenizer, "chat_template", None):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:", True
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False
    except TemplateError as exc:  # e.g. roles that do not alternate, raised by the template itself
        raise ApiError(400, f"the model's chat template refused these messages: {exc}", param="messages") from None


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text, special = _chat_text(tokenizer, messages)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


class TokenTexts:
    """Token ids as the text and exact bytes OpenAI's logprobs show.

    `decode([id])` loses bytes: a token holding half of a UTF-8 character decodes to "\\ufffd". The
    bytes come from the vocabulary instead: byte-level BPE maps each byte to one printable character
    (GPT-2's table), SentencePiece writes spaces as "▁" and lone bytes as "<0xNN>". A token whose
    bytes are not valid UTF-8 reads "bytes:\\xNN..." as at OpenAI.
    """

    def __init__(self, tokenizer, lock: threading.Lock):
        self.tokenizer, self.lock = tokenizer, lock
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = backend is not None and '"ByteLevel"' in backend.to_str()
        self._bytes_of = _gpt2_byte_decoder() if self.byte_level else {}

    def describe(self, entries: list[TokenLogprob]) -> list[TokenInfo]:
        if not entries:
            return []
        with self.lock:
            return [TokenInfo(*self._token(e.token_id), e.logprob,
                              tuple(TokenInfo(*self._token(i), lp) for i, lp in e.top)) for e in entries]

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        raw = self._bytes(piece) if isinstance(piece, str) else self.tokenizer.decode([token_id]).encode()
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    def _bytes(self, piece: str) -> bytes:
        if self.byte_level and all(c in self._bytes_of for c in piece):
            return bytes(self._bytes_of[c] for c in piece)
        lone = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if lone:
            return bytes([int(lone.group(1), 16)])
        return piece.replace("\u2581", " ").encode()


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level table inverted: printable character -> the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def logprobs_body(chat: bool, tokens: list[TokenInfo], offsets: TextOffsets | None = None) -> dict | None:
    """The response's `logprobs` object for these tokens (None when none were asked for); `offsets`: a
    stream's, which counts the text_offset of a completion's tokens across its chunks."""
    if not tokens:
        return None
    return chat_logprobs(tokens) if chat else completion_logprobs(tokens, offsets)


@dataclass
class Collected:
    """A non-streamed request's events gathered into one response."""

    chat: bool
    prompt_tokens: int
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: Event | None = None

    def add(self, event: Event) -> bool:
        """Take one event; True once the request has ended."""
        self.parts.append(event.text)
        self.logprobs.extend(event.logprobs)
        self.last = event
        return event.finish is not None

    def response(self, model: str, texts: TokenTexts) -> tuple[int, dict]:
        """(status, body) of the answer: the completion, or the error that ended the request."""
        event = self.last
        if event.finish in ("error", "cancelled"):
            err = failed(event)
            return err.status, err.body()
        build, prefix = (chat_response, "chatcmpl") if self.chat else (completion_response, "cmpl")
        return 200, build(new_id(prefix), model, "".join(self.parts), event.finish, self.prompt_tokens,
                          event.completion_tokens, logprobs_body(self.chat, texts.describe(self.logprobs)))
