"""The one module that owns copy streams and events.

`CudaCopier` issues host->GPU copies on a high-priority side stream and orders them against the
compute stream with CUDA events. `HostCopier` has the same interface with plain synchronous copies,
so the CPU path runs the very same ring logic (and CI tests it).
"""

from __future__ import annotations

import torch


class HostCopier:
    """Synchronous stand-in for `CudaCopier`: copies happen at once, events are no-ops."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, slot: int) -> None:
        dst.copy_(src)

    def copy_many(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], slot: int) -> None:
        for dst, src in pairs:
            dst.copy_(src)

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


class CudaCopier:
    """Copies into ring slots on a side stream, `depth` layers ahead of compute.

    Per slot two events: `ready` (copy finished, recorded on the copy stream) and `done` (the
    layer using the slot finished, recorded on the compute stream). A copy into a slot waits for
    the slot's `done`; compute on a slot waits for its `ready`. No host synchronisation.

    Under CUDA-graph capture (`begin_capture` .. `end_capture`) the copy stream forks from the
    capturing stream and joins it at the end, and only events recorded in this capture are waited
    on: work before the graph is ordered by `before_replay` (the graph waits for earlier copies)
    and by stream order (a graph starts after everything before it on the compute stream).
    """

    def __init__(self, device: torch.device, slots: int):
        self.device = device
        self.stream = torch.cuda.Stream(device=device, priority=-1)
        self.ready = [torch.cuda.Event() for _ in range(slots)]
        self.done = [torch.cuda.Event() for _ in range(slots)]
        self.done_recorded = [False] * slots
        self.capturing = False
        self._ready_in: set[int] = set()  # slots whose `ready` was recorded in this capture
        self._done_in: set[int] = set()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, slot: int) -> None:
        self.copy_many([(dst, src)], slot)

    def copy_many(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], slot: int) -> None:
        """Copy every (dst, src) pair into `slot` once its last user is done; one ready event for all."""
        if self.done_recorded[slot] and (not self.capturing or slot in self._done_in):
            self.stream.wait_event(self.done[slot])
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
        self.ready[slot].record(self.stream)
        if self.capturing:
            self._ready_in.add(slot)

    def wait_ready(self, slot: int) -> None:
        if not self.capturing or slot in self._ready_in:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def mark_done(self, slot: int) -> None:
        self.done[slot].record(torch.cuda.current_stream(self.device))
        self.done_recorded[slot] = True
        if self.capturing:
            self._done_in.add(slot)

    def synchronize(self) -> None:
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()

    def begin_capture(self) -> None:
        """Fork the copy stream from the capturing (current) stream."""
        fork = torch.cuda.Event()
        fork.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(fork)
        self.capturing = True
        self._ready_in.clear()
        self._done_in.clear()

    def end_capture(self) -> None:
        """Join the copy stream back: the graph ends after its prefetches for the next step too."""
        join = torch.cuda.Event()
        join.record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(join)
        self.capturing = False

    def before_replay(self) -> None:
        """A graph reads slots filled by copies issued before it: wait for them."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def after_replay(self) -> None:
        """Later copies may overwrite slots the graph reads: order them after it."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
