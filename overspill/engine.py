"""The generation engine: one thread owns the model; callers submit requests and read token events.

`Engine.submit` is thread-safe and returns a `Handle` at once (or raises `QueueFull`). Each
iteration of the engine thread's loop admits queued requests (FIFO, while batch places and KV
blocks allow), runs one prefill chunk of the oldest admitted request, then one decode step for
every sequence in the running `DecodeBatch`: continuous batching, so new requests join at the next
step and a long prompt does not stall decoding for more than one chunk. Cancellation and stop
sequences are checked between tokens; a finished or cancelled sequence leaves the batch at once.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from transformers import DynamicCache

from .batching import DecodeBatch, mergeable
from .kvblocks import KVBlockManager


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
class TokenLogprob:
    """One generated token's log-probability under the model (before temperature), and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Event:
    """One message from the engine: `text` is new output; `finish` is set on the last event only
    ("stop", "length", "cancelled" or "error"); `error` carries the message of a failed request."""

    text: str = ""
    new_tokens: int = 0
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


@dataclass
class _Sequence:
    """Per-request state, owned by the engine thread. `cache` is its own until it joins the batch."""

    handle: Handle
    generator: torch.Generator
    submitted: float
    cache: Any = None
    prefilled: int = 0  # prompt tokens already run through the model
    token_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    last_token_time: float = 0.0


@dataclass(frozen=True)
class KVStats:
    """KV accounting for `/metrics`: blocks of `block_tokens` tokens reserved for running requests."""

    block_tokens: int
    total_blocks: int
    used_blocks: int  # holding KV of admitted sequences now
    reserved_blocks: int  # promised to admitted sequences (prompt + max_new_tokens)
    gpu_bytes: int  # KV bytes of the used blocks held in device memory
    host_bytes: int  # ... and in pinned host memory (host-tier KV layers)


class Engine:
    """Owns `model` on one thread and decodes every running request in one pass per step.

    Args:
        model, tokenizer: from `overspill.load`.
        max_queue: the most requests waiting (not yet admitted) before `submit` raises `QueueFull`.
        metrics: an observer (see `NullMetrics`).
        tokenizer_lock: shared with callers that tokenize on other threads.
        max_batch: sequences decoded together; default: the batch the plan reserved KV for.
        prefill_chunk: prompt tokens per prefill call, interleaved with decode steps of the batch.
        kv_block_tokens: accounting granularity of the KV admission control.

    A request is admitted when a batch place is free and the KV blocks for its prompt plus its
    `max_new_tokens` fit in `context x max_batch` tokens (what the plan reserved), so a running
    request never runs out of KV; until then it waits in the queue.
    """

    def __init__(self, model, tokenizer, max_queue: int = 64, metrics: NullMetrics | None = None,
                 tokenizer_lock: threading.Lock | None = None, max_batch: int | None = None,
                 prefill_chunk: int = 512, kv_block_tokens: int = 16):
        self.model = model
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.metrics = metrics or NullMetrics()
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.device = next(model.parameters()).device
        self.placement = getattr(model, "overspill", None)
        workload = self.placement.plan.workload if self.placement is not None else None
        self.max_batch = max_batch or (workload.batch if workload is not None else 1)
        if self.max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be positive, got {self.max_batch}, {prefill_chunk}")
        self.batching_note = None
        if self.max_batch > 1 and not mergeable(self._new_cache()):
            self.batching_note = ("this model's KV cache (sliding windows or host-tier KV layers) cannot be "
                                  "batched yet: requests run one at a time")
            self.max_batch = 1
        self.prefill_chunk = prefill_chunk
        context = workload.context if workload is not None else getattr(model.config, "max_position_embeddings", 4096)
        self.blocks = KVBlockManager(kv_block_tokens, -(-context * self.max_batch // kv_block_tokens), 0)
        text = model.config.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_layer_bytes = 2 * (getattr(text, "num_key_value_heads", None) or heads) * head_dim * self._dtype_bytes()
        host_layers = len(self.placement.plan.kv_host_layers) if self.placement is not None else 0
        self._kv_token_bytes = (kv_layer_bytes * (text.num_hidden_layers - host_layers), kv_layer_bytes * host_layers)
        eos = getattr(model.generation_config, "eos_token_id", None) or getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        params = inspect.signature(model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"
        self._keep_last = "logits_to_keep" in params
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._pending: collections.deque[Handle] = collections.deque()
        self._prefilling: list[_Sequence] = []
        self._batch = DecodeBatch(self.device)
        self._reserved: dict[int, int] = {}  # request id -> blocks promised
        self._kv = self._kv_snapshot()
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
        need = self._blocks_for(request)
        if need > self.blocks.usage().gpu.total_blocks:
            raise ValueError(f"the request needs {need} KV blocks; the engine has {self.blocks.usage().gpu.total_blocks}")
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
        """Sequences admitted: decoding in the batch or prefilling."""
        return len(self._batch) + len(self._prefilling)

    def live_requests(self) -> int:
        """Requests the engine still holds state for, queued or running (0 when idle: nothing leaked)."""
        with self._cond:
            return len(self._pending) + self.active_count

    def kv_stats(self) -> KVStats:
        """KV accounting as of the engine's last step (a snapshot: safe from any thread)."""
        return self._kv

    # --- engine thread ---

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._drop_cancelled_pending()
                while not self._stop and not self.active_count and (self._hold or not self._pending):
                    self._cond.wait(0.5)
                    self._drop_cancelled_pending()
                if self._stop:
                    break
                admitted = self._admit_pending()
            try:
                self._iterate(admitted)
            except Exception as exc:  # a bug or a device error: fail what runs, keep serving the queue
                for seq in admitted + self._prefilling + self._batch.rows:
                    if seq.handle.id in self._reserved:
                        self._forget(seq)
                        seq.handle.emit(_error_event(exc, seq))
                self._prefilling.clear()
                self._batch.keep([])
            self._kv = self._kv_snapshot()
        with self._cond:  # shutting down: tell every caller still waiting
            running = self._prefilling + self._batch.rows
            handles = [seq.handle for seq in running] + list(self._pending)
            self._pending.clear()
        for seq in running:
            self._forget(seq)
        self._batch.keep([])
        for handle in handles:
            handle.emit(Event(finish="cancelled"))

    def _iterate(self, admitted: list[_Sequence]) -> None:
        """Prefill up to `prefill_chunk` prompt tokens of the oldest admitted requests, then decode the batch.

        Whole prompts that fit the chunk are prefilled together, in one left-padded pass: with
        streamed weights every pass costs a full trip over the link, so a wave of new requests
        pays it once, not once each. A longer prompt is prefilled alone, a chunk per iteration.
        """
        self._prefilling.extend(admitted)
        budget, group = self.prefill_chunk, []
        for seq in list(self._prefilling):
            if seq.handle.cancelled.is_set():
                self._finish(seq, Event(finish="cancelled"), prefilling=True)
                continue
            remaining = len(seq.handle.request.prompt_ids) - seq.prefilled
            if self.max_batch > 1 and seq.prefilled == 0 and remaining <= budget:
                group.append(seq)
                budget -= remaining
            elif group or budget <= 0:
                break
            else:
                budget -= self._prefill_chunk(seq, budget)
        if group:
            self._prefill_group(group)
        if len(self._batch):
            self._decode_step()

    def _drop_cancelled_pending(self) -> None:
        for handle in [h for h in self._pending if h.cancelled.is_set()]:
            self._pending.remove(handle)
            self.cancelled_total += 1
            handle.emit(Event(finish="cancelled"))

    def _admit_pending(self) -> list[_Sequence]:
        """Move queued requests into prefill while batch places and KV blocks allow (FIFO, no overtaking)."""
        admitted = []
        total = self.blocks.usage().gpu.total_blocks
        while not self._hold and self._pending and self.active_count + len(admitted) < self.max_batch:
            handle = self._pending[0]
            need = self._blocks_for(handle.request)
            if sum(self._reserved.values()) + need > total:
                break
            self._pending.popleft()
            self._reserved[handle.id] = need
            self.blocks.allocate(handle.id, ())
            gen = torch.Generator(device="cpu")
            if handle.request.seed is not None:
                gen.manual_seed(handle.request.seed)
            else:
                gen.seed()
            admitted.append(_Sequence(handle, gen, time.perf_counter()))
        return admitted

    def _new_cache(self) -> Any:
        """The plan's cache for one sequence (a `TieredCache` with host-KV layers), else a dynamic one."""
        cache = self.placement.new_cache(self.model.config) if self.placement is not None else None
        return cache if cache is not None else DynamicCache(config=self.model.config)

    def _dtype_bytes(self) -> int:
        return next(self.model.parameters()).element_size()

    def _kv_snapshot(self) -> KVStats:
        usage = self.blocks.usage().gpu
        tokens = sum(self.blocks.num_tokens(rid) for rid in self._reserved)
        gpu, host = self._kv_token_bytes
        return KVStats(self.blocks.block_tokens, usage.total_blocks, usage.used_blocks,
                       sum(self._reserved.values()), tokens * gpu, tokens * host)

    def _blocks_for(self, request: GenerationRequest) -> int:
        return -(-(len(request.prompt_ids) + request.max_new_tokens) // self.blocks.block_tokens)

    @torch.inference_mode()
    def _prefill_group(self, group: list[_Sequence]) -> None:
        """Prefill whole prompts together (left-padded, one pass), sample each first token, join the batch."""
        prompts = [seq.handle.request.prompt_ids for seq in group]
        width = max(map(len, prompts))
        ids = torch.tensor([(0,) * (width - len(p)) + tuple(p) for p in prompts], device=self.device)
        valid = torch.tensor([[j >= width - len(p) for j in range(width)] for p in prompts], device=self.device)
        cache = self._new_cache()
        kwargs = {self._cache_key: cache, "attention_mask": valid.long(),
                  "position_ids": (valid.long().cumsum(1) - 1).clamp(min=0)}
        for seq in group:
            self._prefilling.remove(seq)
        try:
            logits = self._forward(ids, kwargs)
        except Exception as exc:  # one bad request must not stop the server
            for seq in group:
                self._finish(seq, _error_event(exc, seq))
            return
        events = []
        for seq, prompt, row in zip(group, prompts, logits):
            seq.prefilled = len(prompt)
            self.blocks.append(seq.handle.id, len(prompt))
            events.append(self._accept(seq, _sample(row, seq.handle.request, seq.generator), row))
        start = len(self._batch)
        self._batch.join(group, cache, valid)
        self._batch.keep([i for i in range(len(self._batch)) if i < start or events[i - start].finish is None])
        for seq, event in zip(group, events):
            if event.finish is not None:
                self._forget(seq)
            seq.handle.emit(event)

    @torch.inference_mode()
    def _prefill_chunk(self, seq: _Sequence, limit: int) -> int:
        """Run up to `limit` more prompt tokens of `seq` alone (returns how many); after the last,
        sample its first token and move it into the decode batch."""
        if seq.cache is None:
            seq.cache = self._new_cache()
        prompt = seq.handle.request.prompt_ids
        chunk = prompt[seq.prefilled : seq.prefilled + limit]
        try:
            logits = self._forward(torch.tensor([chunk], device=self.device), {self._cache_key: seq.cache})
        except Exception as exc:  # one bad request must not stop the server
            self._finish(seq, _error_event(exc, seq), prefilling=True)
            return len(chunk)
        seq.prefilled += len(chunk)
        self.blocks.append(seq.handle.id, len(chunk))
        if seq.prefilled < len(prompt):
            return len(chunk)
        self._prefilling.remove(seq)
        event = self._accept(seq, _sample(logits[0], seq.handle.request, seq.generator), logits[0])
        if event.finish is not None:
            self._finish(seq, event)
            return len(chunk)
        self._batch.join([seq], seq.cache, torch.ones((1, seq.prefilled), dtype=torch.bool))
        seq.cache = None
        seq.handle.emit(event)
        return len(chunk)

    @torch.inference_mode()
    def _decode_step(self) -> None:
        """One pass over the layers for every sequence in the batch."""
        batch = self._batch
        cancelled = [seq for seq in batch.rows if seq.handle.cancelled.is_set()]
        if cancelled:
            self._drop_rows(cancelled, Event(finish="cancelled"))
            if not len(batch):
                return
        inputs = batch.step_inputs([seq.token_ids[-1] for seq in batch.rows])
        start = time.perf_counter()
        try:
            logits = self._forward(inputs.pop("input_ids"), {self._cache_key: batch.cache, **inputs})
        except Exception as exc:  # the batch's cache state is unknown now: fail its requests, keep serving
            for seq in list(batch.rows):
                self._forget(seq)
                seq.handle.emit(_error_event(exc, seq))
            batch.keep([])
            return
        tokens = _sample_rows(logits, [seq.handle.request for seq in batch.rows], [seq.generator for seq in batch.rows])
        self.metrics.decode_step(len(batch), time.perf_counter() - start)  # sampling synced the device
        done: list[tuple[_Sequence, Event]] = []
        for seq, token, row in zip(batch.rows, tokens, logits):
            self.blocks.append(seq.handle.id, 1)
            event = self._accept(seq, token, row)
            if event.finish is not None:
                done.append((seq, event))
            else:
                seq.handle.emit(event)
        if done:
            finished = {id(seq) for seq, _ in done}
            batch.keep([i for i, seq in enumerate(batch.rows) if id(seq) not in finished])
            for seq, event in done:
                self._forget(seq)
                seq.handle.emit(event)

    def _forward(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Last-position logits [batch, vocab] in float32."""
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=input_ids, use_cache=True, **kwargs).logits[:, -1].float()

    def _accept(self, seq: _Sequence, token: int, logits: torch.Tensor) -> Event:
        """Record `token` (sampled from `logits` [vocab]) and build the event that reports it."""
        now = time.perf_counter()
        if seq.token_ids:
            self.metrics.inter_token(now - seq.last_token_time)
        else:
            self.metrics.first_token(now - seq.submitted)
        seq.last_token_time = now
        seq.token_ids.append(token)
        self.metrics.generated(1)
        event = self._text_event(seq, eos=token in self.eos_ids)
        k = seq.handle.request.logprobs
        if k is None:
            return event
        return replace(event, logprobs=(_token_logprob(logits, token, k),))

    def _drop_rows(self, seqs: list[_Sequence], event: Event) -> None:
        ids = {id(seq) for seq in seqs}
        self._batch.keep([i for i, seq in enumerate(self._batch.rows) if id(seq) not in ids])
        for seq in seqs:
            self._finish(seq, event)

    def _finish(self, seq: _Sequence, event: Event, prefilling: bool = False) -> None:
        """End a sequence that is not (or no longer) in the batch; its caller hears last."""
        if prefilling:
            self._prefilling.remove(seq)
        self._forget(seq)
        if event.finish == "cancelled":
            event = Event(finish="cancelled", completion_tokens=len(seq.token_ids))
        seq.handle.emit(event)

    def _forget(self, seq: _Sequence) -> None:
        """Free the sequence's KV accounting and state (before its caller hears that it ended)."""
        with self._cond:
            if self._reserved.pop(seq.handle.id, None) is not None:
                self.blocks.free(seq.handle.id)
                self._kv = self._kv_snapshot()
            if seq.handle.cancelled.is_set():
                self.cancelled_total += 1
        seq.cache = None

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


def _error_event(exc: Exception, seq: _Sequence) -> Event:
    return Event(finish="error", error=f"{type(exc).__name__}: {exc}", completion_tokens=len(seq.token_ids))


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


def _sample_rows(logits: torch.Tensor, requests: list[GenerationRequest], gens: list[torch.Generator]) -> list[int]:
    """One token per row of logits [rows, vocab]; greedy rows share one argmax (one host sync per step)."""
    greedy = logits.argmax(-1).tolist()
    return [g if req.temperature <= 0 else _sample(row, req, gen)
            for g, row, req, gen in zip(greedy, logits, requests, gens)]


def _token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    logp = torch.log_softmax(logits, -1)
    top = torch.topk(logp, k) if k else None
    alternatives = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
    return TokenLogprob(token, float(logp[token]), alternatives)
