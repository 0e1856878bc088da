"""The host CPU as a second tensor-parallel rank of every streamed layer.

Streaming alone cannot beat streamed bytes / link bandwidth, but the host already holds those
bytes and multiplies matrices by vectors about as fast as the link moves them (issue 16). So each
streamed layer is split (`tp_split`): the GPU's share is what the ring copies into its slot; the
CPU's share stays in host memory and a worker thread computes it, at the same time as the GPU
computes its share of the same layer. The layer joins twice, after attention and after the MLP, on
both sides: each side's partial sum crosses to the other (8 KB each way for an 8B layer) and both add
the same two sums in the same order, so the worker's copy of the residual stream stays the device's,
bit for bit, and feeds the next layer without waiting for the Python thread to launch the device's
side of the join (at 5b57da5 that wait cost ~1 ms a join, 46 joins a step on the 8B shape). The CPU's
KV heads keep their KV in host memory, in cache layers
of the same kind as the model's cache uses for that layer (full or sliding window), kept in step
with it: a cache that restarts at zero restarts them, a crop crops them.

The worker has its own torch thread count (`default_threads`: the cores less two, for the copy
engine's driver thread and the Python thread that launches GPU work). On the CPU-only path the
same code runs with "device" tensors on the host, so the tests check the split end to end.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..errors import OverspillError
from ..planning.cpu_rank import HOST_FORMATS, checked_options, with_cpu_rank
from ..planning.formats import NATIVE
from ..planning.plan import Footprint, Plan
from ..planning.profile import Profile
from .host_int8 import K_ALIGN
from .kv import PresizedLayer
from .split_layer import SplitLayer
from .tp_split import SUPPORTED, Dims, Share, check_supported, dims_of, share_of


def default_threads() -> int:
    """Worker threads: the cores this process may use, less one for the Python thread and one for
    the CUDA driver thread that feeds the copy engine."""
    return max(len(os.sched_getaffinity(0)) - 2, 1)


class CpuRank:
    """One worker thread that computes the CPU's shares, in submission order, with `threads` torch
    threads; moves activations to it and partial sums back without syncing the GPU's stream."""

    def __init__(self, device: torch.device, threads: int | None = None, context: int = 0):
        self.device = device
        self.context = context  # tokens a sequence's host KV is allocated for at once (it grows past them)
        self.threads = threads or default_threads()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="overspill-cpu-rank", initializer=self._init)
        self._sent: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, Any]]] = {}
        self.reset_counters()
        self._job_wait_s = 0.0  # inside the running job: waits for the device's partial sums (`received`)
        self.host_weight_bytes = 0  # the CPU shares the host keeps (int8 host weights: about half of bf16)
        # the worker's copy of the last split layer's output, and the device tensor it equals (`SplitLayer`)
        self.carry: torch.Tensor | None = None
        self.carry_for: torch.Tensor | None = None

    def _init(self) -> None:
        torch.set_num_threads(self.threads)

    def set_threads(self, threads: int) -> None:
        """Compute later shares on a fresh worker of `threads` torch threads (the old one finishes its queue)."""
        self.pool.shutdown(wait=True)
        self.threads = threads
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="overspill-cpu-rank", initializer=self._init)

    def reset_counters(self) -> None:
        """Zero where a step's time goes (bench/cpu_rank.py reads them per run): the worker computing (by job
        function: `computed_s`), waiting for its inputs' copies, and queued behind earlier jobs; the Python
        thread waiting at joins."""
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
        return self.pool.submit(self._run, fn, args, time.perf_counter())

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

    def pinned(self, out: torch.Tensor | None) -> torch.Tensor | None:
        """`out` where its copy to the device does not block: in pinned memory when the device is a GPU."""
        if out is None or self.device.type != "cuda":
            return out
        return torch.empty(out.shape, dtype=out.dtype, pin_memory=True).copy_(out)

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

    def join(self, future: Future) -> torch.Tensor:
        """The CPU's partial sum on the device (the only host wait of a join: for the worker)."""
        start = time.perf_counter()
        part = future.result()
        self.waited_s += time.perf_counter() - start
        self.joins += 1
        if self.device.type != "cuda":
            return part
        return part.to(self.device, non_blocking=True)

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


def blocker(plan: Plan, config, cuda_graphs: bool, speculate: str | None) -> str | None:
    """Why this load cannot split its streamed layers, or None."""
    try:
        check_supported(config)
    except OverspillError:
        return f"model_type {config.get_text_config().model_type!r} is not split (dense {', '.join(SUPPORTED)} only)"
    if plan.streaming != "copy":
        return f"streaming={plan.streaming!r} (the CPU rank splits layers copied from pinned memory)"
    if plan.stream_format != NATIVE:
        return f"stream format {plan.stream_format} (the CPU rank splits bf16 layers)"
    if cuda_graphs:
        return "CUDA graphs cannot wait for the host's partial sums"
    if speculate is not None:
        return "speculative verification is not split yet"
    return None


def plan_cpu_rank(fp: Footprint, plan: Plan, profile: Profile | None, mode: str | float, config,
                  cuda_graphs: bool = False, speculate: str | None = None, host_format: str = "bf16") -> Plan:
    """`load(cpu_compute=..., cpu_compute_format=...)`: the plan with its CPU fraction and host format
    (`planning.cpu_rank.with_cpu_rank`); an explicit "on" or fraction that this load cannot honour is
    refused, "auto" notes why it is off."""
    mode = checked_options(mode, host_format)
    why = blocker(plan, config, cuda_graphs, speculate) if plan.streamed_layers and mode != "off" else None
    if why is not None and mode != "auto":
        raise OverspillError(f"--cpu-compute {mode}: {why}; use --cpu-compute off or auto")
    return with_cpu_rank(fp, plan, profile, mode, why, host_format)


def enable_planned(model: nn.Module, threads: int | None = None) -> CpuRank | None:
    """Split the streamed layers of a loaded model as its plan says (`Plan.cpu_fraction`)."""
    from .loader import placement_of

    plan = placement_of(model).plan
    if plan.cpu_fraction <= 0:
        return None
    return enable(model, dict.fromkeys(plan.streamed_layers, plan.cpu_fraction), threads, plan.cpu_max_tokens,
                  plan.cpu_format)
