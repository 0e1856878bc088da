"""What callers exchange with the engine: requests, events, handles, and the metrics interface."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

from .sampling import TokenLogprob

__all__ = ["Event", "GenerationRequest", "Handle", "KVStats", "NullMetrics", "QueueFull", "TokenLogprob"]


class QueueFull(Exception):
    """The engine's queue holds `max_queue` waiting requests already."""


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. temperature 0 is greedy; top_k <= 0 and top_p >= 1 disable those cuts."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: each token's log-probability and the top k alternatives


@dataclass(frozen=True)
class Event:
    """One message from the engine: `text` is new output; `finish` is set on the last event only
    ("stop", "length", "cancelled" or "error"); `error` carries the message of a failed request."""

    text: str = ""
    finish: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens generated since the last event, when asked for


class Handle:
    """A submitted request. Iterate it (blocking) for events, unless a `sink` was given to `submit`."""

    def __init__(self, rid: int, request: GenerationRequest, sink: Callable[[Event], None] | None):
        self.id = rid
        self.request = request
        self.cancelled = threading.Event()
        self._queue: queue.Queue[Event] | None = None if sink is not None else queue.Queue()
        self._sink = sink if sink is not None else self._queue.put  # type: ignore[union-attr]

    def emit(self, event: Event) -> None:
        try:
            self._sink(event)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening any more
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


@dataclass(frozen=True)
class KVStats:
    """KV accounting for `/metrics`: blocks of `block_tokens` tokens, and bytes held per tier."""

    block_tokens: int
    total_blocks: int
    used_blocks: int  # holding KV of admitted sequences now
    reserved_blocks: int  # promised to admitted sequences (prompt + max_new_tokens)
    gpu_bytes: int  # KV bytes held in device memory, padding of the shared batch cache included
    host_bytes: int  # ... and in pinned host memory (host-tier KV layers)
    prefix_lookup_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # ... whose KV was restored from it instead of computed
