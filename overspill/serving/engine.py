"""The generation engine: one thread owns the model; callers submit requests and read token events.

`Engine.submit` is thread-safe and returns a `Handle` at once (or raises `QueueFull`). Each
iteration of the engine thread's loop admits queued requests (FIFO, while batch places and KV
blocks allow), prefills up to `prefill_chunk` prompt tokens, then runs one decode step for every
sequence in the running batch: continuous batching, so new requests join at the next step and a
long prompt delays decoding by at most one chunk. Cancellation and stop strings are checked
between tokens; a finished or cancelled sequence leaves the batch at once.

The decisions (queues, admission, KV blocks, when a request ends) are the `scheduler.Scheduler`'s,
the tensors (caches, passes, the batch, sampling) the `runner.Runner`'s; this module is the step
loop between them and the thread around it.

One bad request must never hurt another: `submit` refuses fields the kernels cannot take
(`check_request`), and what still fails for one request (admitting it, sampling or detokenizing its
row) ends that request alone. If the thread dies anyway, every request gets an error event, `alive`
turns False and `health()` says why.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

from ..planning.kvblocks import KVBlockManager
from ..planning.placement import ENGINE_PREFILL_CHUNK
from ..runtime.prefix import PrefixCache
from .batching import Batch
from .requests import (
    Event, GenerationRequest, Handle, InvalidRequest, KVStats, NullMetrics, QueueFull, check_request,
)
from .defaults import DEFAULT_MAX_CHAIN
from .runner import Prefilled, Runner
from .sampling import TokenLogprob
from .scheduler import Prefill, Scheduler, Sequence, error_event
from .speculate import Speculator

log = logging.getLogger(__name__)

__all__ = ["Engine", "Event", "GenerationRequest", "Handle", "InvalidRequest", "KVStats", "NullMetrics", "QueueFull",
           "TokenLogprob"]

DEFAULT_BLOCK_TOKENS = 16  # KV accounting granularity without a prefix cache


class Engine:
    """Owns `model` on one thread and decodes every running request in one pass per step.

    Args:
        model, tokenizer: from `overspill.load`.
        max_queue: the most requests waiting (not yet admitted) before `submit` raises `QueueFull`.
        metrics: an observer (see `NullMetrics`).
        tokenizer_lock: shared with callers that tokenize on other threads.
        max_batch: sequences decoded together; default: the batch the plan reserved KV for.
        prefill_chunk: prompt tokens (padding included) per iteration, interleaved with decode steps.
        kv_block_tokens: accounting granularity of the KV admission control; default: the prefix
            cache's block size (one block manager counts both), else 16.
        kv_capacity_tokens: KV tokens the running requests may hold, padding of the shared cache
            included; default: what the plan reserved under a GPU budget (`context x` its batch),
            else `context x max_batch`.
        prefix_cache: reuse the KV of earlier prompts' leading blocks (`overspill.runtime.prefix.PrefixCache`).
        stall_seconds: with work queued or running, `alive` turns False when the loop has not come
            round for this long; generous, since one prefill chunk of a 70B model can take many seconds.
        speculate: the draft source ('ngram', 'draft:PATH') a request running alone decodes with unless
            it asks otherwise (`GenerationRequest.speculate`); None: only requests that ask draft.
        max_chain: the longest chain of drafted tokens one pass verifies.
        speculate_tree: draft trees of up to this many tokens a pass instead of chains (`Speculator`), for
            `speculate`'s requests and those whose body names a source; None: chains.

    A request is admitted when a batch place is free and the shared cache, every row padded to the
    longest reservation (prompt + `max_new_tokens`), still fits the KV capacity, so a running request
    never runs out of KV and the cache never outgrows what the plan reserved; until then it waits in
    the queue. Short requests thus share a capacity planned for fewer full-context sequences.
    """

    def __init__(self, model, tokenizer, max_queue: int = 64, metrics: NullMetrics | None = None,
                 tokenizer_lock: threading.Lock | None = None, max_batch: int | None = None,
                 prefill_chunk: int = ENGINE_PREFILL_CHUNK, kv_block_tokens: int | None = None,
                 kv_capacity_tokens: int | None = None, prefix_cache: PrefixCache | None = None,
                 stall_seconds: float = 600.0, speculate: str | None = None,
                 max_chain: int = DEFAULT_MAX_CHAIN, speculate_tree: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.metrics = metrics or NullMetrics()
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.runner = Runner(model, max_batch, prefix_cache, kv_capacity_tokens)
        self.context, self.max_batch, self.batching_note = (self.runner.context, self.runner.max_batch,
                                                            self.runner.batching_note)
        self.prefill_chunk, self.prefix, self.stall_seconds = prefill_chunk, prefix_cache, stall_seconds
        self.vocab_size = self.runner.vocab_size
        self.speculator = Speculator(model, speculate, max_chain, speculate_tree)
        blocks = _block_manager(prefix_cache, kv_block_tokens)
        if kv_capacity_tokens is None:  # whole blocks per sequence, so a full-context request always fits
            total = (self.runner.planned_rows or self.max_batch) * -(-self.context // blocks.block_tokens)
        else:
            total = kv_capacity_tokens // blocks.block_tokens
        eos = getattr(model.generation_config, "eos_token_id", None) or getattr(tokenizer, "eos_token_id", None)
        self.scheduler = Scheduler(
            blocks, total, self.max_batch, max_queue, prefill_chunk, tokenizer, self.tokenizer_lock, self.metrics,
            eos_ids=set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None},
            held_tokens=self.runner.batch.held_tokens, token_bytes=self.runner.token_bytes, prefix=prefix_cache,
            layer_blocks=self.runner.share_blocks(blocks))
        self._thread: threading.Thread | None = None

    # --- caller side (any thread) ---

    def start(self) -> None:
        if self._thread is None:
            self.scheduler.progress = time.monotonic()  # requests queued before the start are not a stall
            self._thread = threading.Thread(target=self._loop, name="overspill-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self.scheduler.stop()
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
        self.speculator.check(request)
        return self.scheduler.submit(request, sink)

    def cancel(self, handle: Handle) -> None:
        """Stop `handle` before its next token; a queued request is dropped without running."""
        self.scheduler.cancel(handle)

    def hold(self, on: bool) -> None:
        """Test hook: while held, the engine admits nothing, so requests stay queued."""
        self.scheduler.hold(on)

    @property
    def max_queue(self) -> int:
        return self.scheduler.max_queue

    @max_queue.setter
    def max_queue(self, value: int) -> None:
        self.scheduler.max_queue = value

    @property
    def cancelled_total(self) -> int:
        """Requests that ended cancelled, queued or running."""
        return self.scheduler.cancelled_total

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.pending)

    @property
    def active_count(self) -> int:
        """Sequences admitted and not yet finished: prefilling or decoding."""
        return len(self.scheduler.running)

    def live_requests(self) -> int:
        """Requests the engine still holds state for, queued or running (0 when idle: nothing leaked)."""
        return self.scheduler.live()

    def kv_stats(self) -> KVStats:
        """KV accounting as of the engine's last change (a snapshot: safe from any thread)."""
        return self.scheduler.kv

    @property
    def blocks(self) -> KVBlockManager:
        """The one block manager of this engine's KV (and of its prefix cache's pool)."""
        return self.scheduler.blocks

    @property
    def _batch(self) -> Batch:
        """The running batch (GPU tests inspect its graphs)."""
        return self.runner.batch

    @property
    def alive(self) -> bool:
        """The engine thread runs and, if it has work, came round its loop within `stall_seconds`."""
        thread, s = self._thread, self.scheduler
        if thread is None or not thread.is_alive() or s.death is not None:
            return False
        idle = not s.pending and not s.running
        return idle or time.monotonic() - s.progress <= self.stall_seconds

    def health(self) -> dict:
        """For a health endpoint: alive, queue_depth, active, last_progress_s_ago, and error (why the thread died)."""
        return {"alive": self.alive, "queue_depth": self.queue_depth, "active": self.active_count,
                "last_progress_s_ago": round(time.monotonic() - self.scheduler.progress, 3),
                "error": self.scheduler.death}

    # --- engine thread: the step loop ---

    def _loop(self) -> None:
        try:
            self.runner.batch.warm_up()  # requests queue meanwhile
            while self.scheduler.wait_and_admit(self.runner.new_generator):
                try:
                    self._iterate()
                except Exception as exc:  # a bug or a device error: fail what runs, keep serving the queue
                    self._fail_running(exc)
                self.scheduler.turned()
            self._fail_running(None)
            self.scheduler.cancel_pending()
        except BaseException as exc:  # noqa: BLE001 - even SystemExit: no request may wait on a dead thread
            log.critical("the engine thread died", exc_info=exc)
            self.scheduler.die(f"{type(exc).__name__}: {exc}")

    def _iterate(self) -> None:
        """Prefill what the scheduler picks, then decode the batch."""
        work = self.scheduler.next_prefill(self.runner.look_up if self.prefix is not None else None)
        if work is not None:
            self._prefill(work)
        if len(self.runner.batch):
            self._decode_step()

    def _prefill(self, work: Prefill) -> None:
        """Run the scheduler's prefill; prompts now wholly through the model start decoding."""
        try:
            if work.width:
                done = self.runner.prefill_group([seq.request.prompt_ids for seq in work.seqs], work.width)
            else:
                seq = work.seqs[0]
                if seq.cache is None:
                    seq.cache = self.runner.new_cache()
                done = self.runner.prefill_chunk(seq.cache, work.chunk, seq.prefilled + len(work.chunk))
        except Exception as exc:  # these requests fail; the others go on
            for seq in work.seqs:
                self.scheduler.finish(seq, error_event(exc, seq))
            return
        through = self.scheduler.ran(work)
        if through:
            self._start_decoding(through, done)

    def _start_decoding(self, group: list[Sequence], done: Prefilled) -> None:
        """Store the prompts' new blocks, sample each first token; those not finished join the batch with their KV."""
        for row, seq in enumerate(group):
            if seq.lease is not None:
                lease, seq.lease = seq.lease, None
                self.runner.store_prefix(lease, done.cache, seq.request.prompt_ids, row, done.valid.shape[1])
        events = self._next_events(group, done.logits)
        start = len(self.runner.batch)
        self.runner.batch.join(group, done.cache, done.valid)
        self.scheduler.joined(group)
        self._retire(events, offset=start)

    def _decode_step(self) -> None:
        """One pass over the layers for every sequence in the batch."""
        batch = self.runner.batch
        cancelled = self.scheduler.cancelled(batch.rows)
        if any(cancelled):
            self._retire(cancelled)
            if not len(batch):
                return
        source, limit = self._speculation(batch.rows)
        if source is not None:
            return self._speculative_step(batch.rows[0], source, limit)
        tokens = [seq.text.ids[-1] for seq in batch.rows]
        start = time.perf_counter()
        try:
            logits = batch.decode(tokens)
        except Exception as exc:  # the batch's cache is in an unknown state: end its requests, keep the rest
            self._retire([error_event(exc, seq) for seq in batch.rows])
            return
        self.scheduler.decoded(batch.rows)
        self._retire(self._next_events(batch.rows, logits, step_start=start))

    def _speculation(self, rows: list[Sequence]) -> tuple[str | None, int]:
        """(source, longest chain) when this step should draft: one sequence admitted and decoding (more
        fill the pass by batching), an eager batch that crops, the request's source on, and room for
        at least one drafted token before max_new_tokens; (None, 0) otherwise."""
        if len(rows) != 1 or len(self.scheduler.running) != 1:
            return None, 0
        seq = rows[0]
        source = self.speculator.source(seq.request)
        limit = seq.request.max_new_tokens - len(seq.text.ids) - 1  # the pass's own token is the last
        if source is None or limit < 1 or not self.runner.can_verify():
            return None, 0
        return source, limit

    def _speculative_step(self, seq: Sequence, source: str, limit: int) -> None:
        """Draft a chain for the batch's only sequence and verify it in one pass; its tokens are sent one
        by one, so a stop (EOS, a stop string, the length) inside the chain ends the request there."""
        start = time.perf_counter()
        try:
            verified = self.speculator.step(seq, self.runner, source, limit)
            logprobs = self.runner.logprobs([seq] * len(verified.tokens), verified.logits, verified.tokens)
        except Exception as exc:  # the cache is in an unknown state: end this request
            self._retire([error_event(exc, seq)])
            return
        self.scheduler.decoded([seq], columns=len(verified.tokens))
        self.metrics.decode_step(1, time.perf_counter() - start)
        self.metrics.speculated(verified.drafted, len(verified.tokens) - 1, len(verified.tokens),
                                verified.draft_seconds, verified.verify_seconds)
        for token, logprob in zip(verified.tokens, logprobs):
            [event] = self.scheduler.accept([seq], [token], [logprob])
            if event is not None:
                self._retire([event])
                return

    def _next_events(self, seqs: list[Sequence], logits, step_start: float | None = None) -> list[Event | None]:
        """Sample one token per row; each sequence's event, sent if it goes on (see `Scheduler.accept`)."""
        tokens = self.runner.sample(seqs, logits)
        if step_start is not None:  # a decode step: its pass over the layers and sampling are done
            self.metrics.decode_step(len(seqs), time.perf_counter() - step_start)
        return self.scheduler.accept(seqs, tokens, self.runner.logprobs(seqs, logits, tokens))

    def _retire(self, events: list[Event | None], offset: int = 0) -> None:
        """Remove batch rows `offset + i` whose event ends them, then tell their callers."""
        rows = self.runner.batch.rows
        ending = [(rows[offset + i], e) for i, e in enumerate(events) if e is not None]
        if not ending:
            return
        gone = {id(seq) for seq, _ in ending}
        self.runner.batch.keep([i for i, seq in enumerate(rows) if id(seq) not in gone])
        for seq, event in ending:
            usage = self.speculator.usage(seq)
            self.scheduler.finish(seq, event if usage is None else dataclasses.replace(event, speculation=usage))

    def _fail_running(self, exc: Exception | None) -> None:
        """End every admitted sequence: with an error, or cancelled (exc None: shutting down)."""
        for seq in list(self.scheduler.running.values()):
            self.scheduler.finish(seq, Event(finish="cancelled") if exc is None else error_event(exc, seq))
        self.runner.clear_batch()


def _block_manager(prefix: PrefixCache | None, block_tokens: int | None) -> KVBlockManager:
    """The prefix pool's manager when there is one (its HOST tier is the pool), so that one manager
    counts every KV block; the engine sizes its GPU tier."""
    if prefix is None:
        return KVBlockManager(block_tokens or DEFAULT_BLOCK_TOKENS, 0, 0)
    if block_tokens is not None and block_tokens != prefix.block_tokens:
        raise ValueError(f"kv_block_tokens={block_tokens}: with a prefix cache the engine counts KV in the pool's "
                         f"blocks of {prefix.block_tokens} tokens")
    return prefix.manager
