"""The generation engine: one thread owns the model; callers submit requests and read token events.

`Engine.submit` is thread-safe and returns a `Handle` at once (or raises `QueueFull`). The engine
thread admits queued requests into `_active` and advances every active sequence one token per
iteration of its loop, checking cancellation and stop sequences between tokens. This first version
admits one sequence at a time (FIFO, `max_active=1`); the per-sequence state lives in `_Sequence`
so a continuous-batching step can replace `_step` without changing the interface.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


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


@dataclass(frozen=True)
class Event:
    """One message from the engine: `text` is new output; `finish` is set on the last event only
    ("stop", "length", "cancelled" or "error"); `error` carries the message of a failed request."""

    text: str = ""
    new_tokens: int = 0
    finish: str | None = None
    completion_tokens: int = 0
    error: str | None = None


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


@dataclass
class _Sequence:
    """Per-request decode state, owned by the engine thread."""

    handle: Handle
    cache: Any
    generator: torch.Generator
    submitted: float
    token_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    last_token_time: float = 0.0
    next_input: torch.Tensor | None = None  # None before prefill


class Engine:
    """Owns `model` on one thread. Args: model and tokenizer from `overspill.load`; max_queue: the
    most requests waiting (not yet running) before `submit` raises `QueueFull`."""

    def __init__(self, model, tokenizer, max_queue: int = 64, metrics: NullMetrics | None = None,
                 tokenizer_lock: threading.Lock | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.max_active = 1
        self.metrics = metrics or NullMetrics()
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None) or getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        params = inspect.signature(model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"
        self._keep_last = "logits_to_keep" in params
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._pending: collections.deque[Handle] = collections.deque()
        self._active: list[_Sequence] = []
        self._hold = False  # tests: keep requests queued
        self.cancelled_total = 0  # requests that ended by cancel(), queued or running
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- caller side (any thread) ---

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="overspill-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None] | None = None) -> Handle:
        """Queue `request`; its events go to `sink` (called on the engine thread) or the handle's queue."""
        if request.max_new_tokens < 1 or not request.prompt_ids:
            raise ValueError("a request needs a prompt and max_new_tokens >= 1")
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already")
            handle = Handle(next(self._ids), request, sink)
            self._pending.append(handle)
            self._cond.notify_all()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop `handle` before its next token; a queued request is dropped without running."""
        if handle.cancelled.is_set():
            return
        handle.cancelled.set()
        with self._cond:
            if handle in self._pending:  # free its queue place now, not when the engine next looks
                self._pending.remove(handle)
                self.cancelled_total += 1
                handle.emit(Event(finish="cancelled"))
            self._cond.notify_all()

    def hold(self, on: bool) -> None:
        """Test hook: while held, the engine admits nothing, so requests stay queued."""
        with self._cond:
            self._hold = on
            self._cond.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def live_requests(self) -> int:
        """Requests the engine still holds state for, queued or running (0 when idle: nothing leaked)."""
        with self._cond:
            return len(self._pending) + len(self._active)

    # --- engine thread ---

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled_pending()
                while not self._stop and not self._active and (self._hold or not self._pending):
                    self._cond.wait(0.5)
                    self._drop_cancelled_pending()
                if self._stop:
                    break
                while not self._hold and self._pending and len(self._active) < self.max_active:
                    self._active.append(self._admit(self._pending.popleft()))
            for seq in list(self._active):
                if seq.handle.cancelled.is_set():
                    event = Event(finish="cancelled", completion_tokens=len(seq.token_ids))
                    self.cancelled_total += 1
                else:
                    try:
                        event = self._step(seq)
                    except Exception as exc:  # one bad request must not stop the server
                        event = Event(finish="error", error=f"{type(exc).__name__}: {exc}",
                                      completion_tokens=len(seq.token_ids))
                if event.finish is not None:  # forget the sequence before its caller hears it ended
                    with self._cond:
                        self._active.remove(seq)
                    seq.cache = seq.next_input = None
                seq.handle.emit(event)
        with self._cond:  # shutting down: tell every caller still waiting
            handles = [seq.handle for seq in self._active] + list(self._pending)
            self._active.clear()
            self._pending.clear()
        for handle in handles:
            handle.emit(Event(finish="cancelled"))

    def _drop_cancelled_pending(self) -> None:
        for handle in [h for h in self._pending if h.cancelled.is_set()]:
            self._pending.remove(handle)
            self.cancelled_total += 1
            handle.emit(Event(finish="cancelled"))

    def _admit(self, handle: Handle) -> _Sequence:
        gen = torch.Generator(device="cpu")
        if handle.request.seed is not None:
            gen.manual_seed(handle.request.seed)
        else:
            gen.seed()
        placement = getattr(self.model, "overspill", None)
        cache = placement.new_cache(self.model.config) if placement is not None else None
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        return _Sequence(handle, cache, gen, time.perf_counter())

    @torch.inference_mode()
    def _step(self, seq: _Sequence) -> Event:
        """Advance `seq` by one token (the first call runs the prefill); the event says if it finished."""
        req = seq.handle.request
        ids = seq.next_input
        if ids is None:
            ids = torch.tensor([list(req.prompt_ids)], device=self.device)
        kwargs = {self._cache_key: seq.cache, "use_cache": True}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        logits = self.model(input_ids=ids, **kwargs).logits[0, -1].float()  # [vocab]
        token = _sample(logits, req, seq.generator)
        now = time.perf_counter()
        if seq.token_ids:
            self.metrics.inter_token(now - seq.last_token_time)
        else:
            self.metrics.first_token(now - seq.submitted)
        seq.last_token_time = now
        seq.token_ids.append(token)
        seq.next_input = torch.tensor([[token]], device=self.device)
        self.metrics.generated(1)
        return self._text_event(seq, eos=token in self.eos_ids)

    def _text_event(self, seq: _Sequence, eos: bool) -> Event:
        """The text that can no longer change since the last event, cut at a stop string; with the finish reason."""
        req = seq.handle.request
        with self.tokenizer_lock:
            text = self.tokenizer.decode(seq.token_ids, skip_special_tokens=True)
        finish = None
        cut = len(text)
        for stop in req.stop:  # search a little before the emitted part: a stop may span the boundary
            at = text.find(stop, max(0, seq.emitted_chars - len(stop)))
            if at != -1 and at < cut:
                cut, finish = at, "stop"
        if finish is None and eos:
            finish = "stop"
        if finish is None and len(seq.token_ids) >= req.max_new_tokens:
            finish = "length"
        safe = cut if finish is not None else _stable_prefix(text, req.stop)
        delta = text[seq.emitted_chars:safe] if safe > seq.emitted_chars else ""
        seq.emitted_chars = max(seq.emitted_chars, safe)
        return Event(text=delta, new_tokens=1, finish=finish, completion_tokens=len(seq.token_ids))


def _stable_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of `text` safe to send: hold back an incomplete UTF-8 tail and any start of a stop string."""
    safe = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                safe = min(safe, len(text) - k)
                break
    return safe


def _sample(logits: torch.Tensor, req: GenerationRequest, gen: torch.Generator) -> int:
    """One token id from last-position logits [vocab]: greedy at temperature 0, else top-k/top-p sampling."""
    if req.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / req.temperature
    if 0 < req.top_k < logits.numel():
        kth = torch.topk(logits, req.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if req.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > req.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=gen))
