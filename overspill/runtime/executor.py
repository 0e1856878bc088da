"""Runs streamed decoder layers: a ring of GPU slots filled `depth` layers ahead of compute.

Each streamed layer keeps its weights in one flat pinned host buffer. Its module is wrapped in a
`StreamedLayer`; the HF model's own loop over `layers` calls the wrapper, which asks the `LayerRing`
for the layer's slot (issuing the copies of the layers `depth` ahead), points the inner module's
parameters at the slot's views, runs it, and marks the slot done. The schedule (cycling across
forward passes, restarts on out-of-order visits) is `ring.Ring`'s, shared with host-tier KV.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .layout import LayerLayout
from .ring import Ring
from .streams import Copier


class LayerRing(Ring):
    """Schedules copies of streamed layers into `slots` device buffers, cyclically (see `ring.Ring`)."""

    def __init__(self, slot_buffers: list[torch.Tensor], copier: Copier, in_place_slots: int = 0):
        """`in_place_slots` > 0 (with no buffers): layers compute where their weights are (managed
        memory the copier migrates); the slots only bound how many are on the GPU at once."""
        super().__init__(copier, in_place_slots or len(slot_buffers))
        self.slot_buffers = slot_buffers
        self.in_place = in_place_slots > 0
        self.expander = None  # a `formats.Expander` when streamed layers travel encoded
        self._views: dict[tuple, list[list[torch.Tensor]]] = {}

    def views(self, layout: LayerLayout, slot: int) -> list[torch.Tensor]:
        key = layout.signature
        if key not in self._views:
            self._views[key] = [layout.views(buf) for buf in self.slot_buffers]
        return self._views[key][slot]

    def fill(self, layer: "StreamedLayer", slot: int) -> None:
        """The layer's flat host buffer into the slot's buffer (in place: the copier migrates it). An
        encoded layer's bytes land in a staging buffer and expand into the slot (`formats`)."""
        if getattr(layer, "encoded", None) is None:  # members may be any object with `host` (tests' stand-ins)
            dst = None if self.in_place else self.slot_buffers[slot][: layer.host.numel()]
            self.copier.copy(dst, layer.host, slot)
            return
        index = self.expander.next_staging()
        staging = self.expander.staging[index][: layer.host.numel()]
        out = self.slot_buffers[slot][: layer.layout.nbytes]
        self.copier.copy_expand(staging, layer.host, slot, index,
                                lambda: layer.encoded.expand(staging, out, self.expander))


class StreamedLayer(nn.Module):
    """A decoder layer whose weights live in pinned host memory and visit a ring slot per use.

    Attribute reads fall through to the wrapped layer (e.g. `attention_type`, which HF models read
    from each layer), so model code sees the layer it expects.
    """

    def __init__(self, block: nn.Module, index: int, host: torch.Tensor, layout: LayerLayout, ring: LayerRing,
                 encoded: Any = None):
        """`encoded`: the `formats.LossyLayer` / `LosslessLayer` that `host` holds (None: `host` is the layer itself)."""
        super().__init__()
        self.block = block
        self.index = index
        self.host = host
        self.layout = layout
        self.encoded = encoded
        object.__setattr__(self, "ring", ring)
        self.position = ring.add(self)
        params = dict(block.named_parameters(remove_duplicate=False))
        self._params = [params[e.name] for e in layout.entries]

    def bind(self, slot: int) -> None:
        """Point the wrapped layer's parameters at the tensors in `slot` (in place: they stay on its own buffer)."""
        if self.ring.in_place:
            return
        for param, view in zip(self._params, self.ring.views(self.layout, slot)):
            param.data = view

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        slot = self.ring.enter(self.position)
        self.bind(slot)
        out = self.block(*args, **kwargs)
        self.ring.exit(slot)
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class HostEmbedding(nn.Module):
    """Input embedding kept in host memory: rows are looked up on the host, only activations move.

    The table is a plain attribute, not a parameter, so `model.device` (the first parameter's
    device) stays the GPU and `generate` puts its tensors there.
    """

    def __init__(self, weight: torch.Tensor, device: torch.device, padding_idx: int | None = None):
        super().__init__()
        self.weight = weight
        self.device = device
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids.to(self.weight.device), self.weight, self.padding_idx)
        return rows.to(self.device)
