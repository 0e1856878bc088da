"""The one module that owns copy streams and events.

`CudaCopier` issues host->GPU copies on a high-priority side stream and orders them against the
compute stream with CUDA events. `HostCopier` has the same interface with plain synchronous copies,
so the CPU path runs the very same ring logic (and CI tests it). `ManagedCopier` and `MappedCopier`
move managed-memory layers, or nothing, behind the same interface (`Copier`, what `ring.Ring` uses).
"""

from __future__ import annotations

from typing import Protocol

import torch


def new_stream(device: torch.device, priority: int = 0) -> torch.cuda.Stream:
    """A CUDA stream on `device`; every stream the library makes comes from here (priority -1: copies
    that compute waits on go first)."""
    return torch.cuda.Stream(device=device, priority=priority)


class Copier(Protocol):
    """What a `ring.Ring` asks of a copier: copies into slots, and their order against compute."""

    def copy(self, dst: torch.Tensor | None, src: torch.Tensor, slot: int) -> None:
        """Issue the copy of `src` into `dst` (None: `src` computes in place) for `slot`'s next user."""

    def wait_ready(self, slot: int) -> None:
        """Order compute after the last copy into `slot`."""

    def mark_done(self, slot: int) -> None:
        """The compute reading `slot` is enqueued: later copies into it wait for that compute."""

    def synchronize(self) -> None:
        """Wait for every copy and every compute issued so far."""


class HostCopier:
    """Synchronous stand-in for `CudaCopier`: copies happen at once, events are no-ops."""

    capturing = False
    captured_events: tuple = ()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, slot: int) -> None:
        dst.copy_(src)

    def copy_many(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], slot: int) -> None:
        for dst, src in pairs:
            dst.copy_(src)

    def copy_expand(self, dst: torch.Tensor, src: torch.Tensor, slot: int, staging: int, expand) -> None:
        dst.copy_(src)
        expand()

    def wait_ready(self, slot: int) -> None:
        pass

    def mark_done(self, slot: int) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def begin_capture(self) -> None:
        pass

    def end_capture(self) -> None:
        pass

    def before_replay(self) -> None:
        pass

    def after_replay(self) -> None:
        pass


class MappedCopier(HostCopier):
    """For managed layers the GPU reads in place over the link (advised to the host, mapped for the
    GPU): nothing moves, so there is nothing to order. On the lent H100 such reads ran at 49 GB/s,
    90% of pinned copies, where prefetching and evicting the same layers ran at 18 GB/s."""

    def copy(self, dst: torch.Tensor | None, src: torch.Tensor, slot: int) -> None:
        pass


class CudaCopier:
    """Copies into ring slots on a side stream, `depth` layers ahead of compute.

    Per slot two events: `ready` (copy finished, recorded on the copy stream) and `done` (the
    layer using the slot finished, recorded on the compute stream). A copy into a slot waits for
    the slot's `done`; compute on a slot waits for its `ready`. No host synchronisation.

    Under CUDA-graph capture (`begin_capture` .. `end_capture`) the copy stream forks from the
    capturing stream and joins it at the end, and ordering inside the graph uses fresh events: an
    event last recorded in a capture can never be waited on again (cudaErrorCapturedEvent), so the
    eager `ready`/`done` events are left as they were. Waits on work from before the graph are
    dropped: `before_replay` makes the graph wait for earlier copies, and a graph starts after
    everything before it on the compute stream.
    """

    def __init__(self, device: torch.device, slots: int):
        self.device = device
        self.stream = new_stream(device, priority=-1)
        self.expand_stream: torch.cuda.Stream | None = None  # the ring's `formats.Expander.stream`, else made on first use
        self.copied = [torch.cuda.Event() for _ in range(slots)]
        self.staging_free: dict[int, torch.cuda.Event] = {}  # per staging buffer, its last expansion
        self.ready = [torch.cuda.Event() for _ in range(slots)]
        self.done = [torch.cuda.Event() for _ in range(slots)]
        self.done_recorded = [False] * slots
        self.capturing = False
        self._cap_ready: dict[int, torch.cuda.Event] = {}  # per slot, the last copy captured into it
        self._cap_done: dict[int, torch.cuda.Event] = {}
        self.captured_events: list[torch.cuda.Event] = []  # kept alive with the graph

    def copy(self, dst: torch.Tensor, src: torch.Tensor, slot: int) -> None:
        self.copy_many([(dst, src)], slot)

    def copy_many(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], slot: int) -> None:
        """Copy every (dst, src) pair into `slot` once its last user is done; one ready event for all."""
        if self.capturing:
            if slot in self._cap_done:
                self.stream.wait_event(self._cap_done[slot])
        elif self.done_recorded[slot]:
            self.stream.wait_event(self.done[slot])
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
        if self.capturing:
            self._cap_ready[slot] = self._captured_event(self.stream)
        else:
            self.ready[slot].record(self.stream)

    def copy_expand(self, dst: torch.Tensor, src: torch.Tensor, slot: int, staging: int, expand) -> None:
        """Copy encoded bytes into staging buffer `staging` (`dst`) on the copy stream once its previous
        expansion is done, then run `expand` (kernels writing `slot`'s layer) on the expand stream once
        they land and the slot's last user is done; the slot is ready when expansion ends. With two
        staging buffers the next layer's copy overlaps this expansion."""
        if self.capturing:
            raise RuntimeError("encoded stream formats are not captured in CUDA graphs")
        if staging in self.staging_free:
            self.stream.wait_event(self.staging_free[staging])
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        self.copied[slot].record(self.stream)
        if self.expand_stream is None:
            self.expand_stream = new_stream(self.device, priority=-1)
        self.expand_stream.wait_event(self.copied[slot])
        if self.done_recorded[slot]:
            self.expand_stream.wait_event(self.done[slot])
        with torch.cuda.stream(self.expand_stream):
            expand()
        self.ready[slot].record(self.expand_stream)
        self.staging_free.setdefault(staging, torch.cuda.Event()).record(self.expand_stream)

    def wait_ready(self, slot: int) -> None:
        current = torch.cuda.current_stream(self.device)
        if not self.capturing:
            current.wait_event(self.ready[slot])
        elif slot in self._cap_ready:
            current.wait_event(self._cap_ready[slot])

    def mark_done(self, slot: int) -> None:
        current = torch.cuda.current_stream(self.device)
        if self.capturing:
            self._cap_done[slot] = self._captured_event(current)
        else:
            self.done[slot].record(current)
            self.done_recorded[slot] = True

    def _captured_event(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(stream)
        self.captured_events.append(event)
        return event

    def synchronize(self) -> None:
        self.stream.synchronize()
        if self.expand_stream is not None:
            self.expand_stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()

    def begin_capture(self) -> None:
        """Fork the copy stream from the capturing (current) stream."""
        self.captured_events = []
        self._cap_ready.clear()
        self._cap_done.clear()
        self.stream.wait_event(self._captured_event(torch.cuda.current_stream(self.device)))
        self.capturing = True

    def end_capture(self) -> None:
        """Join the copy stream back: the graph ends after its prefetches for the next step too."""
        self.capturing = False
        torch.cuda.current_stream(self.device).wait_event(self._captured_event(self.stream))

    def before_replay(self) -> None:
        """A graph reads slots filled by copies issued before it: wait for them."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def after_replay(self) -> None:
        """Later copies may overwrite slots the graph reads: order them after it."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))


class ManagedCopier:
    """Moves managed-memory layers instead of copying them: the `CudaCopier` interface for a ring
    whose layers compute in place (`LayerRing(..., in_place=True)`).

    "Copying" into a slot prefetches the layer's managed buffer to the GPU on the side stream, once
    the slot's previous layer has been evicted; marking a slot done evicts its layer back to host
    memory on a second stream. So at most `slots` layers' pages sit on the GPU, as with pinned slots.
    """

    def __init__(self, device: torch.device, slots: int, memory):
        self.device, self.memory = device, memory
        self.stream = new_stream(device, priority=-1)
        self.evict_stream = new_stream(device)
        self.ready = [torch.cuda.Event() for _ in range(slots)]
        self.done = [torch.cuda.Event() for _ in range(slots)]
        self.evicted = [torch.cuda.Event() for _ in range(slots)]
        self.evict_recorded = [False] * slots
        self.occupant: list[torch.Tensor | None] = [None] * slots
        self.computed = [True] * slots  # the occupant was marked done (and so evicted)

    def copy(self, dst: torch.Tensor | None, src: torch.Tensor, slot: int) -> None:
        if not self.computed[slot] and self.occupant[slot] is not None:  # fetched, never used (a ring restart)
            self._evict(slot, after=self.ready[slot])
        if self.evict_recorded[slot]:
            self.stream.wait_event(self.evicted[slot])
        self.memory.prefetch(src, host=False, stream=self.stream)
        self.ready[slot].record(self.stream)
        self.occupant[slot], self.computed[slot] = src, False

    def wait_ready(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def mark_done(self, slot: int) -> None:
        self.done[slot].record(torch.cuda.current_stream(self.device))
        if self.occupant[slot] is not None:
            self._evict(slot, after=self.done[slot])
        self.computed[slot] = True

    def _evict(self, slot: int, after: torch.cuda.Event) -> None:
        """Send the slot's layer home once `after` (its compute, or its fetch) has happened."""
        self.evict_stream.wait_event(after)
        self.memory.prefetch(self.occupant[slot], host=True, stream=self.evict_stream)
        self.evicted[slot].record(self.evict_stream)
        self.evict_recorded[slot] = True

    def synchronize(self) -> None:
        self.stream.synchronize()
        self.evict_stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()
