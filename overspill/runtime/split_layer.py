"""One streamed decoder layer computed by two ranks (issue 16): the GPU's share visits a ring slot,
the CPU's share computes on the `cpu_rank.CpuRank` worker, and the two join after attention and
after the MLP (`tp_split` says which rows and columns each rank holds, and why that is the model's
own arithmetic). The device's side of a join waits for the worker on the device's stream, not on the
Python thread (`cpu_rank.Handoff`), so a decode pass queues every layer's job as it launches.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import OverspillError
from .host_call import HostCall
from .host_int8 import dequantize_into, int8_twin, linear_weights, quantize_share
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


def split_tensors(full: dict[str, torch.Tensor], dims: Dims, share: Share) -> tuple[dict, dict]:
    """(GPU share, CPU share) of a layer's tensors (layer-relative names)."""
    gpu, cpu = {}, {}
    for name, tensor in full.items():
        g, c = split_tensor(dims, share, name, tensor)
        gpu[name] = g
        if c is not None:
            cpu[name] = c
    return gpu, cpu


class SplitLayer(nn.Module):
    """A streamed decoder layer computed by two ranks: its GPU share visits a ring slot (as a
    `StreamedLayer` does), its CPU share computes on the host worker; two joins per layer.

    A pass wider than `max_tokens` tokens (a long prompt) is compute-bound, where the host is ~100x
    slower than the GPU: there the CPU share is copied to the device beside the slot's share and
    the GPU computes both (its heads' new KV still goes to the host layers), so prefill never waits
    for the host's GEMMs.

    `host_format` "int8": the host keeps the CPU share as int8 rows and scales only
    (`host_int8.quantize_share`, about half the bf16 bytes, no bf16 copy beside it); the worker
    multiplies them as they are and a wide pass expands them on the device.
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
        if host_format not in ("bf16", "int8"):
            raise OverspillError(f"host weights of the CPU rank are bf16 or int8, not {host_format!r}")
        full = dict(zip((e.name for e in streamed.layout.entries), streamed.layout.views(streamed.host)))
        pinned = streamed.host.is_pinned()
        gpu_t, cpu_t = split_tensors(full, dims, share)
        gpu = Packed.of(gpu_t, pinned)
        cpu = Packed.of(cpu_t, pinned and host_format == "bf16")  # int8: a transient the twins are built from
        self.host, self.layout = gpu.host, gpu.layout
        self.cpu_layout = cpu.layout  # the share as the model computes it (wide passes bind the twins to it)
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
        self.cpu_share = cpu  # what the host keeps of the CPU share
        worker = (self.cpu_attn, self.cpu_mlp)  # the modules the worker runs (wide passes: cpu_attn/cpu_mlp)
        if host_format == "int8":
            linear = linear_weights(block.self_attn, "self_attn") | linear_weights(block.mlp, "mlp")
            self.cpu_share = Packed.of(quantize_share(cpu_t, linear), pinned)
            packed = self.cpu_share.named_views()
            worker = (int8_twin(self.cpu_attn, "self_attn", packed), int8_twin(self.cpu_mlp, "mlp", packed))
        object.__setattr__(self, "worker_modules", worker)
        self.norms: Norms = norms_of(block)
        # the worker's own norms, on the host copy of the GPU share: it joins each layer on the host as well
        gpu_views = gpu.named_views()
        object.__setattr__(self, "host_norms", {n: rank_twin(getattr(block, n), n, gpu_views, None, None, cpu_dev)
                                                for n in (self.norms.attn_in, self.norms.attn_out, self.norms.mlp_in,
                                                          self.norms.mlp_out) if n})
        # the worker's norm and MLP share as one call that takes the GIL once (`host_call`)
        object.__setattr__(self, "mlp_call", HostCall(self.host_norms[self.norms.mlp_in], worker[1]))
        if share.mlp_cols:  # a decode pass of one sequence, traced now rather than in the first step
            self.mlp_call.warm((1, 1, dims.hidden), self.host_norms[self.norms.mlp_in].weight.dtype)
        self.kv = rank.host_kv()
        self._job: Future | None = None  # this layer's last job on the worker
        self._params = [self._target(e.name) for e in gpu.layout.entries]
        self._cpu_params = [self._cpu_target(e.name) for e in cpu.layout.entries]
        if host_format == "int8":  # the bf16 share is gone: the twins hold no memory until a wide pass binds them
            self._unbind_cpu_share()

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
        for param, view in zip(self._cpu_params, self.cpu_layout.views(buffer)):
            param.data = view

    def _unbind_cpu_share(self) -> None:
        """Point the CPU twins at zero-stride placeholders (int8 host weights: nothing to point at)."""
        for param, entry in zip(self._cpu_params, self.cpu_layout.entries):
            param.data = torch.zeros((), dtype=entry.dtype).expand(entry.shape)

    def _after_wide_pass(self) -> None:
        if self.host_format == "int8":
            self._unbind_cpu_share()
        else:
            self._bind_cpu_share(self.cpu_share.host)

    def _cpu_share_to_device(self, slot: int) -> None:
        """Copy the CPU share into the slot's free tail (a temporary where it does not fit), on the
        compute stream, and point the CPU twins at it for this pass; int8 host weights cross as int8
        (half the bytes) and are expanded there."""
        need, used = self.cpu_layout.nbytes, self.layout.nbytes
        buffer = self.ring.slot_buffers[slot]
        if buffer.numel() - used >= need:
            dev = buffer[used : used + need]
        else:
            dev = torch.empty(need, dtype=torch.uint8, device=self.device)
        if self.host_format == "int8":
            staged = torch.empty(self.cpu_share.layout.nbytes, dtype=torch.uint8, device=self.device)
            staged.copy_(self.cpu_share.host, non_blocking=True)
            out = dict(zip((e.name for e in self.cpu_layout.entries), self.cpu_layout.views(dev)))
            dequantize_into(self.cpu_share.named_views(staged), out)
        else:
            dev.copy_(self.cpu_share.host, non_blocking=True)
        self._bind_cpu_share(dev)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise OverspillError("the CPU rank expects decoder layers called with keyword arguments")
        if self._job is not None:  # the last pass's job owns the host KV and CPU twins until it ends
            self.rank.finish(self._job)
        slot = self.ring.enter(self.position)
        self.bind(slot)
        wide = hidden_states.shape[:-1].numel() > self.max_tokens
        if wide:
            self._cpu_share_to_device(slot)
        try:
            out = self._wide_layer(hidden_states, kwargs) if wide else self._split_step(hidden_states, kwargs)
        finally:
            if wide:
                self._after_wide_pass()
        self.ring.exit(slot)
        return out

    def _cpu_kv(self, kwargs: dict) -> dict:
        """The cache keyword the CPU's attention takes (its heads' host KV, in step with the model's cache)."""
        cache_name = next((k for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        cache = kwargs.get(cache_name) if cache_name else None
        if cache is not None and self.share.kv_heads:
            self.kv.follow(cache, self.index)
        return {cache_name: self.kv} if cache is not None else {}

    def _wide_layer(self, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """A pass wider than `max_tokens`: the device computes both shares (the CPU's copied beside its own), in
        the order the decode path adds them."""
        block = self.block
        h = getattr(block, self.norms.attn_in)(hidden_states)
        part = _attention(self.cpu_attn, h, kwargs["position_embeddings"], kwargs.get("attention_mask"),
                          self._cpu_kv(kwargs)) if self.share.kv_heads else None
        attn = self.gpu_attn(hidden_states=h, **kwargs)[0]
        if part is not None:
            attn = attn + part
        if self.norms.attn_out:
            attn = getattr(block, self.norms.attn_out)(attn)
        hidden_states = hidden_states + attn
        h = getattr(block, self.norms.mlp_in)(hidden_states)
        mlp = self.gpu_mlp(h)
        if self.share.mlp_cols:
            mlp = mlp + self.cpu_mlp(h)
        if self.norms.mlp_out:
            mlp = getattr(block, self.norms.mlp_out)(mlp)
        return hidden_states + mlp

    def _split_step(self, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """A decode pass's layer: the worker runs the CPU's whole share of it as one job (`_host_layer`), joining
        on the host too. Its input is its own copy of the last split layer's output where that is this layer's
        input (the same device tensor), else the input sent from the device. The device hands the worker its two
        partial sums as it computes them, so the worker never waits for this thread to launch the kernels of a
        join, and takes the worker's through `Handoff` tickets taken now, so on CUDA this thread never waits for
        the worker (the stream does); both sides add the same partial sums in the same order, so their residuals
        stay equal bit for bit (gemma2 normalizes the sums themselves, where the two sides' reductions may differ:
        it sends every layer's input). The CPU's shares read the host's own norms of that residual, whose rounding
        may differ from the device's in the last bit: within the split's tolerance, as before, when the device's
        norm crossed instead."""
        block, rank, norms = self.block, self.rank, self.norms
        cpu_kv = self._cpu_kv(kwargs)
        carried = rank.carry_for is hidden_states and not (norms.attn_out or norms.mlp_out)
        x, ready = (None, None) if carried else rank.send(hidden_states)
        pos, pos_events = self._send_shared(kwargs["position_embeddings"])
        mask, mask_events = self._send_shared(kwargs.get("attention_mask"))
        attn_box, mlp_box = Future(), Future()
        # where the worker's partial sums will land: the device's side of each join queues its wait at launch
        attn_part = rank.handoff.ticket(hidden_states) if self.share.kv_heads else None
        mlp_part = rank.handoff.ticket(hidden_states) if self.share.mlp_cols else None
        self._job = rank.submit(self._host_layer, x, pos, mask, cpu_kv, attn_box, mlp_box, attn_part, mlp_part,
                                (ready, *pos_events, *mask_events))
        try:
            attn = self.gpu_attn(hidden_states=getattr(block, norms.attn_in)(hidden_states), **kwargs)[0]
            hidden_states = hidden_states + self._device_join(attn, attn_box, attn_part, norms.attn_out)
            mlp = self.gpu_mlp(getattr(block, norms.mlp_in)(hidden_states))
            out = hidden_states + self._device_join(mlp, mlp_box, mlp_part, norms.mlp_out)
        except BaseException as exc:  # the worker waits on these: let it end the job instead of waiting forever
            for box in (attn_box, mlp_box):
                if not box.done():
                    box.set_exception(exc)
            rank.settle()  # every queued job ends; a worker's error is this one or caused it: none stays recorded
            raise
        rank.carry_for = out  # the job finishes the host's join later; the next job finds its result in rank.carry
        return out

    def _device_join(self, mine: torch.Tensor, box: Future, theirs: Any, norm: str | None) -> torch.Tensor:
        """The device's side of a join: hand its partial sum to the worker, add the worker's where the CPU holds a
        share of this half (`theirs`, its `Handoff` ticket: queued on the stream, no host wait on CUDA), then the
        norm of the sum where the layer has one."""
        box.set_result(self.rank.send(mine))
        if theirs is not None:
            mine = mine + self.rank.collect(theirs)
        return getattr(self.block, norm)(mine) if norm else mine

    def _host_join(self, mine: torch.Tensor | None, box: Future, theirs: Any, norm: str | None) -> torch.Tensor:
        """The worker's side of the same join: hand its partial sum over (into `theirs`, the ticket the device's
        side collects), add it to the device's as the device adds them (device's + worker's), then the host's
        norm of the sum."""
        if theirs is not None:
            self.rank.handoff.deliver(theirs, mine)
        total = self.rank.received(box)
        total = total + mine if mine is not None else total
        return self.host_norms[norm](total) if norm else total

    def _send_shared(self, item: Any) -> tuple[Any, list]:
        """A pass-wide input (rotary (cos, sin), the mask, or None) on the host, sent once a pass, and the
        events its copies complete at; anything else (a mask object) as it is."""
        if isinstance(item, tuple):
            sent = [self.rank.send_once(t) for t in item]
            return tuple(t for t, _ in sent), [e for _, e in sent]
        if item is not None and not isinstance(item, torch.Tensor):
            return item, []
        tensor, event = self.rank.send_once(item)
        return tensor, [event]

    def _host_layer(self, x: torch.Tensor | None, pos, mask, cpu_kv: dict, attn_box: Future, mlp_box: Future,
                    attn_part: Any, mlp_part: Any) -> None:
        """On the worker: the CPU's share of the layer and the layer's joins on the host (`_split_step`); hands
        its partial sums over through the tickets `attn_part` and `mlp_part` (None: no share of that half) as soon
        as each is done. The carry is cleared first, so a job that fails leaves none for the next layer to take;
        the joins it never handed over are released with its error (`CpuRank._guarded`)."""
        rank, norms, host = self.rank, self.norms, self.host_norms
        attn_cpu = self.worker_modules[0]
        carry, rank.carry = rank.carry, None
        if x is None:
            x = carry
            if x is None:
                raise OverspillError("the CPU rank lost the previous layer's output (its host join failed)")
        part = _attention(attn_cpu, host[norms.attn_in](x), pos, mask, cpu_kv) if self.share.kv_heads else None
        hidden = x + self._host_join(part, attn_box, attn_part, norms.attn_out)
        part = self.mlp_call(hidden, rank.traced) if self.share.mlp_cols else None
        rank.carry = hidden + self._host_join(part, mlp_box, mlp_part, norms.mlp_out)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def _attention(module: nn.Module, h, position_embeddings, mask, cache_kwargs) -> torch.Tensor:
    """A rank's attention partial sum (its heads through o_proj's matching columns)."""
    return module(hidden_states=h, position_embeddings=position_embeddings, attention_mask=mask, **cache_kwargs)[0]
