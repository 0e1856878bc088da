"""The one ring scheduler (`ring.Ring`) that streamed weights (`LayerRing`) and host-tier KV (`KVRing`) share."""

from __future__ import annotations

import pytest
import torch

from overspill.runtime.executor import LayerRing
from overspill.runtime.kv import KVRing
from overspill.runtime.ring import Ring


class Recorder:
    """A copier that logs what the ring asks of it."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def copy(self, dst, src, slot: int) -> None:
        self.log.append(("copy", src, slot))

    def copy_many(self, pairs, slot: int) -> None:
        self.log.append(("copy", tuple(int(src.numel()) for _, src in pairs), slot))

    def wait_ready(self, slot: int) -> None:
        self.log.append(("wait", slot))

    def mark_done(self, slot: int) -> None:
        self.log.append(("done", slot))

    def synchronize(self) -> None:
        self.log.append(("sync",))


class NamedRing(Ring):
    """A ring whose members are names: `fill` says which member goes to which slot."""

    def fill(self, layer: str, slot: int) -> None:
        self.copier.copy(None, layer, slot)


def _ring(layers: int, slots: int) -> tuple[NamedRing, Recorder]:
    copier = Recorder()
    ring = NamedRing(copier, slots)
    for i in range(layers):
        ring.add(f"L{i}")
    return ring, copier


def test_the_schedule_of_three_layers_through_two_slots() -> None:
    ring, copier = _ring(3, 2)
    for _ in range(2):  # two forward passes
        for position in range(3):
            ring.exit(ring.enter(position))
    assert copier.log == [
        ("sync",), ("copy", "L0", 0), ("copy", "L1", 1), ("wait", 0),  # first visit: a restart primes the ring
        ("done", 0), ("copy", "L2", 0), ("wait", 1),  # a freed slot gets its next user's copy at once
        ("done", 1), ("copy", "L0", 1), ("wait", 0),  # ... across passes: L0 of the next step
        ("done", 0), ("copy", "L1", 0), ("wait", 1),
        ("done", 1), ("copy", "L2", 1), ("wait", 0),
        ("done", 0), ("copy", "L0", 0), ("wait", 1),
        ("done", 1), ("copy", "L1", 1),
    ]
    assert ring.restarts == 1 and ring.step_phase() == 0


@pytest.mark.parametrize(("layers", "slots"), [(1, 1), (3, 2), (5, 3), (2, 3)])
def test_marking_done_at_the_next_enter_issues_the_same_copies(layers: int, slots: int) -> None:
    """KV marks a slot done when the next layer enters (attention runs after the update returns);
    weights mark it at exit. Both give one schedule: the same calls, save the last layer's exit."""
    slots = min(slots, layers)
    eager, eager_log = _ring(layers, slots)
    deferred, deferred_log = _ring(layers, slots)
    for _ in range(3):
        for position in range(layers):
            eager.exit(eager.enter(position))
            deferred.enter_until_next(position)
    tail = eager_log.log[len(deferred_log.log):]
    assert eager_log.log[: len(deferred_log.log)] == deferred_log.log
    assert tail[0][0] == "done" and all(kind == "copy" for kind, *_ in tail[1:])
    assert eager.restarts == deferred.restarts == 1


def test_an_out_of_order_visit_synchronizes_and_restarts_there() -> None:
    ring, copier = _ring(3, 2)
    ring.exit(ring.enter(0))
    copier.log.clear()
    slot = ring.enter(2)  # layer 1 was expected
    assert ring.restarts == 2 and slot == 0  # visit 2 of the restarted cycle uses slot 2 % 2
    assert copier.log == [("sync",), ("copy", "L2", 0), ("copy", "L0", 1), ("wait", 0)]


def test_reset_marks_a_pending_slot_done_before_it_synchronizes() -> None:
    ring, copier = _ring(2, 2)
    ring.enter_until_next(0)
    ring.reset()
    assert copier.log[-2:] == [("done", 0), ("sync",)] and ring.visit is None and ring.pending_done is None


def test_snapshot_restores_the_whole_position() -> None:
    ring, _ = _ring(3, 2)
    ring.enter_until_next(0)
    state = ring.snapshot()
    ring.enter_until_next(1)
    ring.restore(state)
    assert ring.snapshot() == state == (0, 2, 0)


def test_both_rings_are_the_one_scheduler() -> None:
    """Weights and KV differ only in what they copy: the visit, issue-ahead and restart logic is `Ring`'s."""
    layer_ring = LayerRing([torch.empty(8) for _ in range(2)], Recorder())
    kv_ring = KVRing(depth=1)
    assert isinstance(layer_ring, Ring) and isinstance(kv_ring, Ring)
    for name in ("enter", "exit", "enter_until_next", "_issue_ahead", "step_phase", "advance"):
        assert getattr(LayerRing, name) is getattr(Ring, name) is getattr(KVRing, name)


def test_kv_ring_copies_each_layers_host_blocks_into_its_slot() -> None:
    class Layer:  # what KVRing reads of a HostKVLayer
        def __init__(self, tokens: int) -> None:
            self.host_tokens, self.host_k, self.host_v = tokens, torch.zeros(64), torch.zeros(64)

    ring = KVRing(depth=1)
    for tokens in (32, 0, 16):
        ring.add(Layer(tokens))
    ring.ensure_slots((64,), torch.float32, torch.device("cpu"))
    ring.copier = copier = Recorder()
    for position in range(3):
        ring.enter_until_next(position)
    copies = [entry for entry in copier.log if entry[0] == "copy"]
    # K and V of the sealed tokens; a layer with nothing on the host still takes its turn (no pairs)
    assert copies == [("copy", (32, 32), 0), ("copy", (), 1), ("copy", (16, 16), 0), ("copy", (32, 32), 1)]
