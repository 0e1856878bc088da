"""The one ring scheduler: members visit a few device slots cyclically, their copies issued ahead.

Streamed weights (`executor.LayerRing`) and host-tier KV (`kv.KVRing`) move the same way: layer i
of the ring computes in slot i % slots while the copies of the next `slots - 1` layers are already
in flight on the copier's side stream. The schedule runs *across* forward passes: as the last
layers of one step compute, the first ones of the next step are being copied.

This module owns that schedule and nothing else: the visit cursor, how far ahead copies are
issued, when a slot is marked done, and the restart when layers are visited out of the expected
order (an exception mid-pass, a partial pass), which synchronises and starts over from the layer
asked for, so order errors cost time, never correctness. What moves is the subclass's business
(`fill`); how copies are ordered against compute is the copier's (`streams.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from .streams import Copier

RingState = tuple[int | None, int, int | None]


class Ring(ABC):
    """Schedules copies of `layers` into `n_slots` device slots through `copier`, cyclically.

    Visit v (an absolute count over passes) uses member v % len(layers) and slot v % n_slots. A slot
    frees only when its user is marked done, so copies run at most `n_slots - 1` visits ahead.

    Args:
        copier: issues the copies and orders them against compute (a `streams.Copier`); may be set
            later, with `n_slots`, by a ring whose slots are allocated on first use.
        n_slots: device slots.
    """

    def __init__(self, copier: Copier | None, n_slots: int):
        self.copier = copier
        self.n_slots = n_slots
        self.layers: list[Any] = []
        self.visit: int | None = None  # absolute visit number of the layer computing next
        self.issued = 0  # next visit whose copy is not yet issued
        self.restarts = 0
        self.pending_done: int | None = None  # slot to mark done when the next layer enters

    def add(self, layer: Any) -> int:
        """Append a member; returns its position in the cycle."""
        self.layers.append(layer)
        return len(self.layers) - 1

    @abstractmethod
    def fill(self, layer: Any, slot: int) -> None:
        """Issue, on the copier, the copy of `layer`'s bytes into `slot` (what moves is the kind's business)."""

    def enter(self, position: int) -> int:
        """Layer `position` is about to compute: returns its slot, its copy ordered before the compute."""
        if self.pending_done is not None:
            self._release(self.pending_done)
            self.pending_done = None
        if self.visit is None or self.visit % len(self.layers) != position:
            self.copier.synchronize()
            self.restarts += 1
            self.visit = position
            self.issued = position
        self._issue_ahead()
        slot = self.visit % self.n_slots
        self.copier.wait_ready(slot)
        return slot

    def exit(self, slot: int) -> None:
        """The layer in `slot` has enqueued its compute: free the slot and at once issue the copy of its
        next user, so that copy overlaps every layer computed before that user (with one streamed
        layer per step, all the resident ones)."""
        self._release(slot)
        self._issue_ahead()

    def enter_until_next(self, position: int) -> int:
        """`enter` for a layer that cannot say when its compute is enqueued (KV: attention runs after
        the cache update returns): its slot is marked done as the next ring layer enters, by when
        the compute reading it has been enqueued. Such a ring is not captured as a graph (the last
        slot's done would fall in the next step)."""
        slot = self.enter(position)
        self.pending_done = slot
        return slot

    def _release(self, slot: int) -> None:
        self.copier.mark_done(slot)
        self.visit += 1

    def _issue_ahead(self) -> None:
        ahead = self.visit + self.n_slots - 1  # a slot frees only when its last user is done
        while self.issued <= ahead:
            self.fill(self.layers[self.issued % len(self.layers)], self.issued % self.n_slots)
            self.issued += 1

    def reset(self) -> None:
        """Forget the position (the next layer to enter restarts the ring) once every copy is done."""
        if self.pending_done is not None:
            self.copier.mark_done(self.pending_done)
            self.pending_done = None
        if self.copier is not None:
            self.copier.synchronize()
        self.visit = None

    def snapshot(self) -> RingState:
        """The schedule's position, to capture a step as a graph and put it back."""
        return self.visit, self.issued, self.pending_done

    def restore(self, state: RingState) -> None:
        self.visit, self.issued, self.pending_done = state

    def step_phase(self) -> int | None:
        """Which slot the next step's first layer uses, if a whole step starts here in the steady
        state (the previous step issued this one's first `n_slots` copies); else None.

        Steps of the same phase issue the same copies into the same slots, so one graph per phase
        replays any of them: there are n_slots / gcd(layers, n_slots) phases."""
        count = len(self.layers)
        if self.visit is None or self.visit % count or self.issued != self.visit + self.n_slots:
            return None
        return self.visit % self.n_slots

    def advance(self) -> None:
        """Account for a step replayed as a graph: the schedule moves as an eager step's would."""
        count = len(self.layers)
        self.visit += count  # type: ignore[operator]
        self.issued += count
