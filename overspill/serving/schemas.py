"""Request bodies of the OpenAI-compatible server (pydantic), and the shapes of its responses.

A body is checked the way OpenAI checks it, so a client learns at once what this server will not do:
every sampling field is held to the range the kernels take (`seed` fits 64 bits, as
`torch.Generator.manual_seed` takes it; `top_k` fits 32 bits; no number field NaN or infinite); a
field this server does not implement (`tools`, `logit_bias`, non-zero penalties, image parts, ...)
is a 400 that names it unless it holds its no-op value; a field that neither OpenAI nor this server
knows (`top_k` is this server's own) is a 400 too. Fields that change nothing about the answer
(`user`, `metadata`, `store`, `parallel_tool_calls`, a message's `name`, ...) are accepted and
ignored. Lone surrogates (a JSON `"\\ud800"` escape) in any string become U+FFFD before anything
reads them.
"""

from __future__ import annotations

import codecs
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch.Generator.manual_seed: any int of 64 bits, signed or not
TOP_K_MAX = 2**31 - 1  # sampling caps top_k at the vocabulary; this only keeps it a plain int
MAX_STOP = 4  # stop sequences per request, as at OpenAI
_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(data: Any) -> Any:
    """`data` (parsed JSON) with every lone surrogate in its strings and keys replaced by U+FFFD.

    json.loads turns a `"\\ud800"` escape into a str that cannot be encoded as UTF-8, which the
    tokenizer and the JSON encoder of an error reply then fail on. Lists and dicts are fixed in place,
    walked with a stack: a JSON nesting as deep as json.loads allows must not exhaust Python's.
    """
    if isinstance(data, str):
        return _clean(data)
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in [k for k in node if isinstance(k, str) and _SURROGATE.search(k)]:
                node[_clean(key)] = node.pop(key)
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            continue
        for key, value in items:
            if isinstance(value, str):
                node[key] = _clean(value)
            elif isinstance(value, (dict, list)):
                stack.append(value)
    return data


def _clean(text: str) -> str:
    return text if text.isascii() or not _SURROGATE.search(text) else _SURROGATE.sub("\ufffd", text)


# field -> (is this value a no-op?, the no-op values, for the error message)
_NO_OPS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (lambda v: not v, "[]"),
    "functions": (lambda v: not v, "[]"),
    "tool_choice": (lambda v: v in (None, "none"), '"none"'),
    "function_call": (lambda v: v in (None, "none"), '"none"'),
    "logit_bias": (lambda v: not v, "{}"),
    "presence_penalty": (lambda v: not v, "0"),
    "frequency_penalty": (lambda v: not v, "0"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, '{"type": "text"}'),
    "modalities": (lambda v: v is None or v == ["text"], '["text"]'),
    "audio": (lambda v: v is None, "null"),
    "prediction": (lambda v: v is None, "null"),
    "reasoning_effort": (lambda v: v is None, "null"),
    "verbosity": (lambda v: v is None, "null"),
    "web_search_options": (lambda v: v is None, "null"),
    "best_of": (lambda v: v in (None, 1), "1"),
    "suffix": (lambda v: not v, 'null or ""'),
    "echo": (lambda v: not v, "false"),
    "tool_calls": (lambda v: not v, "[]"),
}


def _no_op(value: Any, info: ValidationInfo) -> Any:
    """A field this server does not implement passes only at a value that asks for nothing."""
    is_no_op, accepted = _NO_OPS[info.field_name]
    if not is_no_op(value):
        raise ValueError(f"{info.field_name} is not supported by this server: leave it out or send {accepted}")
    return value


class _Sampling(BaseModel):
    """Fields shared by chat and text completions."""

    # strict: "5" or true is not a max_tokens, nor "yes" a stream flag (OpenAI answers them 400; ints still
    # pass for floats)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: 1, as at OpenAI
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=TOP_K_MAX)  # not OpenAI's; -1, 0 or None: no top-k cut
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    # this server's own: draft tokens while the request runs alone ("ngram", the server's "draft:PATH",
    # or "off"); None: the server's --speculate
    speculate: str | None = Field(None, max_length=4096)
    # accepted and ignored: they change nothing about the answer
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # not implemented: accepted only at their no-op values
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    check_no_ops = field_validator("logit_bias", "presence_penalty", "frequency_penalty")(_no_op)

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data: Any) -> Any:
        return without_lone_surrogates(data)

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # accepted; chat templates do not show it
    refusal: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[Any] | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None

    check_no_ops = field_validator("tool_calls", "function_call", "audio")(_no_op)

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        for i, part in enumerate(content if isinstance(content, list) else ()):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} is of type {kind!r}: this server reads only "
                                 "{\"type\": \"text\", \"text\": ...} parts")
        return content

    @model_validator(mode="after")
    def _user_says_something(self) -> "ChatMessage":
        """A user message without content is a client's mistake, answered 400 as at OpenAI (an assistant
        turn may carry only a refusal or tool calls)."""
        if self.role == "user" and self.content is None:
            raise ValueError("a user message needs its content")
        return self

    def text(self) -> str:
        """The message's text (of its text parts, when a list)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool | None = None  # ignored: there are no tools
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None

    check_chat_no_ops = field_validator(
        "tools", "functions", "tool_choice", "function_call", "response_format", "modalities", "audio",
        "prediction", "reasoning_effort", "verbosity", "web_search_options")(_no_op)

    def logprobs_k(self) -> int | None:
        """Alternatives per token to report, or None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    suffix: str | None = None

    check_text_no_ops = field_validator("echo", "best_of", "suffix")(_no_op)

    def logprobs_k(self) -> int | None:
        return self.logprobs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, speculation: dict | None = None) -> dict:
    """OpenAI's usage object; `speculation` (this server's extension) when the request drafted."""
    out: dict = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if speculation is not None:
        out["speculation"] = speculation
    return out


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                  logprobs: dict | None = None) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                     "finish_reason": finish}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None,
               logprobs: dict | None = None) -> dict:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
    }


def completion_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                        logprobs: dict | None = None) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None = None,
                     logprobs: dict | None = None) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }


@dataclass(frozen=True)
class TokenInfo:
    """A token as the logprobs objects show it: its text, its exact bytes, its log-probability, alternatives."""

    text: str
    bytes: list[int]
    logprob: float
    top: tuple["TokenInfo", ...] = ()


def chat_logprobs(tokens: list[TokenInfo]) -> dict:
    """Chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    def entry(t: TokenInfo) -> dict:
        return {"token": t.text, "logprob": t.logprob, "bytes": t.bytes}

    return {"content": [{**entry(t), "top_logprobs": [entry(a) for a in t.top]} for t in tokens]}


class TextOffsets:
    """The completions API's `text_offset`s of a request's tokens, in order: where each token's text starts
    in the completion, in characters. Counted from the tokens' bytes, not their shown text (a token holding
    part of a UTF-8 character shows as "bytes:\\xNN"): such a token adds no character until one completes."""

    def __init__(self):
        self.chars = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def of(self, tokens: list[TokenInfo]) -> list[int]:
        offsets = []
        for t in tokens:
            offsets.append(self.chars)
            self.chars += len(self._decoder.decode(bytes(t.bytes)))
        return offsets


def completion_logprobs(tokens: list[TokenInfo], offsets: TextOffsets | None = None) -> dict:
    """Legacy completions `logprobs` object: parallel lists, offsets counted in characters of the text
    (`offsets`: of a stream's earlier chunks, else the tokens are the completion's first)."""
    return {
        "tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{a.text: a.logprob for a in t.top} for t in tokens],
        "text_offset": (offsets or TextOffsets()).of(tokens),
    }


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
