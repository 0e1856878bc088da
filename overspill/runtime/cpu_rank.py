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
        """Append this pass's KV (computed on the device in a wide pass: copied here, and the layer's
        states handed back there) and return the states attention reads."""
        if key.device.type == "cpu":
            return self.layer.update(key, value)
        keys, values = self.layer.update(key.cpu(), value.cpu())
        return keys.to(key.device), values.to(key.device)


@dataclass
class Packed:
    """Tensors packed into one flat host buffer, in layout order."""

    layout: LayerLayout
    host: torch.Tensor

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], pinned: bool) -> "Packed":
        layout = LayerLayout.of([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
        host = host_bytes(layout.nbytes, pinned)
        for entry, view in zip(layout.entries, layout.views(host)):
            view.copy_(tensors[entry.name])
        return cls(layout, host)

    def named_views(self, buffer: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        views = self.layout.views(self.host if buffer is None else buffer)
        return dict(zip((e.name for e in self.layout.entries), views))


def split_layer(full: dict[str, torch.Tensor], dims: Dims, share: Share, pinned: bool) -> tuple[Packed, Packed]:
    """(GPU share, CPU share) of a layer's tensors (layer-relative names), each packed into one flat
    host buffer, pinned when a GPU will copy it (the GPU share every pass, the CPU share for wide ones)."""
    gpu, cpu = {}, {}
    for name, tensor in full.items():
        g, c = split_tensor(dims, share, name, tensor)
        gpu[name] = g
        if c is not None:
            cpu[name] = c
    return Packed.of(gpu, pinned), Packed.of(cpu, pinned)


class SplitLayer(nn.Module):
    """A streamed decoder layer computed by two ranks: its GPU share visits a ring slot (as a
    `StreamedLayer` does), its CPU share computes on the host worker; two joins per layer.

    A pass wider than `max_tokens` tokens (a long prompt) is compute-bound, where the host is ~100x
    slower than the GPU: there the CPU share is copied to the device beside the slot's share and
    the GPU computes both (its heads' new KV still goes to the host layers), so prefill never waits
    for the host's GEMMs.
    """

    def __init__(self, streamed: nn.Module, dims: Dims, share: Share, rank: CpuRank, max_tokens: int):
        super().__init__()
        block = streamed.block
        self.block = block
        self.index = streamed.index
        self.position = streamed.position
        self.encoded = None
        self.dims, self.share, self.max_tokens = dims, share, max_tokens
        object.__setattr__(self, "ring", streamed.ring)
        object.__setattr__(self, "rank", rank)
        full = dict(zip((e.name for e in streamed.layout.entries), streamed.layout.views(streamed.host)))
        gpu, cpu = split_layer(full, dims, share, pinned=streamed.host.is_pinned())
        self.host, self.layout = gpu.host, gpu.layout
        self.cpu_share = cpu
        heads_cpu = share.kv_heads * dims.group
        self.device = streamed.ring.slot_buffers[0].device
        slot0 = dict(zip((e.name for e in gpu.layout.entries), self.ring.views(gpu.layout, 0)))
        self.gpu_attn = rank_twin(block.self_attn, "self_attn", slot0, dims.heads - heads_cpu,
                                  dims.kv_heads - share.kv_heads, self.device)
        self.gpu_mlp = rank_twin(block.mlp, "mlp", slot0, None, None, self.device)
        host = cpu.named_views()
        cpu_dev = torch.device("cpu")
        object.__setattr__(self, "cpu_attn", rank_twin(block.self_attn, "self_attn", host, heads_cpu,
                                                       share.kv_heads, cpu_dev))
        object.__setattr__(self, "cpu_mlp", rank_twin(block.mlp, "mlp", host, None, None, cpu_dev))
        self.norms: Norms = norms_of(block)
        self.kv = HostKV()
        self._params = [self._target(e.name) for e in gpu.layout.entries]
        self._cpu_params = [self._cpu_target(e.name) for e in cpu.layout.entries]

    def _target(self, name: str) -> nn.Parameter:
        """The parameter a GPU-layout entry binds: the twins' for attention and MLP, the block's for norms."""
        head, _, rest = name.partition(".")
        owner = {"self_attn": self.gpu_attn, "mlp": self.gpu_mlp}.get(head)
        if owner is None:
            return self.block.get_parameter(name)
        return owner.get_parameter(rest)

    def _cpu_target(self, name: str) -> nn.Parameter:
        head, _, rest = name.partition(".")
        return (self.cpu_attn if head == "self_attn" else self.cpu_mlp).get_parameter(rest)

    def bind(self, slot: int) -> None:
        for param, view in zip(self._params, self.ring.views(self.layout, slot)):
            param.data = view

    def _bind_cpu_share(self, buffer: torch.Tensor) -> None:
        for param, view in zip(self._cpu_params, self.cpu_share.layout.views(buffer)):
            param.data = view

    def _cpu_share_to_device(self, slot: int) -> None:
        """Copy the CPU share into the slot's free tail (a temporary where it does not fit), on the
        compute stream, and point the CPU twins at it for this pass."""
        need, used = self.cpu_share.layout.nbytes, self.layout.nbytes
        buffer = self.ring.slot_buffers[slot]
        if buffer.numel() - used >= need:
            dev = buffer[used : used + need]
        else:
            dev = torch.empty(need, dtype=torch.uint8, device=self.device)
        dev.copy_(self.cpu_share.host, non_blocking=True)
        self._bind_cpu_share(dev)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise OverspillError("the CPU rank expects decoder layers called with keyword arguments")
        slot = self.ring.enter(self.position)
        self.bind(slot)
        wide = hidden_states.shape[:-1].numel() > self.max_tokens
        if wide:
            self._cpu_share_to_device(slot)
        try:
            out = self._layer(hidden_states, kwargs, wide)
        finally:
            if wide:
                self._bind_cpu_share(self.cpu_share.host)
        self.ring.exit(slot)
        return out

    def _layer(self, hidden_states: torch.Tensor, kwargs: dict, wide: bool) -> torch.Tensor:
        block = self.block
        cache_name = next((k for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        cache = kwargs.get(cache_name) if cache_name else None
        if cache is not None and self.share.kv_heads:
            self.kv.follow(cache, self.index)
        cpu_kv = {cache_name: self.kv} if cache is not None else {}

        h = getattr(block, self.norms.attn_in)(hidden_states)
        part = None
        if self.share.kv_heads:
            part = self._start(self._cpu_attention, wide, h, kwargs["position_embeddings"],
                               kwargs.get("attention_mask"), cpu_kv)
        attn = self.gpu_attn(hidden_states=h, **kwargs)[0]
        if part is not None:
            attn = attn + self._finish(part, wide)
        if self.norms.attn_out:
            attn = getattr(block, self.norms.attn_out)(attn)
        hidden_states = hidden_states + attn

        h = getattr(block, self.norms.mlp_in)(hidden_states)
        part = self._start(self.cpu_mlp, wide, h) if self.share.mlp_cols else None
        mlp = self.gpu_mlp(h)
        if part is not None:
            mlp = mlp + self._finish(part, wide)
        if self.norms.mlp_out:
            mlp = getattr(block, self.norms.mlp_out)(mlp)
        return hidden_states + mlp

    def _start(self, fn, wide: bool, h: torch.Tensor, *shared: Any):
        """Start the CPU share: on the worker (the activation sent once; the pass's mask and rotary
        tables once per pass), or, for a wide pass, right here on the device."""
        if wide:
            return fn(h, *shared)
        rank = self.rank
        h_host, ready = rank.send(h)
        events = [ready]
        moved = []
        for item in shared:
            if isinstance(item, tuple):  # rotary (cos, sin)
                sent = [rank.send_once(t) for t in item]
                moved.append(tuple(t for t, _ in sent))
                events += [e for _, e in sent]
            elif isinstance(item, torch.Tensor) or item is None:
                tensor, event = rank.send_once(item)
                moved.append(tensor)
                events.append(event)
            else:
                moved.append(item)
        return rank.submit(fn, h_host, *moved, tuple(events))

    def _finish(self, part, wide: bool) -> torch.Tensor:
        return part if wide else self.rank.join(part)

    def _cpu_attention(self, h, position_embeddings, mask, cache_kwargs) -> torch.Tensor:
        return self.cpu_attn(hidden_states=h, position_embeddings=position_embeddings, attention_mask=mask,
                             **cache_kwargs)[0]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def enable(model: nn.Module, fractions: dict[int, float], threads: int | None = None,
           max_tokens: int = 64) -> CpuRank | None:
    """Split each streamed layer named in `fractions` (decoder index -> CPU fraction of its weights)
    between the GPU and a CPU rank; returns the rank (None when nothing splits). Passes of more
    than `max_tokens` tokens compute the CPU share on the GPU (`SplitLayer`).

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
        split = SplitLayer(streamed, dims, share, rank, max_tokens)
        ring.layers[pos] = split
        layers[streamed.index] = split
        placement.host_bytes -= streamed.host.numel() - split.host.numel()
    placement.cpu_rank = rank
    return rank


def tp_share(dims: Dims, fraction: float) -> Share | None:
    """The share for `fraction`, or None where it rounds to nothing."""
    share = share_of(dims, fraction)
    return None if share.kv_heads == 0 and share.mlp_cols == 0 else share
