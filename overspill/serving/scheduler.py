"""The engine's scheduler: which requests wait, run, prefill or end, and the KV blocks each one holds.

Pure Python (no torch), like nano-vllm's `scheduler.py`: it decides and records; `runner.Runner`
runs the model, and `engine.Engine` joins the two in its step loop. Requests queue FIFO and are
admitted while batch places and KV blocks allow. Every admitted sequence stays in `running` until
`finish`, whatever state it is in (prefilling, joining, decoding), so a failure anywhere ends each
of them with an event and frees its KV.

KV is accounted once, in a `KVBlockManager`: its GPU tier holds the running requests' blocks, its
HOST tier the prefix pool's (the pool's own manager when there is one, so both count in one place),
its HOST_LAYER tier the host-tier KV layers' of the running requests' caches (a `TieredCache` counts
them there itself; such a cache is closed when its request ends, so its blocks go back at once).
The running rows share one cache padded to the widest row, so each admitted request reserves
blocks for the widest reservation (prompt + max_new_tokens) of any running request: a request is
admitted only when every row, padded so, still fits, and a running request never runs out of KV.
Its blocks fill as its KV is written (prefill, then one column per decode step).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from ..planning.kvblocks import KVBlockManager, KVTier
from .detok import TextStream
from .requests import Event, GenerationRequest, Handle, InvalidRequest, KVStats, NullMetrics, QueueFull


class PrefixPool(Protocol):
    """What the scheduler asks of `runtime.prefix.PrefixCache`: its manager, and to release a lease."""

    block_tokens: int
    manager: KVBlockManager

    def abort(self, lease: Any) -> None: ...


@runtime_checkable
class HoldsBlocks(Protocol):
    """A cache that holds blocks in the engine's manager (`runtime.kv.TieredCache`): it serves one request
    and runs alone in the batch, and `close` gives its blocks back."""

    host_blocks: int

    def close(self) -> None: ...


@dataclass(eq=False)
class Sequence:
    """Per-request state, owned by the engine thread. `cache` is its own (the runner's) until it joins the
    batch; one that `HoldsBlocks` stays referenced here until the request ends and `finish` closes it."""

    handle: Handle
    text: TextStream
    generator: Any  # the request's random state (`sampling.new_generator`)
    submitted: float  # when its request was submitted (`Handle.submitted`)
    need: int  # KV blocks of prompt + max_new_tokens
    cache: Any = None
    prefilled: int = 0  # prompt tokens already run through the model (or reused from the prefix cache)
    last_token_time: float = 0.0
    looked_up: bool = False  # the prefix cache was asked for this prompt
    lease: Any = None  # the prefix cache's hold (a `Lease`), until its prompt KV is stored or abandoned

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def key(self) -> tuple[str, int]:
        """Its sequence in the block manager (the prefix pool's leases there are ints)."""
        return ("request", self.handle.id)


@dataclass(frozen=True)
class Prefill:
    """This iteration's prefill: whole prompts in one left-padded pass `width` columns wide, or
    (width 0) the next `chunk` of one long prompt."""

    seqs: list[Sequence]
    width: int = 0
    chunk: tuple[int, ...] = ()


LookUp = Callable[[tuple[int, ...], bool], tuple[Any, Any]]  # (prompt, restore) -> (lease or None, cache or None)


class Scheduler:
    """Queues, per-request state and KV blocks of one engine. Caller-side methods take the lock; the
    others run on the engine thread.

    Args:
        blocks: the manager (its GPU tier sized here to `total_blocks`); the prefix pool's if any.
        total_blocks: KV blocks the running requests may hold.
        max_batch, max_queue, prefill_chunk: as `Engine` takes them.
        tokenizer, tokenizer_lock, metrics, eos_ids: what turning tokens into events needs.
        held_tokens: KV columns the running batch holds, padding included (the byte gauges).
        token_bytes: KV bytes per token of the device-tier and host-tier layers.
        prefix: the prefix pool, whose leases `finish` releases.
        layer_blocks: HOST_LAYER blocks the running requests' host-tier KV layers may hold (0: none).
    """

    def __init__(self, blocks: KVBlockManager, total_blocks: int, max_batch: int, max_queue: int, prefill_chunk: int,
                 tokenizer: Any, tokenizer_lock: threading.Lock, metrics: NullMetrics, eos_ids: set[int],
                 held_tokens: Callable[[], int], token_bytes: tuple[int, int], prefix: PrefixPool | None = None,
                 layer_blocks: int = 0):
        usage = blocks.usage()
        if usage.gpu.used_blocks or usage.host_layer.used_blocks:
            raise ValueError("the KV block manager's GPU or HOST_LAYER tier is in use: is its prefix cache serving "
                             "another engine?")
        blocks.resize(KVTier.GPU, total_blocks)
        blocks.resize(KVTier.HOST_LAYER, layer_blocks)
        self.blocks, self.total_blocks, self.prefix = blocks, total_blocks, prefix
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.tokenizer, self.tokenizer_lock, self.metrics, self.eos_ids = tokenizer, tokenizer_lock, metrics, eos_ids
        self.held_tokens, self.token_bytes = held_tokens, token_bytes
        self.lock = threading.Condition()
        self.pending: collections.deque[Handle] = collections.deque()
        self.running: dict[int, Sequence] = {}  # admitted, until finished
        self.prefilling: list[Sequence] = []  # admitted, prompt not yet through the model
        self.held = False  # tests: keep requests queued
        self.stopped = False
        self.death: str | None = None  # why the engine thread died
        self.progress = time.monotonic()  # when the engine thread last came round
        self.cancelled_total = 0  # requests that ended cancelled, queued or running
        self.lookup_tokens = self.reused_tokens = 0
        self._widest = 0  # blocks every running row holds: the widest reservation
        self._ids = itertools.count(1)
        self.kv = self._kv_snapshot()

    @property
    def block_tokens(self) -> int:
        return self.blocks.block_tokens

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    # --- caller side (any thread) ---

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None] | None) -> Handle:
        """Queue a checked request (see `Engine.submit` for what it raises)."""
        need = self.blocks_for(len(request.prompt_ids) + request.max_new_tokens)
        if need > self.total_blocks:
            raise InvalidRequest("max_new_tokens", f"the request needs {need} KV blocks of {self.block_tokens} "
                                 f"tokens; the engine has {self.total_blocks}: lower max_new_tokens or give the KV "
                                 "cache more memory", code="kv_capacity_exceeded")
        with self.lock:
            if self.death is not None:
                raise RuntimeError(f"the engine thread died: {self.death}")
            if self.stopped:
                raise RuntimeError("the engine is closed")
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are waiting already")
            handle = Handle(next(self._ids), request, sink)
            self.pending.append(handle)
            self.lock.notify_all()
        return handle

    def cancel(self, handle: Handle) -> None:
        if handle.cancelled.is_set():
            return
        handle.cancelled.set()
        with self.lock:
            if handle in self.pending:  # free its queue place now, not when the engine next looks
                self.pending.remove(handle)
                self.cancelled_total += 1
                handle.emit(Event(finish="cancelled"))
            self.lock.notify_all()

    def hold(self, on: bool) -> None:
        """Tests: while held, nothing is admitted, so requests stay queued."""
        with self.lock:
            self.held = on
            self.lock.notify_all()

    def stop(self) -> None:
        """The engine thread ends at its next turn."""
        with self.lock:
            self.stopped = True
            self.lock.notify_all()

    def live(self) -> int:
        with self.lock:
            return len(self.pending) + len(self.running)

    # --- engine thread ---

    def wait_and_admit(self, new_generator: Callable[[int | None], Any]) -> bool:
        """Wait for work, then admit what fits. False once stopped."""
        with self.lock:
            self._drop_cancelled_pending()
            while not self.stopped and not self.running and (self.held or not self.pending):
                self.progress = time.monotonic()  # waiting for work is not a stall
                self.lock.wait(0.5)
                self._drop_cancelled_pending()
            if self.stopped:
                return False
            self._admit(new_generator)
        return True

    def _admit(self, new_generator: Callable[[int | None], Any]) -> None:
        """Move queued requests into prefill while batch places and KV blocks allow (FIFO, no overtaking)."""
        while not self.held and self.pending and len(self.running) < self.max_batch:
            handle = self.pending[0]
            request = handle.request
            try:
                need = self.blocks_for(len(request.prompt_ids) + request.max_new_tokens)
                widest = max(need, self._widest)
                gpu = self.blocks.usage().gpu  # rows are padded to the widest: every row grows to it
                if (len(self.running) + 1) * widest - gpu.used_blocks > gpu.available_blocks:
                    break
                text = TextStream(self.tokenizer, self.tokenizer_lock, request.stop, request.max_new_tokens)
                seq = Sequence(handle, text, new_generator(request.seed), handle.submitted, need)
            except Exception as exc:  # e.g. a seed the generator refuses: this request fails, the queue goes on
                self.pending.popleft()
                handle.emit(Event(finish="error", error=f"{type(exc).__name__}: {exc}"))
                continue
            self.pending.popleft()
            self.running[handle.id] = seq
            self.prefilling.append(seq)
            self._reserve_rows()

    def _reserve_rows(self) -> None:
        """Every running row holds the widest reservation's blocks (shrinking when the widest left)."""
        self._widest = max((seq.need for seq in self.running.values()), default=0)
        for seq in self.running.values():
            self.blocks.reserve(seq.key, self._widest)

    def next_prefill(self, look_up: LookUp | None) -> Prefill | None:
        """Prefill up to `prefill_chunk` prompt tokens of the oldest admitted requests.

        Whole prompts that fit the chunk are prefilled together, in one left-padded pass: with
        streamed weights every pass costs a full trip over the link, so a wave of new requests
        pays it once, not once each. A longer prompt is prefilled alone, a chunk per iteration.
        Cancelled requests end here; each prompt is looked up in the prefix cache (`look_up`,
        the runner's) when first reached.
        """
        group: list[Sequence] = []
        width = 0
        for seq in list(self.prefilling):
            if seq.handle.cancelled.is_set():
                self.finish(seq, Event(finish="cancelled"))
                continue
            if look_up is not None and not seq.looked_up:
                try:
                    self._reuse_prefix(seq, look_up)
                except Exception as exc:  # this request fails; the others prefill on
                    self.finish(seq, error_event(exc, seq))
                    continue
            prompt = seq.request.prompt_ids
            grown = max(width, len(prompt) - seq.prefilled)
            if self.max_batch > 1 and seq.prefilled == 0 and (len(group) + 1) * grown <= self.prefill_chunk:
                group.append(seq)
                width = grown
            elif not group:
                return Prefill([seq], chunk=prompt[seq.prefilled : seq.prefilled + self.prefill_chunk])
            else:
                break
        return Prefill(group, width) if group else None

    def _reuse_prefix(self, seq: Sequence, look_up: LookUp) -> None:
        """The cached KV is restored only for a prompt that would be prefilled alone (longer than a
        chunk, or no batching): a short prompt joins a group prefill, whose one streamed pass costs
        as much as the solo pass a restored prefix would still need. Its new blocks are stored after its prefill."""
        seq.looked_up = True
        prompt = seq.request.prompt_ids
        self.lookup_tokens += len(prompt)
        restore = len(prompt) > self.prefill_chunk or self.max_batch == 1
        seq.lease, cache = look_up(prompt, restore)
        if restore and seq.lease is not None and seq.lease.cached_tokens:
            seq.cache = cache
            self.prefilled(seq, seq.lease.cached_tokens)
            self.reused_tokens += seq.prefilled

    def prefilled(self, seq: Sequence, tokens: int) -> None:
        """`tokens` more prompt tokens of `seq` have their KV in its cache."""
        seq.prefilled += tokens
        self.blocks.append(seq.key, tokens)

    def ran(self, work: Prefill) -> list[Sequence]:
        """`work` went through the model. Returns the sequences whose whole prompt is through: their
        KV leaves their own cache for the batch."""
        for seq in work.seqs:
            self.prefilled(seq, len(seq.request.prompt_ids) if work.width else len(work.chunk))
        through = [seq for seq in work.seqs if seq.prefilled == len(seq.request.prompt_ids)]
        for seq in through:
            if not isinstance(seq.cache, HoldsBlocks):  # (a plain cache's tensors are merged into the batch's)
                seq.cache = None
        return through

    def joined(self, seqs: list[Sequence]) -> None:
        """Prefilled sequences joined the decode batch."""
        for seq in seqs:
            self.prefilling.remove(seq)

    def decoded(self, seqs: list[Sequence], columns: int = 1) -> None:
        """A decode step kept `columns` KV columns per row: the token each row was fed (and, after a
        speculative verify, the drafted tokens it accepted; rejected ones' columns are dropped)."""
        for seq in seqs:
            self.blocks.append(seq.key, columns)

    def cancelled(self, seqs: list[Sequence]) -> list[Event | None]:
        """A cancelled event for each cancelled sequence, None for the others."""
        return [Event(finish="cancelled") if seq.handle.cancelled.is_set() else None for seq in seqs]

    def accept(self, seqs: list[Sequence], tokens: list, logprobs: list) -> list[Event | None]:
        """Each row's sampled token (or the exception sampling raised for it) into its event; events
        that do not end their sequence are sent at once. Returns the ending events, None for the others."""
        now = time.perf_counter()
        events: list[Event | None] = []
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            try:
                for failure in (token, logprob):
                    if isinstance(failure, Exception):
                        raise failure
                event = self._push(seq, token, logprob, now)
            except Exception as exc:  # e.g. a NaN row the kernels refused, or the tokenizer failed on this text
                event = error_event(exc, seq)
            if event.finish is None:
                seq.handle.emit(event)
                events.append(None)
            else:
                events.append(event)
        self.metrics.generated(len(seqs))
        return events

    def _push(self, seq: Sequence, token: int, logprob: Any, now: float) -> Event:
        first = not seq.text.ids
        (self.metrics.first_token if first else self.metrics.inter_token)(now - (seq.submitted if first else seq.last_token_time))
        seq.last_token_time = now
        piece = seq.text.push(token, eos=token in self.eos_ids)
        return Event(piece.text, piece.finish, len(seq.text.ids), logprobs=(logprob,) if logprob else ())

    def finish(self, seq: Sequence, event: Event) -> None:
        """End a sequence that is not in the batch (any more): free its state and blocks, then tell its caller."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        if seq.lease is not None:
            self.prefix.abort(seq.lease)
            seq.lease = None
        if isinstance(seq.cache, HoldsBlocks):
            seq.cache.close()
        seq.cache = None
        with self.lock:
            if self.running.pop(seq.handle.id, None) is None:
                return  # ended already
            if event.finish == "cancelled":
                self.cancelled_total += 1
                event = Event(finish="cancelled", completion_tokens=len(seq.text.ids))
        self.blocks.free(seq.key)
        self._reserve_rows()
        self.kv = self._kv_snapshot()
        seq.handle.emit(event)

    def turned(self) -> None:
        """The engine thread came round its loop."""
        self.kv = self._kv_snapshot()
        self.progress = time.monotonic()

    def cancel_pending(self) -> None:
        """Shutting down: every queued request ends cancelled."""
        with self.lock:
            handles = list(self.pending)
            self.pending.clear()
            self.cancelled_total += len(handles)
        for handle in handles:
            handle.emit(Event(finish="cancelled"))

    def die(self, reason: str) -> None:
        """The engine thread failed: record why and end every request, rather than leave its caller waiting."""
        with self.lock:
            self.death = reason
            ended = [(seq.handle, len(seq.text.ids)) for seq in self.running.values()]
            ended += [(handle, 0) for handle in self.pending]
            self.running.clear()
            self.prefilling.clear()
            self.pending.clear()
        for handle, tokens in ended:
            handle.emit(Event(finish="error", error=f"the engine thread died: {reason}", completion_tokens=tokens))

    def _drop_cancelled_pending(self) -> None:
        for handle in [h for h in self.pending if h.cancelled.is_set()]:
            self.pending.remove(handle)
            self.cancelled_total += 1
            handle.emit(Event(finish="cancelled"))

    def _kv_snapshot(self) -> KVStats:
        gpu = self.blocks.usage().gpu
        held = self.held_tokens() + sum(seq.prefilled for seq in self.prefilling)
        device, host = self.token_bytes
        return KVStats(self.block_tokens, gpu.total_blocks, gpu.used_blocks - gpu.empty_blocks, gpu.used_blocks,
                       held * device, held * host, self.lookup_tokens, self.reused_tokens)


def error_event(exc: Exception, seq: Sequence) -> Event:
    return Event(finish="error", error=f"{type(exc).__name__}: {exc}", completion_tokens=len(seq.text.ids))
