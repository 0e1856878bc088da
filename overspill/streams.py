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


class CudaCopier:
    """Copies into ring slots on a side stream, `depth` layers ahead of compute.

    Per slot two events: `ready` (copy finished, recorded on the copy stream) and `done` (the
    layer using the slot finished, recorded on the compute stream). A copy into a slot waits for
    the slot's `done`; compute on a slot waits for its `ready`. No host synchronisation.
    """

    def __init__(self, device: torch.device, slots: int):
        self.device = device
        self.stream = torch.cuda.Stream(device=device, priority=-1)
        self.ready = [torch.cuda.Event() for _ in range(slots)]
        self.done = [torch.cuda.Event() for _ in range(slots)]
        self.done_recorded = [False] * slots

    def copy(self, dst: torch.Tensor, src: torch.Tensor, slot: int) -> None:
        self.copy_many([(dst, src)], slot)

    def copy_many(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], slot: int) -> None:
        """Copy every (dst, src) pair into `slot` once its last user is done; one ready event for all."""
        if self.done_recorded[slot]:
            self.stream.wait_event(self.done[slot])
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
        self.ready[slot].record(self.stream)

    def wait_ready(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def mark_done(self, slot: int) -> None:
        self.done[slot].record(torch.cuda.current_stream(self.device))
        self.done_recorded[slot] = True

    def synchronize(self) -> None:
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()
