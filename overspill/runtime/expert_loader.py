"""Placing an expert-streamed MoE layer: its ring part and its routed experts in one pinned buffer.

The layer's tensors are packed with the routed experts last, so the ring copies the prefix (attention,
router, norms, shared expert) like any streamed layer while each expert is a contiguous slice
([experts, ...] per parameter) that `experts.ExpertCache` copies alone. Peak host memory is the
layer's bytes, as for a dense streamed layer. Where the plan sends experts as the checkpoint's codes
(`Plan.expert_codes`), the experts follow the ring part as one coded block per expert (`expert_codes`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..planning.plan import Plan
from .executor import LayerRing, StreamedLayer
from .expert_codes import ExpertCodes, expert_block_layout, fill_codes, placeholder_experts, staging_bytes
from .experts import ExpertCache, expert_params, expert_shapes, wrap_experts
from .layout import LayerLayout, host_bytes

__all__ = ["coded_expert_bytes", "expert_cache", "expert_params", "expert_ring_bytes", "stream_expert_layer"]


def _split(layer: nn.Module) -> tuple[LayerLayout, LayerLayout]:
    """(ring layout, whole layout with the experts after the ring part) of a MoE decoder layer."""
    routed = {f"{module}.{name}" for module, names, _ in expert_params(layer) for name in names}
    named = [(name, tuple(p.shape), p.dtype) for name, p in layer.named_parameters()]
    ring = [item for item in named if item[0] not in routed]
    return LayerLayout.of(ring), LayerLayout.of(ring + [item for item in named if item[0] in routed])


def expert_ring_bytes(layer: nn.Module) -> int:
    """Bytes a streamed layer sends through the ring under expert streaming (all of it when dense)."""
    return _split(layer)[0].nbytes


def coded_expert_bytes(layers: nn.ModuleList, source, layers_path: str) -> tuple[int, ...] | None:
    """Per decoder layer, the bytes one routed expert sends as `source`'s codes (its coded block; the compute
    dtype's bytes where a MoE layer keeps no codes, 0 for a dense layer), or None where no layer keeps codes."""
    sizes, coded = [], False
    for i, layer in enumerate(layers):
        ring, full = _split(layer)
        experts = list(full.entries[len(ring.entries):])
        encoded = expert_block_layout(source, f"{layers_path}.{i}.", experts) if experts else None
        coded = coded or encoded is not None
        sizes.append(encoded.nbytes if encoded is not None else
                     sum(e.nbytes for e in experts) // experts[0].shape[0] if experts else 0)
    return tuple(sizes) if coded else None


def expert_cache(plan: Plan, layers: nn.ModuleList, device: torch.device) -> ExpertCache | None:
    """The GPU expert cache a plan with `moe_streaming == "experts"` asks for (None otherwise), shaped by
    its first streamed MoE layer: every MoE layer of the supported models has the same experts."""
    if plan.moe_streaming != "experts" or not plan.streamed_layers:
        return None
    moe = [layers[i] for i in plan.streamed_layers if expert_params(layers[i])]
    if not moe:
        return None
    shapes = expert_shapes(moe[0])
    for layer in moe[1:]:
        if expert_shapes(layer) != shapes:
            raise NotImplementedError("expert streaming needs every streamed MoE layer's experts to have one shape")
    return ExpertCache(shapes, plan.expert_slots, device)


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def stream_expert_layer(layer: nn.Module, prefix: str, index: int, source, ring: LayerRing, pinned: bool,
                        cache: ExpertCache, codes: bool = False) -> tuple[StreamedLayer, int]:
    """Fill a MoE layer's pinned buffer (ring part first, experts after), bind the ring part to slot 0's
    views and the experts to their host slices, and wrap the experts (`experts.wrap_experts`). `codes`: the
    experts follow as coded blocks where `source` keeps their codes (`_stream_coded`)."""
    ring_layout, full = _split(layer)
    experts = list(full.entries[len(ring_layout.entries):])
    encoded = expert_block_layout(source, prefix, experts) if codes else None
    if encoded is not None:
        return _stream_coded(layer, prefix, index, source, ring, pinned, cache, encoded)
    host = host_bytes(full.nbytes, pinned)
    views = full.views(host)
    for entry, view in zip(full.entries, views):
        source.fill(prefix + entry.name, view)
    for entry, view in zip(ring_layout.entries, ring.views(ring_layout, 0)):
        _set_param(layer, entry.name, view)
    for entry, view in zip(full.entries[len(ring_layout.entries):], views[len(ring_layout.entries):]):
        _set_param(layer, entry.name, view)
    streamed = StreamedLayer(layer, index, host[: ring_layout.nbytes], ring_layout, ring)  # holds the ring params
    wrap_experts(layer, index, cache)
    return streamed, full.nbytes


def _stream_coded(layer: nn.Module, prefix: str, index: int, source, ring: LayerRing, pinned: bool,
                  cache: ExpertCache, encoded) -> tuple[StreamedLayer, int]:
    """`stream_expert_layer` with the experts as coded blocks: the ring part filled as always, then one block of
    `encoded.nbytes` per expert; the expert parameters become placeholders and the cache reserves the staging
    a miss expands through."""
    ring_layout, full = _split(layer)
    experts = list(full.entries[len(ring_layout.entries):])
    count = experts[0].shape[0]
    host = host_bytes(ring_layout.nbytes + count * encoded.nbytes, pinned)
    for entry, view in zip(ring_layout.entries, ring_layout.views(host)):
        source.fill(prefix + entry.name, view)
    rows = host[ring_layout.nbytes :].view(count, encoded.nbytes)
    fill_codes(source, prefix, experts, encoded, rows)
    for entry, view in zip(ring_layout.entries, ring.views(ring_layout, 0)):
        _set_param(layer, entry.name, view)
    placeholder_experts(layer, experts, _set_param)
    codes = ExpertCodes(rows, encoded)
    cache.reserve_codes(*staging_bytes(codes, [(e.shape[1:], e.dtype) for e in experts]))
    streamed = StreamedLayer(layer, index, host[: ring_layout.nbytes], ring_layout, ring)
    wrap_experts(layer, index, cache, codes)
    return streamed, host.numel()
