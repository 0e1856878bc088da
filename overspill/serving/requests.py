"""What callers exchange with the engine: requests (and their checks), events, handles, and the metrics interface.

No torch: the scheduler imports this module. `TokenLogprob` lives with the sampling kernels and is
re-exported from here on first use (`__getattr__`), since callers import it from here.
"""

from __future__ import annotations

import logging
import math
import numbers
import operator
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .sampling import TokenLogprob

log = logging.getLogger(__name__)

__all__ = ["Event", "GenerationRequest", "Handle", "InvalidRequest", "KVStats", "NullMetrics", "QueueFull",
           "SpeculationUsage", "TokenLogprob", "check_request"]

# torch.Generator.manual_seed takes any int that fits 64 bits, signed or not (negatives wrap around)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit): each one is a tuple on every event
SPECULATE_OFF = "off"  # a request's `speculate` that turns the engine's default off


def __getattr__(name: str) -> Any:
    if name == "TokenLogprob":
        from .sampling import TokenLogprob

        return TokenLogprob
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class QueueFull(Exception):
    """The engine's queue holds `max_queue` waiting requests already."""


class InvalidRequest(ValueError):
    """A request the engine will not run. `field` names the `GenerationRequest` field at fault;
    `code` is set for a valid request too big for this engine ("context_length_exceeded",
    "kv_capacity_exceeded")."""

    def __init__(self, field: str, message: str, code: str | None = None):
        super().__init__(message)
        self.field, self.code = field, code


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. temperature 0 (or below `sampling.MIN_TEMPERATURE`) is greedy; top_k <= 0 (or
    beyond the vocabulary) and top_p 1 disable those cuts. `Engine.submit` checks the ranges (`check_request`)."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: each token's log-probability and the top k alternatives
    speculate: str | None = None  # draft source while it runs alone: None the engine's default, "off", "ngram", ...


def check_request(request: GenerationRequest, vocab_size: int, context: int) -> None:
    """Refuse fields outside what the kernels take, so a bad request fails at submit, not in a shared batch.

    Accepted: any int seed that fits 64 bits; temperature finite and >= 0 (below the sampling floor a
    row is greedy); top_p in (0, 1]; any int top_k (<= 0 or >= the vocabulary: no cut); logprobs
    None or 0..MAX_LOGPROBS; max_new_tokens >= 1; a non-empty prompt of ids in [0, vocab_size);
    prompt + max_new_tokens within `context`.

    Raises:
        InvalidRequest: naming the first field at fault, in one line.
    """
    _check_int(request, "max_new_tokens", 1, None)
    if request.seed is not None:
        _check_int(request, "seed", SEED_MIN, SEED_MAX)
    _check_int(request, "top_k", None, None)
    if request.logprobs is not None:
        _check_int(request, "logprobs", 0, MAX_LOGPROBS)
    fault = sampling_fault(_real(request, "temperature"), _real(request, "top_p"))
    if fault is not None:
        raise InvalidRequest(*fault)
    if not isinstance(request.stop, (tuple, list)) or not all(isinstance(s, str) for s in request.stop):
        raise InvalidRequest("stop", f"stop must be a tuple of strings, got {request.stop!r}")
    _check_prompt(request.prompt_ids, vocab_size)
    _check_speculate(request.speculate)
    if len(request.prompt_ids) + request.max_new_tokens > context:
        raise InvalidRequest("max_new_tokens", f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                             f"({request.max_new_tokens}) exceeds the context of {context} tokens",
                             code="context_length_exceeded")


def sampling_fault(temperature: float, top_p: float) -> tuple[str, str] | None:
    """(field, one-line reason) for the first of `temperature` and `top_p` sampling cannot take, else None: one
    rule for requests and for `overspill run`'s flags."""
    if not (math.isfinite(temperature) and temperature >= 0):
        return "temperature", f"temperature must be finite and >= 0, got {temperature!r}"
    if not 0 < top_p <= 1:  # NaN fails too
        return "top_p", f"top_p must be in (0, 1], got {top_p!r}"
    return None


def _check_speculate(source: object) -> None:
    from ..planning.speculation import check_source

    if source is None or source == SPECULATE_OFF:
        return
    if not isinstance(source, str):
        raise InvalidRequest("speculate", f"speculate must be a string, got {source!r}")
    try:
        check_source(source)
    except ValueError as exc:
        raise InvalidRequest("speculate", f"{exc}, or {SPECULATE_OFF!r}") from None


def check_speculate(source: str | None, tree: int | None = None) -> None:
    """A bad `--speculate` or `--speculate-tree` of `serve` or `batch` fails in one line, before the model loads.
    A tree budget needs no `--speculate`: requests may name a source in their body.

    Raises:
        OverspillError: naming the source and the ones accepted, or what the tree budget needs."""
    from ..errors import OverspillError
    from ..planning.speculation import check_source
    from ..planning.trees import check_tree

    if source is not None:
        try:
            check_source(source)
        except ValueError as exc:
            raise OverspillError(f"--speculate: {exc}") from None
    try:
        check_tree(tree, source, per_request=True)
    except ValueError as exc:
        raise OverspillError(f"--speculate-tree: {exc}") from None


def _check_int(request: GenerationRequest, field: str, low: int | None, high: int | None) -> None:
    value = getattr(request, field)
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InvalidRequest(field, f"{field} must be an integer, got {value!r}")
    value = operator.index(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidRequest(field, f"{field} must be {bounds}, got {value}")


def _real(request: GenerationRequest, field: str) -> float:
    value = getattr(request, field)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequest(field, f"{field} must be a number, got {value!r}")
    return float(value)


def _check_prompt(ids: tuple[int, ...], vocab_size: int) -> None:
    """Ids outside the embedding would fail the whole prefill group the prompt is batched into."""
    if not isinstance(ids, (tuple, list)) or not all(hasattr(i, "__index__") and not isinstance(i, bool) for i in ids):
        raise InvalidRequest("prompt_ids", "prompt_ids must be a tuple of integer token ids")
    if not ids:
        raise InvalidRequest("prompt_ids", "prompt_ids is empty: a request needs a prompt")
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InvalidRequest("prompt_ids", f"prompt_ids holds token id {bad}, outside the vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class Event:
    """One message from the engine: `text` is new output; `finish` is set on the last event only
    ("stop", "length", "cancelled" or "error"); `error` carries the message of a failed request."""

    text: str = ""
    finish: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens generated since the last event, when asked for
    speculation: SpeculationUsage | None = None  # on the last event of a request that drafted


@dataclass
class SpeculationUsage:
    """What speculative decoding did for one request: verify passes, drafted and accepted tokens, the
    tokens those passes yielded (accepted drafts + the target's own), where the time went, and with
    draft trees the budget each pass drafted for (it adapts to the acceptance measured)."""

    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    tree_budgets: list[int] = field(default_factory=list)  # per tree pass; empty for chains

    def add(self, drafted: int, accepted: int, tokens: int, draft_seconds: float, verify_seconds: float,
            budget: int | None = None) -> None:
        """One verify pass over `drafted` drafts yielded `tokens` tokens, `accepted` of them drafted;
        `budget`: the tree budget it drafted for (None: a chain)."""
        if budget is not None:
            self.tree_budgets.append(budget)
        self.passes += 1
        self.drafted += drafted
        self.accepted += accepted
        self.tokens += tokens
        self.draft_seconds += draft_seconds
        self.verify_seconds += verify_seconds

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def draft_share(self) -> float:
        total = self.draft_seconds + self.verify_seconds
        return self.draft_seconds / total if total else 0.0

    def as_dict(self) -> dict:
        """The response's `usage.speculation` object; with trees, `tree_budgets` maps each budget drafted
        for to its passes."""
        out = {"passes": self.passes, "drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
               "tokens_per_pass": round(self.tokens_per_pass, 4), "acceptance_rate": round(self.acceptance, 4),
               "draft_time_share": round(self.draft_share, 4)}
        if self.tree_budgets:
            out["tree_budgets"] = {str(b): self.tree_budgets.count(b) for b in sorted(set(self.tree_budgets))}
        return out


class Handle:
    """A submitted request. Iterate it (blocking) for events, unless a `sink` was given to `submit`."""

    def __init__(self, rid: int, request: GenerationRequest, sink: Callable[[Event], None] | None):
        self.id = rid
        self.request = request
        self.submitted = time.perf_counter()  # time to first token counts from here, the queue's wait included
        self.cancelled = threading.Event()
        self._queue: queue.Queue[Event] | None = None if sink is not None else queue.Queue()
        self._sink = sink if sink is not None else self._queue.put  # type: ignore[union-attr]

    def emit(self, event: Event) -> None:
        try:
            self._sink(event)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening any more
            self.cancelled.set()
        except Exception:  # noqa: BLE001 - a broken sink ends its own request, not the engine thread
            log.warning("the event sink of request %d raised; cancelling it", self.id, exc_info=True)
            self.cancelled.set()

    def __iter__(self):
        if self._queue is None:
            raise TypeError("this handle delivers its events to the sink given to submit()")
        while True:
            event = self._queue.get()
            yield event
            if event.finish is not None:
                return


class NullMetrics:
    """The observer interface the engine reports to; the server passes a Prometheus-backed one."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def generated(self, tokens: int) -> None: ...
    def decode_step(self, batch_size: int, seconds: float) -> None: ...
    def speculated(self, drafted: int, accepted: int, tokens: int, draft_seconds: float,
                   verify_seconds: float) -> None: ...


@dataclass(frozen=True)
class KVStats:
    """KV accounting for `/metrics`: blocks of `block_tokens` tokens (the engine's block manager), and
    bytes held per tier."""

    block_tokens: int
    total_blocks: int
    used_blocks: int  # holding KV of admitted sequences now (tokens whose KV is written)
    reserved_blocks: int  # promised to admitted sequences: every row the widest prompt + max_new_tokens (padding)
    gpu_bytes: int  # KV bytes held in device memory, padding of the shared batch cache included
    host_bytes: int  # ... and in pinned host memory (host-tier KV layers)
    prefix_lookup_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # ... whose KV was restored from it instead of computed
