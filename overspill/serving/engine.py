"""The generation engine: one thread owns the model; callers submit requests and read token events.

`Engine.submit` is thread-safe and returns a `Handle` at once (or raises `QueueFull`). Each
iteration of the engine thread's loop admits queued requests (FIFO, while batch places and KV
blocks allow), prefills up to `prefill_chunk` prompt tokens, then runs one decode step for every
sequence in the running `DecodeBatch`: continuous batching, so new requests join at the next step
and a long prompt delays decoding by at most one chunk. Cancellation and stop strings are checked
between tokens; a finished or cancelled sequence leaves the batch at once.

Every admitted sequence stays in `_running` until `_finish`, whatever state it is in (prefilling,
joining, decoding), so a failure anywhere ends each of them with an event and frees its KV.

One bad request must never hurt another: `submit` refuses fields the kernels cannot take
(`check_request`), and what still fails for one request (admitting it, sampling or detokenizing its
row) ends that request alone. If the thread dies anyway, every request gets an error event, `alive`
turns False and `health()` says why.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import DynamicCache

from ..planning.placement import ENGINE_PREFILL_CHUNK
from ..runtime.kv import cache_kwarg, kv_dims
from ..runtime.prefix import Lease, PrefixCache
from .batching import DecodeBatch, mergeable
from .detok import TextStream
from .graph_batch import GraphedBatch
from .requests import (
    Event, GenerationRequest, Handle, InvalidRequest, KVStats, NullMetrics, QueueFull, TokenLogprob, check_request,
)
from .sampling import logprob_rows, new_generator, sample_rows

log = logging.getLogger(__name__)

__all__ = ["Engine", "Event", "GenerationRequest", "Handle", "InvalidRequest", "KVStats", "NullMetrics", "QueueFull",
           "TokenLogprob"]


@dataclass(eq=False)
class _Sequence:
    """Per-request state, owned by the engine thread. `cache` is its own until it joins the batch."""

    handle: Handle
    generator: torch.Generator
    text: TextStream
    submitted: float
    reserved_blocks: int
    cache: Any = None
    prefilled: int = 0  # prompt tokens already run through the model (or reused from the prefix cache)
    last_token_time: float = 0.0
    looked_up: bool = False  # the prefix cache was asked for this prompt
    lease: Lease | None = None  # the prefix cache's hold, until its prompt KV is stored or abandoned

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class Engine:
    """Owns `model` on one thread and decodes every running request in one pass per step.

    Args:
        model, tokenizer: from `overspill.load`.
        max_queue: the most requests waiting (not yet admitted) before `submit` raises `QueueFull`.
        metrics: an observer (see `NullMetrics`).
        tokenizer_lock: shared with callers that tokenize on other threads.
        max_batch: sequences decoded together; default: the batch the plan reserved KV for.
        prefill_chunk: prompt tokens (padding included) per iteration, interleaved with decode steps.
        kv_block_tokens: accounting granularity of the KV admission control.
        kv_capacity_tokens: KV tokens the running requests may hold, padding of the shared cache
            included; default: what the plan reserved under a GPU budget (`context x` its batch),
            else `context x max_batch`.
        prefix_cache: reuse the KV of earlier prompts' leading blocks (`overspill.runtime.prefix.PrefixCache`).
        stall_seconds: with work queued or running, `alive` turns False when the loop has not come
            round for this long; generous, since one prefill chunk of a 70B model can take many seconds.

    A request is admitted when a batch place is free and the shared cache, every row padded to the
    longest reservation (prompt + `max_new_tokens`), still fits the KV capacity, so a running request
    never runs out of KV and the cache never outgrows what the plan reserved; until then it waits in
    the queue. Short requests thus share a capacity planned for fewer full-context sequences.
    """

    def __init__(self, model, tokenizer, max_queue: int = 64, metrics: NullMetrics | None = None,
                 tokenizer_lock: threading.Lock | None = None, max_batch: int | None = None,
                 prefill_chunk: int = ENGINE_PREFILL_CHUNK, kv_block_tokens: int = 16, kv_capacity_tokens: int | None = None,
                 prefix_cache: PrefixCache | None = None, stall_seconds: float = 600.0):
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.metrics = metrics or NullMetrics()
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        param = next(model.parameters())
        self.device = param.device
        self.placement = getattr(model, "overspill", None)
        workload = self.placement.plan.workload if self.placement is not None else None
        self.context = workload.context if workload is not None else model.config.get_text_config().max_position_embeddings
        self.max_batch = max_batch or (workload.batch if workload is not None else 1)
        if self.max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be positive, got {self.max_batch}, {prefill_chunk}")
        self.batching_note = None
        if self.max_batch > 1 and not mergeable(self._new_cache()):
            self.batching_note = ("the plan keeps some layers' KV in host memory (a TieredCache), which cannot "
                                  "be batched yet: requests run one at a time; give the KV more GPU memory "
                                  "(--kv-gpu-memory) or lower --max-batch / --context to batch them")
            self.max_batch = 1
        self.prefill_chunk = prefill_chunk
        self.prefix = prefix_cache
        self._prefix_lookup_tokens = self._prefix_reused_tokens = 0
        self.block_tokens = kv_block_tokens
        if kv_capacity_tokens is None:  # whole blocks per sequence, so a full-context request always fits
            planned = workload is not None and self.placement.plan.budget_bytes is not None
            self.total_blocks = (workload.batch if planned else self.max_batch) * self._blocks(self.context)
        else:
            self.total_blocks = kv_capacity_tokens // kv_block_tokens
        self._kv_token_bytes = self._kv_bytes_per_token(param.element_size())
        self.vocab_size = model.config.get_text_config().vocab_size
        eos = getattr(model.generation_config, "eos_token_id", None) or getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        params = inspect.signature(model.forward).parameters
        self._cache_key = cache_kwarg(model)
        self._keep_last = "logits_to_keep" in params
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._pending: collections.deque[Handle] = collections.deque()
        self._running: dict[int, _Sequence] = {}  # admitted, until forgotten
        self._prefilling: list[_Sequence] = []  # admitted, prompt not yet through the model
        graphed = getattr(self.placement, "graphs", None)
        if graphed is not None and mergeable(self._new_cache()):  # the model was loaded with cuda_graphs
            self._batch: DecodeBatch | GraphedBatch = GraphedBatch(model, self.placement, graphed, self.max_batch,
                                                                   self.context)
        else:
            self._batch = DecodeBatch(self.device)
        self._kv = self._kv_snapshot()
        self._hold = False  # tests: keep requests queued
        self.cancelled_total = 0  # requests that ended cancelled, queued or running
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stall_seconds = stall_seconds
        self._progress = time.monotonic()  # when the loop last came round
        self._death: str | None = None  # why the engine thread died

    # --- caller side (any thread) ---

    def start(self) -> None:
        if self._thread is None:
            self._progress = time.monotonic()  # requests queued before the start are not a stall
            self._thread = threading.Thread(target=self._loop, name="overspill-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None] | None = None) -> Handle:
        """Queue `request`; its events go to `sink` (called on the engine thread) or the handle's queue.

        Raises:
            QueueFull: `max_queue` requests are waiting already.
            InvalidRequest (a ValueError): a field out of range or beyond the context (see `check_request`),
                or prompt + max_new_tokens beyond the KV capacity.
            RuntimeError: the engine is closed, or its thread died.
        """
        check_request(request, self.vocab_size, self.context)
        need = self._blocks(len(request.prompt_ids) + request.max_new_tokens)
        if need > self.total_blocks:
            raise InvalidRequest("max_new_tokens", f"the request needs {need} KV blocks of {self.block_tokens} "
                                 f"tokens; the engine has {self.total_blocks}: lower max_new_tokens or give the KV "
                                 "cache more memory", code="kv_capacity_exceeded")
        with self._cond:
            if self._death is not None:
                raise RuntimeError(f"the engine thread died: {self._death}")
            if self._stop:
                raise RuntimeError("the engine is closed")
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
        """Sequences admitted and not yet finished: prefilling or decoding."""
        return len(self._running)

    def live_requests(self) -> int:
        """Requests the engine still holds state for, queued or running (0 when idle: nothing leaked)."""
        with self._cond:
            return len(self._pending) + len(self._running)

    def kv_stats(self) -> KVStats:
        """KV accounting as of the engine's last change (a snapshot: safe from any thread)."""
        return self._kv

    @property
    def alive(self) -> bool:
        """The engine thread runs and, if it has work, came round its loop within `stall_seconds`."""
        thread = self._thread
        if thread is None or not thread.is_alive() or self._death is not None:
            return False
        idle = not self._pending and not self._running
        return idle or time.monotonic() - self._progress <= self.stall_seconds

    def health(self) -> dict:
        """For a health endpoint: alive, queue_depth, active, last_progress_s_ago, and error (why the thread died)."""
        return {"alive": self.alive, "queue_depth": self.queue_depth, "active": self.active_count,
                "last_progress_s_ago": round(time.monotonic() - self._progress, 3), "error": self._death}

    # --- engine thread ---

    def _loop(self) -> None:
        try:
            self._warm_up()
            while self._turn():
                pass
            self._shut_down()
        except BaseException as exc:  # noqa: BLE001 - even SystemExit: no request may wait on a dead thread
            self._die(exc)

    def _warm_up(self) -> None:
        if isinstance(self._batch, GraphedBatch):
            try:
                self._batch.warm_up()  # requests queue meanwhile; a failed capture falls back to eager
            except Exception as exc:  # e.g. no memory for a bucket: serve without graphs rather than not at all
                log.warning("CUDA graph warm-up failed (%s: %s); the batch decodes eagerly", type(exc).__name__, exc)
                self._batch.capture = False
                self._batch.rows = []

    def _turn(self) -> bool:
        """One round: wait for work, admit, prefill and decode. False once closed."""
        with self._cond:
            self._drop_cancelled_pending()
            while not self._stop and not self._running and (self._hold or not self._pending):
                self._progress = time.monotonic()  # waiting for work is not a stall
                self._cond.wait(0.5)
                self._drop_cancelled_pending()
            if self._stop:
                return False
            self._admit_pending()
        try:
            self._iterate()
        except Exception as exc:  # a bug or a device error: fail what runs, keep serving the queue
            self._fail_running(exc)
        self._kv = self._kv_snapshot()
        self._progress = time.monotonic()
        return True

    def _shut_down(self) -> None:
        self._fail_running(None)
        with self._cond:
            handles = list(self._pending)
            self._pending.clear()
            self.cancelled_total += len(handles)
        for handle in handles:
            handle.emit(Event(finish="cancelled"))

    def _die(self, exc: BaseException) -> None:
        """The loop itself failed: record why and end every request, rather than leave its caller waiting."""
        log.critical("the engine thread died", exc_info=exc)
        with self._cond:
            self._death = f"{type(exc).__name__}: {exc}"
            ended = [(seq.handle, len(seq.text.ids)) for seq in self._running.values()]
            ended += [(handle, 0) for handle in self._pending]
            self._running.clear()
            self._prefilling.clear()
            self._pending.clear()
        for handle, tokens in ended:
            handle.emit(Event(finish="error", error=f"the engine thread died: {self._death}", completion_tokens=tokens))

    def _fail_running(self, exc: Exception | None) -> None:
        """End every admitted sequence: with an error, or cancelled (exc None: shutting down)."""
        for seq in list(self._running.values()):
            self._finish(seq, Event(finish="cancelled") if exc is None else _error_event(exc, seq))
        try:
            self._batch.keep([])
        except Exception:  # noqa: BLE001 - the thread must live on: queued requests wait for it
            log.exception("clearing the decode batch failed; dropping its rows")
            self._batch.rows = []

    def _drop_cancelled_pending(self) -> None:
        for handle in [h for h in self._pending if h.cancelled.is_set()]:
            self._pending.remove(handle)
            self.cancelled_total += 1
            handle.emit(Event(finish="cancelled"))

    def _admit_pending(self) -> None:
        """Move queued requests into prefill while batch places and KV blocks allow (FIFO, no overtaking)."""
        while not self._hold and self._pending and len(self._running) < self.max_batch:
            handle = self._pending[0]
            try:
                need = self._blocks(len(handle.request.prompt_ids) + handle.request.max_new_tokens)
                widest = max([need] + [seq.reserved_blocks for seq in self._running.values()])
                if (len(self._running) + 1) * widest > self.total_blocks:  # rows are padded to the widest
                    break
                seq = self._new_sequence(handle, need)
            except Exception as exc:  # e.g. a seed the generator refuses: this request fails, the queue goes on
                self._pending.popleft()
                handle.emit(Event(finish="error", error=f"{type(exc).__name__}: {exc}"))
                continue
            self._pending.popleft()
            self._running[handle.id] = seq
            self._prefilling.append(seq)

    def _new_sequence(self, handle: Handle, reserved_blocks: int) -> _Sequence:
        request = handle.request
        text = TextStream(self.tokenizer, self.tokenizer_lock, request.stop, request.max_new_tokens)
        return _Sequence(handle, new_generator(request.seed), text, time.perf_counter(), reserved_blocks)

    def _iterate(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens of the oldest admitted requests, then decode the batch.

        Whole prompts that fit the chunk are prefilled together, in one left-padded pass: with
        streamed weights every pass costs a full trip over the link, so a wave of new requests
        pays it once, not once each. A longer prompt is prefilled alone, a chunk per iteration.
        """
        group: list[_Sequence] = []
        width = 0
        for seq in list(self._prefilling):
            if seq.handle.cancelled.is_set():
                self._finish(seq, Event(finish="cancelled"))
                continue
            if self.prefix is not None and not seq.looked_up:
                try:
                    self._reuse_prefix(seq)
                except Exception as exc:  # this request fails; the others prefill on
                    self._finish(seq, _error_event(exc, seq))
                    continue
            remaining = len(seq.request.prompt_ids) - seq.prefilled
            grown = max(width, remaining)
            if self.max_batch > 1 and seq.prefilled == 0 and (len(group) + 1) * grown <= self.prefill_chunk:
                group.append(seq)
                width = grown
            elif not group:
                self._prefill_chunk(seq)
                break
            else:
                break
        if group:
            self._prefill_group(group, width)
        if len(self._batch):
            self._decode_step()

    def _reuse_prefix(self, seq: _Sequence) -> None:
        """Look up `seq`'s prompt in the prefix cache; its new blocks are stored after its prefill.

        The cached KV is restored only for a prompt that would be prefilled alone (longer than a
        chunk, or no batching): a short prompt joins a group prefill, whose one streamed pass costs
        as much as the solo pass a restored prefix would still need."""
        seq.looked_up = True
        prompt = seq.request.prompt_ids
        self._prefix_lookup_tokens += len(prompt)
        restore = len(prompt) > self.prefill_chunk or self.max_batch == 1
        cache = self._new_cache() if restore else None
        try:
            seq.lease = self.prefix.start(list(prompt), cache)
        except Exception:  # e.g. pool blocks all held by prompts in prefill, or no device memory to restore into
            return  # this request computes its whole prompt
        if restore and seq.lease.cached_tokens:
            seq.cache, seq.prefilled = cache, seq.lease.cached_tokens
            self._prefix_reused_tokens += seq.prefilled

    @torch.inference_mode()
    def _prefill_group(self, group: list[_Sequence], width: int) -> None:
        """Prefill whole prompts together (left-padded, one pass), then start decoding them."""
        lengths = torch.tensor([len(seq.request.prompt_ids) for seq in group], device=self.device)
        valid = torch.arange(width, device=self.device) >= (width - lengths)[:, None]  # [rows, width]
        ids = torch.tensor([(0,) * (width - len(s.request.prompt_ids)) + s.request.prompt_ids for s in group],
                           device=self.device)
        cache = self._new_cache()
        mask = valid.long()
        kwargs = {self._cache_key: cache, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
        try:
            logits = self._forward(ids, kwargs)
        except Exception as exc:  # these requests fail; the others go on
            for seq in group:
                self._finish(seq, _error_event(exc, seq))
            return
        for seq in group:
            seq.prefilled = len(seq.request.prompt_ids)
        self._start_decoding(group, cache, valid, logits)

    @torch.inference_mode()
    def _prefill_chunk(self, seq: _Sequence) -> None:
        """Run the next `prefill_chunk` prompt tokens of `seq` alone; after the last, start decoding it."""
        if seq.cache is None:
            seq.cache = self._new_cache()
        chunk = seq.request.prompt_ids[seq.prefilled : seq.prefilled + self.prefill_chunk]
        try:
            logits = self._forward(torch.tensor([chunk], device=self.device), {self._cache_key: seq.cache})
        except Exception as exc:  # one bad request must not stop the others
            self._finish(seq, _error_event(exc, seq))
            return
        seq.prefilled += len(chunk)
        if seq.prefilled == len(seq.request.prompt_ids):
            cache, seq.cache = seq.cache, None
            self._start_decoding([seq], cache, torch.ones((1, seq.prefilled), dtype=torch.bool), logits)

    def _start_decoding(self, group: list[_Sequence], cache: Any, valid: torch.Tensor, logits: torch.Tensor) -> None:
        """Sample each prefilled sequence's first token; those not finished join the batch with their KV."""
        for row, seq in enumerate(group):
            if seq.lease is not None:  # store the prompt's new full blocks for later requests
                lease, seq.lease = seq.lease, None
                prompt = seq.request.prompt_ids
                try:
                    self.prefix.finish(lease, cache, list(prompt), row, offset=valid.shape[1] - len(prompt))
                except Exception:  # storing is an optimisation: the request goes on without it
                    self.prefix.abort(lease)
        events = self._next_events(group, logits)
        start = len(self._batch)
        self._batch.join(group, cache, valid)
        for seq in group:
            self._prefilling.remove(seq)
        self._retire(events, offset=start)

    @torch.inference_mode()
    def _decode_step(self) -> None:
        """One pass over the layers for every sequence in the batch."""
        batch = self._batch
        cancelled = [Event(finish="cancelled") if seq.handle.cancelled.is_set() else None for seq in batch.rows]
        if any(cancelled):
            self._retire(cancelled)
            if not len(batch):
                return
        tokens = [seq.text.ids[-1] for seq in batch.rows]
        start = time.perf_counter()
        try:
            if isinstance(batch, GraphedBatch):
                logits = batch.decode(tokens)
            else:
                inputs = batch.step_inputs(tokens)
                logits = self._forward(inputs.pop("input_ids"), {self._cache_key: batch.cache, **inputs})
        except Exception as exc:  # the batch's cache is in an unknown state: end its requests, keep the rest
            self._retire([_error_event(exc, seq) for seq in batch.rows])
            return
        self._retire(self._next_events(batch.rows, logits, step_start=start))

    def _next_events(self, seqs: list[_Sequence], logits: torch.Tensor, step_start: float | None = None) -> list[Event]:
        """Sample one token per row of logits [rows, vocab]; each sequence's event, sent if it goes on.

        Returns the events with `finish` set (the caller removes those rows), None for the others.
        A row whose sampling or detokenizing raises gets an error event; the other rows go on."""
        requests = [seq.request for seq in seqs]
        tokens = sample_rows(logits, requests, [seq.generator for seq in seqs])  # the step's one host sync
        if step_start is not None:  # a decode step: its pass over the layers and sampling are done
            self.metrics.decode_step(len(seqs), time.perf_counter() - step_start)
        logprobs = logprob_rows(logits, tokens, requests)
        now = time.perf_counter()
        events: list[Event | None] = []
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            try:
                for failure in (token, logprob):
                    if isinstance(failure, Exception):
                        raise failure
                event = self._accept(seq, token, logprob, now)
            except Exception as exc:  # e.g. a NaN row the kernels refused, or the tokenizer failed on this text
                event = _error_event(exc, seq)
            if event.finish is None:
                seq.handle.emit(event)
                events.append(None)
            else:
                events.append(event)
        self.metrics.generated(len(seqs))
        return events

    def _accept(self, seq: _Sequence, token: int, logprob: TokenLogprob | None, now: float) -> Event:
        first = not seq.text.ids
        (self.metrics.first_token if first else self.metrics.inter_token)(now - (seq.submitted if first else seq.last_token_time))
        seq.last_token_time = now
        piece = seq.text.push(token, eos=token in self.eos_ids)
        return Event(piece.text, piece.finish, len(seq.text.ids), logprobs=(logprob,) if logprob else ())

    def _retire(self, events: list[Event | None], offset: int = 0) -> None:
        """Remove batch rows `offset + i` whose event ends them, then tell their callers."""
        rows = self._batch.rows
        ending = [(rows[offset + i], e) for i, e in enumerate(events) if e is not None]
        if not ending:
            return
        gone = {id(seq) for seq, _ in ending}
        self._batch.keep([i for i, seq in enumerate(rows) if id(seq) not in gone])
        for seq, event in ending:
            self._finish(seq, event)

    def _forward(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Last-position logits [batch, vocab] in float32."""
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=input_ids, use_cache=True, **kwargs).logits[:, -1].float()

    def _finish(self, seq: _Sequence, event: Event) -> None:
        """End a sequence that is not in the batch (any more): free its state, then tell its caller."""
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq.lease is not None:
            self.prefix.abort(seq.lease)
            seq.lease = None
        seq.cache = None
        with self._cond:
            if self._running.pop(seq.handle.id, None) is None:
                return  # ended already
            if event.finish == "cancelled":
                self.cancelled_total += 1
                event = Event(finish="cancelled", completion_tokens=len(seq.text.ids))
        self._kv = self._kv_snapshot()
        seq.handle.emit(event)

    def _blocks(self, tokens: int) -> int:
        """KV blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_tokens)

    def _new_cache(self) -> Any:
        """The plan's cache for one sequence (a `TieredCache` with host-KV layers), else a dynamic one."""
        cache = self.placement.new_cache(self.model.config) if self.placement is not None else None
        return cache if cache is not None else DynamicCache(config=self.model.config)

    def _kv_bytes_per_token(self, dtype_bytes: int) -> tuple[int, int]:
        """KV bytes per token of the device-tier and host-tier layers."""
        layers, kv_heads, head_dim = kv_dims(self.model.config)
        per_layer = 2 * kv_heads * head_dim * dtype_bytes
        host = len(self.placement.plan.kv_host_layers) if self.placement is not None else 0
        return per_layer * (layers - host), per_layer * host

    def _kv_snapshot(self) -> KVStats:
        held = self._batch.held_tokens()
        held += sum(seq.prefilled for seq in self._prefilling)
        gpu, host = self._kv_token_bytes
        running = list(self._running.values())
        used = sum(self._blocks(seq.prefilled + len(seq.text.ids)) for seq in running)
        return KVStats(self.block_tokens, self.total_blocks, used, sum(seq.reserved_blocks for seq in running),
                       held * gpu, held * host, self._prefix_lookup_tokens, self._prefix_reused_tokens)


def _error_event(exc: Exception, seq: _Sequence) -> Event:
    return Event(finish="error", error=f"{type(exc).__name__}: {exc}", completion_tokens=len(seq.text.ids))
