"""One streamed decoder layer computed by two ranks (issue 16): the GPU's share visits a ring slot,
the CPU's share computes on the `cpu_rank.CpuRank` worker, and the two join after attention and
after the MLP (`tp_split` says which rows and columns each rank holds, and why that is the model's
own arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ..errors import OverspillError
from .host_int8 import int8_twin
from .layout import LayerLayout, host_bytes
from .tp_split import Dims, Norms, Share, norms_of, rank_twin, split_tensor

CACHE_KWARGS = ("cache", "past_key_values")  # transformers 5.25 names it cache, 5.17 past_key_values


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

    def __init__(self, streamed: nn.Module, dims: Dims, share: Share, rank: Any, max_tokens: int,
                 host_format: str = "bf16"):
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
        self.host_format = host_format
        worker = (self.cpu_attn, self.cpu_mlp)  # the modules the worker runs (wide passes: cpu_attn/cpu_mlp)
        if host_format == "int8":
            worker = (int8_twin(self.cpu_attn), int8_twin(self.cpu_mlp))
        elif host_format != "bf16":
            raise OverspillError(f"host weights of the CPU rank are bf16 or int8, not {host_format!r}")
        object.__setattr__(self, "worker_modules", worker)
        self.norms: Norms = norms_of(block)
        self.kv = rank.host_kv()
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
        attn_cpu, mlp_cpu = (self.cpu_attn, self.cpu_mlp) if wide else self.worker_modules
        if self.share.kv_heads:
            part = self._start(partial(_attention, attn_cpu), wide, h, kwargs["position_embeddings"],
                               kwargs.get("attention_mask"), cpu_kv)
        attn = self.gpu_attn(hidden_states=h, **kwargs)[0]
        if part is not None:
            attn = attn + self._finish(part, wide)
        if self.norms.attn_out:
            attn = getattr(block, self.norms.attn_out)(attn)
        hidden_states = hidden_states + attn

        h = getattr(block, self.norms.mlp_in)(hidden_states)
        part = self._start(mlp_cpu, wide, h) if self.share.mlp_cols else None
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

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def _attention(module: nn.Module, h, position_embeddings, mask, cache_kwargs) -> torch.Tensor:
    """A rank's attention partial sum (its heads through o_proj's matching columns)."""
    return module(hidden_states=h, position_embeddings=position_embeddings, attention_mask=mask, **cache_kwargs)[0]
