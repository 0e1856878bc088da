"""Runs streamed decoder layers: a ring of GPU slots filled `depth` layers ahead of compute.

Each streamed layer keeps its weights in one flat pinned host buffer. Its module is wrapped in a
`StreamedLayer`; the HF model's own loop over `layers` calls the wrapper, which asks the `LayerRing`
for the layer's slot (issuing the copies of the layers `depth` ahead), points the inner module's
parameters at the slot's views, runs it, and marks the slot done.

The ring cycles over the streamed layers *across* forward passes: while the last streamed layers
of one step compute, the first ones of the next step are already being copied. If a forward pass
visits layers out of the expected order (an exception mid-pass, a partial pass) the ring
synchronises and restarts from the layer asked for, so order errors cost time, never correctness.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .layout import LayerLayout
from .streams import CudaCopier, HostCopier, ManagedCopier


class LayerRing:
    """Schedules copies of streamed layers into `slots` device buffers, cyclically."""

    def __init__(self, slot_buffers: list[torch.Tensor], copier: CudaCopier | HostCopier | ManagedCopier,
                 in_place_slots: int = 0):
        """`in_place_slots` > 0 (with no buffers): layers compute where their weights are (managed
        memory the copier migrates); the slots only bound how many are on the GPU at once."""
        self.slot_buffers = slot_buffers
        self.in_place = in_place_slots > 0
        self._n_slots = in_place_slots or len(slot_buffers)
        self.copier = copier
        self.layers: list[StreamedLayer] = []
        self._views: dict[tuple, list[list[torch.Tensor]]] = {}
        self.visit: int | None = None  # absolute visit number of the layer computing next
        self.issued = 0  # next visit whose copy is not yet issued
        self.restarts = 0

    @property
    def n_slots(self) -> int:
        return self._n_slots

    def add(self, layer: "StreamedLayer") -> int:
        self.layers.append(layer)
        return len(self.layers) - 1

    def views(self, layout: LayerLayout, slot: int) -> list[torch.Tensor]:
        key = layout.signature
        if key not in self._views:
            self._views[key] = [layout.views(buf) for buf in self.slot_buffers]
        return self._views[key][slot]

    def _issue(self, visit: int) -> None:
        layer = self.layers[visit % len(self.layers)]
        slot = visit % self.n_slots
        dst = None if self.in_place else self.slot_buffers[slot][: layer.host.numel()]
        self.copier.copy(dst, layer.host, slot)

    def enter(self, position: int) -> int:
        """Called as streamed layer `position` starts: returns its slot, ready for compute."""
        count = len(self.layers)
        if self.visit is None or self.visit % count != position:
            self.copier.synchronize()
            self.restarts += 1
            self.visit = position
            self.issued = position
        self._issue_ahead()
        slot = self.visit % self.n_slots
        self.copier.wait_ready(slot)
        return slot

    def exit(self, slot: int) -> None:
        """Free `slot` and at once issue the copy of its next user, so that copy overlaps every
        layer computed before that user: with one streamed layer per step, all the resident ones."""
        self.copier.mark_done(slot)
        self.visit += 1
        self._issue_ahead()

    def _issue_ahead(self) -> None:
        ahead = self.visit + self.n_slots - 1  # a slot frees only when its last user is done
        while self.issued <= ahead:
            self._issue(self.issued)
            self.issued += 1

    def reset(self) -> None:
        self.copier.synchronize()
        self.visit = None

    def snapshot(self) -> tuple[int | None, int]:
        """The schedule's position, to capture a step as a graph and put it back."""
        return self.visit, self.issued

    def restore(self, state: tuple[int | None, int]) -> None:
        self.visit, self.issued = state

    def step_phase(self) -> int | None:
        """Which slot the next step's first streamed layer uses, if a whole step starts here in the
        steady state (the previous step issued this one's first `slots` copies); else None.

        Steps of the same phase issue the same copies into the same slots, so one graph per phase
        replays any of them: there are slots / gcd(layers, slots) phases."""
        count = len(self.layers)
        if self.visit is None or self.visit % count or self.issued != self.visit + self.n_slots:
            return None
        return self.visit % self.n_slots

    def advance(self) -> None:
        """Account for a step replayed as a graph: the schedule moves as an eager step's would."""
        count = len(self.layers)
        self.visit += count  # type: ignore[operator]
        self.issued += count


class StreamedLayer(nn.Module):
    """A decoder layer whose weights live in pinned host memory and visit a ring slot per use.

    Attribute reads fall through to the wrapped layer (e.g. `attention_type`, which HF models read
    from each layer), so model code sees the layer it expects.
    """

    def __init__(self, block: nn.Module, index: int, host: torch.Tensor, layout: LayerLayout, ring: LayerRing):
        super().__init__()
        self.block = block
        self.index = index
        self.host = host
        self.layout = layout
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
