"""Routed experts that cross the link as their checkpoint's codes and expand in the expert cache's slot.

A converted GGUF keeps its fused experts' codes (`gguf_blocks`: `mlp.experts.gate_up_proj` and `down_proj` as
[experts, rows, ..] codes, float32 scales and shifts). Under expert streaming such a layer's host buffer holds
its ring part as usual (dequantized into the compute dtype), then one block per expert: for each expert
parameter in order, that expert's parts (`QuantizedReader.expert_parts`: codes and float32 stores, as a
streamed matrix of the same type carries them) or, where the checkpoint kept no codes (gate and up of two
types), its compute-dtype bytes. The block is laid out by `formats.LossyLayer` over one expert's shapes, so
each expert is one contiguous slice that `experts.ExpertCache` copies in one piece into a staging buffer on
the device and expands there into the slot's tensors with `quant.expand`: the same expansion, and the same
bits, as a streamed layer's parts (the reference dequantization, one rounding into the compute dtype).
The cache slots keep the compute dtype, so a hit costs nothing more and transformers' experts forward is
unchanged; only a miss sends fewer bytes and then expands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..planning.formats import INT4_CHUNK_CODES, int4_scratch_bytes
from . import quant
from .formats import LossyLayer
from .layout import LayerLayout, TensorEntry
from .prequantized import QuantizedReader


@dataclass(frozen=True)
class ExpertCodes:
    """One layer's routed experts as blocks of their parts: `rows` [experts, stride] (uint8, pinned on CUDA),
    laid out per expert by `encoded` (offsets within a block, one entry per expert parameter)."""

    rows: torch.Tensor
    encoded: LossyLayer

    @property
    def stride(self) -> int:
        """Bytes of one expert's block: what a miss sends over the link."""
        return self.rows.shape[1]

    @property
    def num_experts(self) -> int:
        return self.rows.shape[0]

    def expand(self, block: torch.Tensor, outs: list[torch.Tensor], scratch: torch.Tensor | None) -> None:
        """Write the expert whose block is `block` (flat uint8, on the slots' device) into `outs` (one slot's
        tensor per expert parameter, in the compute dtype), on the current stream."""
        for t, out in zip(self.encoded.tensors, outs):
            parts = [p.view(block) for p in t.parts]
            if t.kind == "raw":
                out.copy_(parts[0])
            else:
                quant.expand(t.kind, parts, out, scratch)


def expert_block_layout(source, prefix: str, entries: list[TensorEntry]) -> LossyLayer | None:
    """One expert's block layout for the expert parameters `entries` (whole [experts, ...] shapes) of the layer
    at `prefix`, or None where `source` keeps no codes for any of them (they then cross in the compute dtype)."""
    if not isinstance(source, QuantizedReader):
        return None
    one = LayerLayout.of([(e.name, e.shape[1:], e.dtype) for e in entries])
    coded = {e.name: source.expert_parts(prefix + e.name) for e in one.entries}
    if not any(coded.values()):
        return None

    def parts(_: str, entry: TensorEntry):
        return coded[entry.name] or ("raw", [(entry.shape, entry.dtype)])

    return LossyLayer.of("codes", one, parts)


def fill_codes(source: QuantizedReader, prefix: str, entries: list[TensorEntry], encoded: LossyLayer,
               rows: torch.Tensor) -> None:
    """Write every expert's block into `rows` [experts, stride]: coded parameters from their stored parts, an
    expert at a time; the others read whole (compute dtype) once, then sliced per expert."""
    for entry, t in zip(entries, encoded.tensors):
        whole = None
        if t.kind == "raw":
            whole = torch.empty(entry.shape, dtype=entry.dtype)
            source.fill(prefix + entry.name, whole)
        for e in range(entry.shape[0]):
            parts = [p.view(rows[e]) for p in t.parts]
            if whole is not None:
                parts[0].copy_(whole[e])
            else:
                source.fill_expert_parts(prefix + entry.name, e, parts)


def staging_bytes(codes: ExpertCodes, shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> tuple[int, int]:
    """(staging, scratch) bytes a miss of `codes` needs on the device: its block, and the int4 expansion's
    scratch for one expert's weights (`planning.moe.with_codes` plans the same)."""
    params = sum(torch.Size(shape).numel() for shape, _ in shapes)
    return codes.stride, int4_scratch_bytes(min(params, INT4_CHUNK_CODES))


def placeholder_experts(layer: nn.Module, entries: list[TensorEntry], set_param) -> None:
    """Bind a coded layer's expert parameters to placeholders of their shapes (one host element, expanded):
    no host copy in the compute dtype exists (the blocks are the host copy), what reads their shapes still can,
    and `RoutedExperts` can point them at the cache's tensors and back (a meta tensor's data cannot be set)."""
    for entry in entries:
        set_param(layer, entry.name, torch.zeros((), dtype=entry.dtype).expand(entry.shape))
