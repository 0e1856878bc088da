"""The ring's copies under CUDA-graph capture, checked against CUDA's capture rules on a simulated device.

Fake streams and events record what `LayerRing` + `CudaCopier` ask of CUDA through an eager step,
a captured step and the eager steps after it, and raise where CUDA would: a capturing stream
waiting on an event from outside the capture, eager code waiting on an event recorded in a
capture (cudaErrorCapturedEvent), a host sync or a copy on an un-forked stream during capture,
a forked stream left unjoined, or compute reading a slot whose captured copy it never waited for.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from overspill.runtime.executor import LayerRing
from overspill.runtime.streams import CudaCopier


class Sim:
    def __init__(self) -> None:
        self.current: FakeStream | None = None
        self.capture: FakeStream | None = None  # the capturing stream, while capturing
        self.joined: set[FakeStream] = set()  # streams taking part in the capture
        self.last_op: dict[FakeStream, int] = {}
        self.joined_at: dict[FakeStream, int] = {}  # when the capture stream last waited on each stream
        self.ticks = 0

    def op(self, stream: FakeStream) -> int:
        if self.capture is not None and stream not in self.joined:
            raise AssertionError(f"{stream} works during capture without being forked: the graph would miss it")
        self.ticks += 1
        self.last_op[stream] = self.ticks
        return self.ticks


SIM = Sim()


class FakeEvent:
    def __init__(self, *args, **kwargs) -> None:
        self.stream: FakeStream | None = None
        self.captured = False
        self.tick = 0

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream or SIM.current
        self.tick = SIM.op(stream)
        self.stream, self.captured = stream, SIM.capture is not None


class FakeStream:
    count = 0

    def __init__(self, *args, **kwargs) -> None:
        FakeStream.count += 1
        self.name = f"stream{FakeStream.count}"
        self.waited: set[int] = set()  # ids of events this stream waited on

    def __repr__(self) -> str:
        return self.name

    def wait_event(self, event: FakeEvent) -> None:
        if SIM.capture is None:
            assert not event.captured, f"{self} waits on an event recorded in a capture (cudaErrorCapturedEvent)"
        else:
            assert event.captured, f"{self} waits, during capture, on an event from outside it"
            SIM.joined.add(self)
            if self is SIM.capture:
                SIM.joined_at[event.stream] = max(SIM.joined_at.get(event.stream, 0), event.tick)
        SIM.op(self)
        self.waited.add(id(event))

    def wait_stream(self, other: FakeStream) -> None:
        event = FakeEvent()
        event.record(other)
        self.wait_event(event)

    def synchronize(self) -> None:
        assert SIM.capture is None, "host sync during capture"


class FakeTensor:
    """A slot or a host buffer: copies record on the current stream and remember what they wait for."""

    def __init__(self, n: int, name: str = "") -> None:
        self.n, self.name = n, name

    def numel(self) -> int:
        return self.n

    def __getitem__(self, index) -> FakeTensor:
        return self

    def copy_(self, src, non_blocking: bool = False) -> None:
        SIM.op(SIM.current)


@contextlib.contextmanager
def _on(stream: FakeStream):
    previous, SIM.current = SIM.current, stream
    try:
        yield
    finally:
        SIM.current = previous


class _Layer:
    def __init__(self, i: int) -> None:
        self.host = FakeTensor(10, f"L{i}")


@pytest.fixture
def device(monkeypatch):
    global SIM
    SIM = Sim()
    SIM.current = FakeStream()
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SIM.current)
    monkeypatch.setattr(torch.cuda, "stream", _on)
    return SIM


def _step(ring: LayerRing, copier: CudaCopier, layers: int, log: list) -> None:
    """One forward pass over the streamed layers: wait for the slot, compute, mark it done."""
    for position in range(layers):
        slot = ring.enter(position)
        if SIM.capture is not None and slot in getattr(copier, "_cap_ready", {}):
            assert id(copier._cap_ready[slot]) in SIM.current.waited, f"layer {position} computes before its copy"
        log.append(SIM.op(SIM.current))
        ring.exit(slot)


@pytest.mark.parametrize(("layers", "slots"), [(5, 3), (6, 3), (1, 2), (4, 2)])
def test_captured_step_follows_cuda_capture_rules(device, layers: int, slots: int) -> None:
    copier = CudaCopier(torch.device("cuda"), slots)
    ring = LayerRing([FakeTensor(10) for _ in range(slots)], copier)
    ring.layers = [_Layer(i) for i in range(layers)]
    main, log = SIM.current, []
    _step(ring, copier, layers, log)  # eager: primes the ring (one restart)
    phase = ring.step_phase()
    assert phase is not None
    before = ring.snapshot()
    _step(ring, copier, layers, log)  # the eager warm-up of this phase
    after = ring.snapshot()

    capture = FakeStream()
    with _on(capture):
        ring.restore(before)
        SIM.capture, SIM.joined = capture, {capture}
        copier.begin_capture()
        _step(ring, copier, layers, log)
        copier.end_capture()
        for stream in SIM.joined - {capture}:  # every forked stream joins back after its last op
            assert SIM.joined_at.get(stream, 0) >= SIM.last_op[stream], f"{stream} is not joined"
        SIM.capture = None
    ring.restore(after)
    assert ring.restarts == 1

    for _ in range(3):  # replays, then eager steps again: no eager wait on a captured event
        copier.before_replay()
        copier.after_replay()
        ring.advance()
        _step(ring, copier, layers, log)
    assert ring.restarts == 1 and SIM.current is main and copier.captured_events


def test_kv_ring_copies_wait_for_the_attention_that_read_the_slot(device) -> None:
    """Host-tier KV through the same ring and `CudaCopier`: a slot is marked done as the next layer
    enters (its attention was enqueued by then), a copy into a slot waits for that done, and each
    attention waits for its slot's copy."""
    from overspill.runtime.kv import KVRing

    class Layer:
        def __init__(self, i: int) -> None:
            self.host_tokens, self.host_k, self.host_v = 16, FakeTensor(16, f"K{i}"), FakeTensor(16, f"V{i}")

    ring = KVRing(depth=1)
    for i in range(3):
        ring.add(Layer(i))
    ring.slots, ring.n_slots = [(FakeTensor(16), FakeTensor(16)) for _ in range(2)], 2
    ring.copier = copier = CudaCopier(torch.device("cuda"), 2)
    main = device.current
    attention: dict[int, int] = {}  # slot -> tick of the last attention that read it
    for _ in range(2):
        for position in range(3):
            slot = ring.enter_until_next(position)
            assert copier.ready[slot].tick > attention.get(slot, 0)  # this visit's copy, after the last read
            assert id(copier.ready[slot]) in main.waited
            attention[slot] = device.op(main)
    assert ring.restarts == 1 and {id(e) for e in copier.done} <= copier.stream.waited
    assert all(copier.done[s].tick > t for s, t in attention.items() if s != ring.pending_done)
