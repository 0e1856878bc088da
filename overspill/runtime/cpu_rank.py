"""The host CPU as a second tensor-parallel rank of every streamed layer.

Streaming alone cannot beat streamed bytes / link bandwidth, but the host already holds those
bytes and multiplies matrices by vectors about as fast as the link moves them (issue 16). So each
streamed layer is split (`tp_split`): the GPU's share is what the ring copies into its slot; the
CPU's share stays in host memory and a worker thread computes it, at the same time as the GPU
computes its share of the same layer. The layer joins twice, after attention and after the MLP, on
both sides: each side's partial sum crosses to the other (8 KB each way for an 8B layer) and both add
the same two sums in the same order, so the worker's copy of the residual stream stays the device's,
bit for bit, and feeds the next layer without waiting for the Python thread to launch the device's
side of the join (at 5b57da5 that wait cost ~1 ms a join, 46 joins a step on the 8B shape).

Nor does the Python thread wait for the worker (`Handoff`): the device's side of a join is a stream
wait (`cuStreamWaitValue32`) for a counter in pinned host memory that the worker raises once its
partial sum is written, then that sum's copy, so the Python thread launches a whole step and every
layer's job is queued at once. When it waited at each join instead, an 8B step on an H100 host (23
split layers, 46 joins) took 152 ms where the link allows ~110: the Python thread waited 88 ms at
joins, and the worker (busy 101 ms) sat idle ~47 ms, each job queued only once the Python thread got
past the previous layer's join, the two threads fighting for the GIL. A job that fails still raises
the counter (its sums read as NaN), so the GPU never waits forever; its error is raised on the Python
thread at the next submit or join.

The CPU's KV heads keep their KV in host memory, in cache layers of the same kind as the model's
cache uses for that layer (full or sliding window), kept in step with it: a cache that restarts at
zero restarts them, a crop crops them.

The worker has its own torch thread count (`default_threads`: the cores less two, for the copy
engine's driver thread and the Python thread that launches GPU work). On the CPU-only path the
same code runs with "device" tensors on the host, so the tests check the split end to end.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..errors import OverspillError
from ..planning.cpu_rank import HOST_FORMATS, blocker, chosen
from ..planning.plan import Footprint, Plan
from ..planning.profile import Profile
from . import cuda_driver
from .host_int8 import K_ALIGN
from .kv import PresizedLayer
from .split_layer import SplitLayer
from .tp_split import Dims, Share, check_supported, dims_of, share_of


def default_threads() -> int:
    """Worker threads: the cores this process may use, less one for the Python thread and one for
    the CUDA driver thread that feeds the copy engine."""
    return max(len(os.sched_getaffinity(0)) - 2, 1)


ORDERED_STORES = ("x86_64", "amd64", "i386", "i686")  # hosts whose stores become visible in program order (TSO)
RELEASE = 3  # __ATOMIC_RELEASE


@functools.cache
def _atomic_store32():
    """libatomic's `__atomic_store_4`: on aarch64 a store-release (stlr), which no earlier store passes."""
    try:
        store = ctypes.CDLL("libatomic.so.1").__atomic_store_4
    except (OSError, AttributeError):
        return None
    store.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int)
    store.restype = None
    return store


def plain_store32(address: int, value: int) -> None:
    ctypes.c_int32.from_address(address).value = value


def release_store32(address: int, value: int) -> None:
    _atomic_store32()(address, value % 2**32, RELEASE)


def counter_store(machine: str = platform.machine()) -> Callable[[int, int], None]:
    """How the worker stores the join counter: so that its earlier stores (and those of the threads it joined, such
    as a copy's torch threads) are visible first, as a stream waiting for the value then reads them. x86 keeps
    stores in order, so a plain store does; elsewhere (a GH200's aarch64 host) libatomic's store-release does.
    Refused at once where libatomic is missing, not in the worker, whose failure must still raise the counter."""
    if machine.lower() in ORDERED_STORES:
        return plain_store32
    if _atomic_store32() is None:
        raise OverspillError("the CPU rank's joins need libatomic.so.1 on this host (libatomic1 in Debian and "
                             "Ubuntu) to order their stores; install it, or use cpu_compute='off'")
    return release_store32


class Ticket(NamedTuple):
    """One join's hand-over: the buffer the worker writes its partial sum into, and the counter value that says
    it is written."""

    dst: torch.Tensor
    seq: int


class Handoff:
    """The worker's partial sums to the device's side of each join, in submission order, without the Python
    thread waiting for the worker on CUDA.

    The Python thread takes a `ticket` per join as it queues the layer's job (a buffer shaped as the device's
    partial sum, pinned on CUDA, and the next sequence number); the worker `deliver`s: it writes the buffer,
    then stores the number into `counter`. Jobs run in submission order, so the counter only rises.
    `collect` on CUDA queues, on the current stream, a wait for the counter to reach the ticket's number and
    the buffer's copy, and returns at once; on the CPU-only path it waits on a condition for the same counter.
    A job that fails calls `fail`: the first error is kept for the Python thread, the buffers that job promised
    are filled with NaN and the counter is raised past them, so neither a stream nor a thread waits forever.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.counter = torch.zeros(1, dtype=torch.int32, pin_memory=self.cuda)  # the last seq delivered, mod 2**32
        self._store = counter_store() if self.cuda else plain_store32  # the CPU path orders by its condition
        self.address: int | None = None  # the counter's device address: asked on the thread that launches the waits
        self.issued = self.delivered = 0  # the last seq handed out (Python thread) and stored (worker); no wrap
        self.error: BaseException | None = None
        self._pending: deque[Ticket] = deque()  # handed out, not delivered
        self._cond = threading.Condition()  # re-entrant (`fail` releases under it)

    def ticket(self, like: torch.Tensor) -> Ticket:
        """Python thread: a buffer for the worker's partial sum of the join whose device partial sum is shaped
        and typed as `like`, and the next sequence number."""
        with torch.inference_mode(False):  # a normal tensor whatever the caller's mode: the worker writes it
            dst = torch.empty(like.shape, dtype=like.dtype, pin_memory=self.cuda)
        with self._cond:
            self.issued += 1
            ticket = Ticket(dst, self.issued)
            self._pending.append(ticket)
        return ticket

    def deliver(self, ticket: Ticket, part: torch.Tensor) -> None:
        """Worker: `part` into the ticket's buffer (converted to its dtype), then the counter to its seq."""
        ticket.dst.copy_(part)
        self._release(ticket.seq)

    def _release(self, seq: int) -> None:
        with self._cond:
            while self._pending and self._pending[0].seq <= seq:
                self._pending.popleft()
            if seq > self.delivered:
                self.delivered = seq
                # after the buffer's writes, so a stream that reads the new value reads complete buffers
                self._store(self.counter.data_ptr(), (seq + 2**31) % 2**32 - 2**31)
            self._cond.notify_all()

    def fail(self, error: BaseException, upto: int) -> None:
        """Worker: a job ended without delivering; keep the first error, fill the buffers of seqs up to `upto`
        that are still undelivered with NaN, and release them."""
        with self._cond:
            if self.error is None:
                self.error = error
            try:
                for ticket in self._pending:
                    if ticket.seq <= upto:
                        ticket.dst.fill_(float("nan"))
            finally:  # nothing may keep the counter from moving on
                self._release(upto)

    def collect(self, ticket: Ticket) -> torch.Tensor:
        """Python thread: the worker's partial sum for `ticket` on the device. On CUDA, queued on the current
        stream behind a wait for the counter (no host wait); on the CPU, once the worker delivered it. Raises the
        error of a job that failed since the last `CpuRank.settle`."""
        if self.cuda:
            self.raise_error()
            stream = torch.cuda.current_stream(self.device).cuda_stream
            if self.address is None:  # in the CUDA context this thread launches the pass in
                self.address = cuda_driver.host_device_pointer(self.counter.data_ptr())
            cuda_driver.stream_wait_value32(stream, self.address, ticket.seq)
            return ticket.dst.to(self.device, non_blocking=True)
        with self._cond:
            self._cond.wait_for(lambda: self.delivered >= ticket.seq or self.error is not None)
        self.raise_error()
        return ticket.dst

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


class CpuRank:
    """One worker thread that computes the CPU's shares, in submission order, with `threads` torch
    threads; moves activations to it and partial sums back (`handoff`) without syncing the GPU's stream
    or waiting for the worker on CUDA."""

    def __init__(self, device: torch.device, threads: int | None = None, context: int = 0):
        self.device = device
        self.context = context  # tokens a sequence's host KV is allocated for at once (it grows past them)
        self.threads = threads or default_threads()
        self.pool = self._new_pool()
        self.handoff = Handoff(device)
        self._sent: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, Any]]] = {}
        self.reset_counters()
        self._job_wait_s = 0.0  # inside the running job: waits for the device's partial sums (`received`)
        self.host_weight_bytes = 0  # the CPU shares the host keeps (int8 host weights: about half of bf16)
        # the worker's copy of the last split layer's output, and the device tensor it equals (`SplitLayer`)
        self.carry: torch.Tensor | None = None
        self.carry_for: torch.Tensor | None = None
        self.traced = True  # the worker runs each layer's norm and MLP share as one TorchScript call (`host_call`)

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, thread_name_prefix="overspill-cpu-rank", initializer=self._init)

    def _init(self) -> None:
        torch.set_num_threads(self.threads)

    def set_threads(self, threads: int) -> None:
        """Compute later shares on a fresh worker of `threads` torch threads (the old one finishes its queue)."""
        self.pool.shutdown(wait=True)
        self.threads = threads
        self.pool = self._new_pool()

    def reset_counters(self) -> None:
        """Zero where a step's time goes (bench/cpu_rank.py reads them per run): the worker computing (by job
        function: `computed_s`), waiting for its inputs' copies, and queued behind earlier jobs; the Python
        thread's time in joins (`waited_s`: on the CPU its waits for the worker; on CUDA only queueing the
        device's wait and copy) and the joins themselves."""
        self.busy_s = self.waited_s = self.input_wait_s = self.queued_s = 0.0
        self.computed_s: dict[str, float] = {}
        self.joins = 0

    def send(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(host copy of `x`, the event it is complete at, or None): a non-blocking copy into pinned
        memory on the compute stream, so the GPU runs on while it lands."""
        if x.device.type != "cuda":
            return x, None
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        out.copy_(x, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return out, event

    def send_once(self, x: torch.Tensor | None) -> tuple[torch.Tensor | None, Any]:
        """`send` for tensors every layer of a pass shares (mask, rotary cos/sin): one copy per pass."""
        if x is None:
            return None, None
        hit = self._sent.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        if len(self._sent) > 16:
            self._sent.clear()
        sent = self.send(x)
        self._sent[id(x)] = (x, sent)
        return sent

    def host_kv(self) -> "HostKV":
        """A layer's CPU-head KV store (the worker is the only one to touch it)."""
        return HostKV(self.context)

    def submit(self, fn, *args: Any) -> Future:
        """Queue `fn(*args[:-1])` on the worker, to start once the events in `args[-1]` complete. The joins it
        promised are the tickets handed out so far: if it fails, `_guarded` releases them. Raises the error of a
        job that failed since the last `settle` (once the worker has drained)."""
        if self.handoff.error is not None:
            raise self.settle()  # the recorded error: only settle clears it
        return self.pool.submit(self._guarded, self.handoff.issued, fn, args, time.perf_counter())

    def _guarded(self, upto: int, fn, args: tuple, submitted: float) -> None:
        """On the worker: `_run` the job unless an earlier one failed since the last `settle` (its input may be
        stale). A job that fails or is skipped leaves no carry and releases every join up to seq `upto` through
        `Handoff.fail`, which keeps the first error for the Python thread."""
        if self.handoff.error is not None:
            self.carry = None
            self.handoff.fail(self.handoff.error, upto)
            return
        try:
            self._run(fn, args, submitted)
        except BaseException as exc:
            self.carry = None  # the next job must not take an older layer's output for its input
            self.handoff.fail(exc, upto)
            raise

    def settle(self) -> BaseException | None:
        """Python thread, once a pass has failed (every box a queued job waits on is set by then): wait until the
        worker has ended every queued job, then forget the failure, so the next pass starts clean. Returns the
        first error a job raised, if one did."""
        self.pool.submit(lambda: None).result()
        error, self.handoff.error = self.handoff.error, None
        return error

    def finish(self, job: Future) -> None:
        """Python thread: wait until `job` (a layer's job of an earlier pass) has ended, so this pass may touch
        what it used (the layer's host KV and CPU twins). Waits only where a pass is launched before the device
        has finished the last one (no sync between them); its error, if any, arrives through `handoff`."""
        if not job.done():
            start = time.perf_counter()
            wait_for_futures([job])
            self.waited_s += time.perf_counter() - start

    def _run(self, fn, args: tuple, submitted: float) -> None:
        """On the worker: wait for the inputs' copies (the events last in `args`), then run the job with
        autograd off (thread-local), timing its work apart from its waits."""
        begin = time.perf_counter()
        for event in args[-1]:
            if event is not None:
                event.synchronize()
        start = time.perf_counter()
        self._job_wait_s = 0.0
        try:
            with torch.no_grad():
                fn(*args[:-1])
        finally:
            work = time.perf_counter() - start - self._job_wait_s
            self.queued_s += begin - submitted
            self.input_wait_s += start - begin
            self.busy_s += work
            self.computed_s[fn.__name__] = self.computed_s.get(fn.__name__, 0.0) + work

    def received(self, box: Future) -> torch.Tensor:
        """On the worker: the device's partial sum that `box` hands over (`send`'s host copy and event), once
        its copy has landed; the wait counts as input wait, not work."""
        start = time.perf_counter()
        tensor, event = box.result()
        if event is not None:
            event.synchronize()
        waited = time.perf_counter() - start
        self.input_wait_s += waited
        self._job_wait_s += waited  # not the job's work (`_run`)
        return tensor

    def collect(self, ticket: Ticket) -> torch.Tensor:
        """The worker's partial sum of a join on the device (`Handoff.collect`: no host wait on CUDA)."""
        start = time.perf_counter()
        part = self.handoff.collect(ticket)
        self.waited_s += time.perf_counter() - start
        self.joins += 1
        return part

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class HostKV:
    """The CPU heads' KV of one layer, in host memory: a transformers cache layer of the kind the
    model's cache uses there, answering the attention module's `update(k, v, layer_idx, ...)`."""

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.layer: DynamicLayer | None = None

    def follow(self, gpu_cache: Any, index: int) -> None:
        """Match the model cache's length for this layer before a pass appends to both."""
        want = gpu_cache.get_seq_length(index)
        have = self.layer.get_seq_length() if self.layer is not None else 0
        if want == have and self.layer is not None:
            return
        if want == 0:
            layers = getattr(gpu_cache, "layers", [])
            like = layers[index] if index < len(layers) else None
            window = getattr(like, "sliding_window", None) if getattr(like, "is_sliding", False) else None
            # full attention: allocated once for the planned context and written in place (a growing
            # cat would copy the whole KV every step); sliding windows stay window-bounded
            self.layer = DynamicSlidingWindowLayer(sliding_window=window) if window else PresizedLayer(self.capacity)
            return
        if self.layer is not None and have > want and not getattr(self.layer, "is_sliding", False):
            self.layer.crop(want - have)  # negative: tokens to drop (5.17 and 5.25 agree on that form)
            return
        raise OverspillError(f"the CPU rank's KV of layer {index} holds {have} tokens where the cache holds "
                             f"{want}: KV changed outside generate (prefix restore, reordering) is not "
                             f"supported with cpu_compute; load with cpu_compute='off'")

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        """Append this pass's KV (computed on the device in a wide pass: copied here, and the layer's
        states handed back there) and return the states attention reads."""
        # Buffers are normal tensors whatever the caller's mode: one allocated under inference_mode (the
        # caller's thread, in a wide pass) could not be written by the worker, whose mode is its own.
        with torch.inference_mode(False), torch.no_grad():
            if key.device.type == "cpu":
                return self.layer.update(key, value)
            keys, values = self.layer.update(key.cpu(), value.cpu())
        return keys.to(key.device), values.to(key.device)


def enable(model: nn.Module, fractions: dict[int, float], threads: int | None = None,
           max_tokens: int = 64, host_format: str = "bf16") -> CpuRank | None:
    """Split each streamed layer named in `fractions` (decoder index -> CPU fraction of its weights)
    between the GPU and a CPU rank; returns the rank (None when nothing splits). Passes of more
    than `max_tokens` tokens compute the CPU share on the GPU (`SplitLayer`). `host_format` "int8":
    the host keeps the CPU share as int8 rows and scales instead of bf16 and the worker multiplies
    them (`host_int8`; lossy, ~2x the host's speed, ~half the share's host bytes).

    The GPU share replaces the layer's host buffer in the ring (only it crosses the link); the old
    full buffer is freed layer by layer, so host memory peaks at one extra layer.
    """
    if host_format not in HOST_FORMATS:
        raise OverspillError(f"host weights of the CPU rank are {' or '.join(HOST_FORMATS)}, not {host_format!r}")
    from .loader import placement_of

    placement = placement_of(model)
    ring = placement.ring
    if ring is None or not fractions:
        return None
    check_supported(model.config)
    if ring.in_place or ring.expander is not None:
        raise OverspillError("the CPU rank splits layers streamed as bf16 copies: use --streaming copy and "
                             "--stream-format bf16 with --cpu-compute")
    dims = dims_of(model.config)
    host_kv = set(placement.plan.kv_host_layers)
    splits = {i for i, f in fractions.items() if tp_share(dims, f, host_format) is not None}
    if not host_kv <= splits:  # a TieredCache stages every host-tier layer in slots of one KV shape
        fractions = {i: f for i, f in fractions.items() if i not in host_kv}
    rank = CpuRank(placement.device, threads, placement.plan.workload.context)
    ring.reset()  # copies already issued into the slots hold whole layers: the next pass refills them split
    layers = model.get_submodule(placement.layers_path)
    for pos in range(len(ring.layers)):  # by index: a copied list would keep every replaced layer's host bytes alive
        streamed = ring.layers[pos]
        share = tp_share(dims, fractions.get(streamed.index, 0.0), host_format)
        if share is None:
            continue
        split = SplitLayer(streamed, dims, share, rank, max_tokens, host_format)
        ring.layers[pos] = split
        layers[streamed.index] = split
        placement.host_bytes -= streamed.host.numel() - split.host.numel()
        rank.host_weight_bytes += split.cpu_share.host.numel()
        del streamed  # the whole layer's host buffer goes now, before the next layer's split is packed
    placement.cpu_rank = rank
    return rank


def tp_share(dims: Dims, fraction: float, host_format: str = "bf16") -> Share | None:
    """The share for `fraction`, or None where it rounds to nothing; int8 host weights take MLP columns
    in whole blocks of their kernel (`host_int8.K_ALIGN`: the down projection's input width)."""
    share = share_of(dims, fraction, K_ALIGN if host_format == "int8" else 1)
    return None if share.kv_heads == 0 and share.mlp_cols == 0 else share


def plan_cpu_rank(fp: Footprint, plan: Plan, profile: Profile | None, mode: str | float, config,
                  cuda_graphs: bool = False, speculate: str | None = None, host_format: str = "bf16") -> Plan:
    """`load(cpu_compute=..., cpu_compute_format=...)`: `planning.cpu_rank.chosen` for this model's config."""
    why = blocker(plan, config.get_text_config().model_type, cuda_graphs, speculate)
    planned = chosen(fp, plan, profile, mode, why, host_format)
    if planned.cpu_fraction and torch.cuda.is_available():
        counter_store()  # a host that cannot order the joins' stores is refused now, before minutes of loading
    return planned


def enable_planned(model: nn.Module, threads: int | None = None) -> CpuRank | None:
    """Split the streamed layers of a loaded model as its plan says (`Plan.cpu_fraction`)."""
    from .loader import placement_of

    plan = placement_of(model).plan
    if plan.cpu_fraction <= 0:
        return None
    return enable(model, dict.fromkeys(plan.streamed_layers, plan.cpu_fraction), threads, plan.cpu_max_tokens,
                  plan.cpu_format)
