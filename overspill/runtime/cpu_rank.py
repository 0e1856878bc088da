"""The host CPU as a second tensor-parallel rank of every streamed layer.

Streaming alone cannot beat streamed bytes / link bandwidth, but the host already holds those
bytes and multiplies matrices by vectors about as fast as the link moves them (issue 16). So each
streamed layer is split (`tp_split`): the GPU's share is what the ring copies into its slot; the
CPU's share stays in host memory and a worker thread computes it, at the same time as the GPU
computes its share of the same layer. The layer joins twice, after attention and after the MLP:
the normalized activation goes to the host once (D2H), the CPU's partial sum comes back once
(H2D) and is added to the GPU's. The CPU's KV heads keep their KV in host memory, in cache layers
of the same kind as the model's cache uses for that layer (full or sliding window), kept in step
with it: a cache that restarts at zero restarts them, a crop crops them.

The worker has its own torch thread count (`default_threads`: the cores less two, for the copy
engine's driver thread and the Python thread that launches GPU work). On the CPU-only path the
same code runs with "device" tensors on the host, so the tests check the split end to end.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..errors import OverspillError
from .layout import LayerLayout, host_bytes
from .tp_split import Dims, Norms, Share, check_supported, dims_of, norms_of, rank_twin, share_of, split_tensor

CACHE_KWARGS = ("cache", "past_key_values")  # transformers 5.25 names it cache, 5.17 past_key_values


def default_threads() -> int:
    """Worker threads: the cores this process may use, less one for the Python thread and one for
    the CUDA driver thread that feeds the copy engine."""
    return max(len(os.sched_getaffinity(0)) - 2, 1)


class CpuRank:
    """One worker thread that computes the CPU's shares, in submission order, with `threads` torch
    threads; moves activations to it and partial sums back without syncing the GPU's stream."""

    def __init__(self, device: torch.device, threads: int | None = None):
        self.device = device
        self.threads = threads or default_threads()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="overspill-cpu-rank", initializer=self._init)
        self._sent: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, Any]]] = {}

    def _init(self) -> None:
        torch.set_num_threads(self.threads)

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

    def submit(self, fn, *args: Any) -> Future:
        return self.pool.submit(_run, fn, args)

    def join(self, future: Future) -> torch.Tensor:
        """The CPU's partial sum on the device (the only host wait of a join: for the worker)."""
        part = future.result()
        if self.device.type != "cuda":
            return part
        return part.to(self.device, non_blocking=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _run(fn, args: tuple) -> torch.Tensor:
    """On the worker: wait for the inputs' copies, then compute with autograd off (thread-local)."""
    for event in args[-1]:
        if event is not None:
            event.synchronize()
    with torch.no_grad():
        out = fn(*args[:-1])
    if out.device.type == "cpu" and torch.cuda.is_available():
        pinned = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        return pinned.copy_(out)
    return out


class HostKV:
    """The CPU heads' KV of one layer, in host memory: a transformers cache layer of the kind the
    model's cache uses there, answering the attention module's `update(k, v, layer_idx, ...)`."""

    def __init__(self) -> None:
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
            self.layer = DynamicSlidingWindowLayer(sliding_window=window) if window else DynamicLayer()
            return
        if self.layer is not None and have > want and not getattr(self.layer, "is_sliding", False):
            self.layer.crop(want)
            return
        raise OverspillError(f"the CPU rank's KV of layer {index} holds {have} tokens where the cache holds "
                             f"{want}: KV changed outside generate (prefix restore, reordering) is not "
                             f"supported with cpu_compute; load with cpu_compute='off'")

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        return self.layer.update(key, value)


@dataclass
class SplitParts:
    """One layer after the split: the GPU share packed for the ring, the CPU share in host memory."""

    layout: LayerLayout
    host: torch.Tensor
    cpu: dict[str, torch.Tensor]


def split_layer(full: dict[str, torch.Tensor], dims: Dims, share: Share, pinned: bool) -> SplitParts:
    """Split a layer's tensors (layer-relative names, in layout order): the GPU's parts packed into
    one flat host buffer (pinned when a GPU will copy it), the CPU's kept contiguous."""
    gpu, cpu = {}, {}
    for name, tensor in full.items():
        g, c = split_tensor(dims, share, name, tensor)
        gpu[name] = g
        if c is not None:
            cpu[name] = c
    layout = LayerLayout.of([(n, tuple(t.shape), t.dtype) for n, t in gpu.items()])
    host = host_bytes(layout.nbytes, pinned)
    for entry, view in zip(layout.entries, layout.views(host)):
        view.copy_(gpu[entry.name])
    return SplitParts(layout, host, cpu)


class SplitLayer(nn.Module):
    """A streamed decoder layer computed by two ranks: its GPU share visits a ring slot (as a
    `StreamedLayer` does), its CPU share computes on the host worker; two joins per layer."""

    def __init__(self, streamed: nn.Module, dims: Dims, share: Share, rank: CpuRank):
        super().__init__()
        block = streamed.block
        self.block = block
        self.index = streamed.index
        self.position = streamed.position
        self.encoded = None
        self.dims, self.share = dims, share
        object.__setattr__(self, "ring", streamed.ring)
        object.__setattr__(self, "rank", rank)
        full = dict(zip((e.name for e in streamed.layout.entries), streamed.layout.views(streamed.host)))
        parts = split_layer(full, dims, share, pinned=streamed.host.is_pinned())
        self.host, self.layout = parts.host, parts.layout
        heads_cpu = share.kv_heads * dims.group
        gpu_dev = streamed.ring.slot_buffers[0].device
        cpu_dev = torch.device("cpu")
        slot0 = dict(zip((e.name for e in parts.layout.entries), self.ring.views(parts.layout, 0)))
        self.gpu_attn = rank_twin(block.self_attn, "self_attn", slot0, dims.heads - heads_cpu,
                                  dims.kv_heads - share.kv_heads, gpu_dev)
        self.gpu_mlp = rank_twin(block.mlp, "mlp", slot0, None, None, gpu_dev)
        object.__setattr__(self, "cpu_attn", rank_twin(block.self_attn, "self_attn", parts.cpu, heads_cpu,
                                                       share.kv_heads, cpu_dev))
        object.__setattr__(self, "cpu_mlp", rank_twin(block.mlp, "mlp", parts.cpu, None, None, cpu_dev))
        self.norms: Norms = norms_of(block)
        self.kv = HostKV()
        self._params = [self._target(e.name) for e in parts.layout.entries]

    def _target(self, name: str) -> nn.Parameter:
        """The parameter a GPU-layout entry binds: the twins' for attention and MLP, the block's for norms."""
        head, _, rest = name.partition(".")
        owner = {"self_attn": self.gpu_attn, "mlp": self.gpu_mlp}.get(head)
        if owner is None:
            return self.block.get_parameter(name)
        return owner.get_parameter(rest)

    def bind(self, slot: int) -> None:
        for param, view in zip(self._params, self.ring.views(self.layout, slot)):
            param.data = view

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise OverspillError("the CPU rank expects decoder layers called with keyword arguments")
        slot = self.ring.enter(self.position)
        self.bind(slot)
        block, rank = self.block, self.rank
        cache_name = next((k for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        cache = kwargs.get(cache_name) if cache_name else None
        if cache is not None and self.share.kv_heads:
            self.kv.follow(cache, self.index)
        mask, mask_ready = rank.send_once(kwargs.get("attention_mask"))
        cos, cos_ready = rank.send_once(kwargs["position_embeddings"][0])
        sin, sin_ready = rank.send_once(kwargs["position_embeddings"][1])

        h = getattr(block, self.norms.attn_in)(hidden_states)
        part = None
        if self.share.kv_heads:
            h_host, h_ready = rank.send(h)
            cpu_kv = {cache_name: self.kv} if cache is not None else {}
            part = rank.submit(self._cpu_attention, h_host, (cos, sin), mask, cpu_kv,
                               (h_ready, mask_ready, cos_ready, sin_ready))
        attn = self.gpu_attn(hidden_states=h, **kwargs)[0]
        if part is not None:
            attn = attn + rank.join(part)
        if self.norms.attn_out:
            attn = getattr(block, self.norms.attn_out)(attn)
        hidden_states = hidden_states + attn

        h = getattr(block, self.norms.mlp_in)(hidden_states)
        part = None
        if self.share.mlp_cols:
            h_host, h_ready = rank.send(h)
            part = rank.submit(self.cpu_mlp, h_host, (h_ready,))
        mlp = self.gpu_mlp(h)
        if part is not None:
            mlp = mlp + rank.join(part)
        if self.norms.mlp_out:
            mlp = getattr(block, self.norms.mlp_out)(mlp)
        hidden_states = hidden_states + mlp
        self.ring.exit(slot)
        return hidden_states

    def _cpu_attention(self, h, position_embeddings, mask, cache_kwargs) -> torch.Tensor:
        return self.cpu_attn(hidden_states=h, position_embeddings=position_embeddings, attention_mask=mask,
                             **cache_kwargs)[0]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def enable(model: nn.Module, fractions: dict[int, float], threads: int | None = None) -> CpuRank | None:
    """Split each streamed layer named in `fractions` (decoder index -> CPU fraction of its weights)
    between the GPU and a CPU rank; returns the rank (None when nothing splits).

    The GPU share replaces the layer's host buffer in the ring (only it crosses the link); the old
    full buffer is freed layer by layer, so host memory peaks at one extra layer.
    """
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
    splits = {i for i, f in fractions.items() if tp_share(dims, f) is not None}
    if not host_kv <= splits:  # a TieredCache stages every host-tier layer in slots of one KV shape
        fractions = {i: f for i, f in fractions.items() if i not in host_kv}
    rank = CpuRank(placement.device, threads)
    layers = model.get_submodule(placement.layers_path)
    for pos, streamed in enumerate(list(ring.layers)):
        fraction = fractions.get(streamed.index, 0.0)
        share = tp_share(dims, fraction)
        if share is None:
            continue
        split = SplitLayer(streamed, dims, share, rank)
        ring.layers[pos] = split
        layers[streamed.index] = split
        placement.host_bytes -= streamed.host.numel() - split.host.numel()
    placement.cpu_rank = rank
    return rank


def tp_share(dims: Dims, fraction: float) -> Share | None:
    """The share for `fraction`, or None where it rounds to nothing."""
    share = share_of(dims, fraction)
    return None if share.kv_heads == 0 and share.mlp_cols == 0 else share
