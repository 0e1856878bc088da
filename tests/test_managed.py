"""The managed weight tier on the CPU: the choice of streaming, the refusal that keeps managed
memory inside a PCIe GPU's free memory, the in-place ring schedule, and clear errors without CUDA."""

from __future__ import annotations

import sys

import pytest
import torch
from test_capture_schedule import device  # noqa: F401 - the simulated-device fixture

from overspill.errors import OverspillError
from overspill.planning.placement import choose_streaming
from overspill.planning.plan import Plan
from overspill.runtime.executor import LayerRing
from overspill.runtime.managed import check_managed_bytes

GiB = 2**30


def test_auto_streams_managed_only_where_it_was_measured_faster() -> None:
    assert choose_streaming("auto", managed_wins=True) == "mapped"  # what the probe measures
    assert choose_streaming("auto", managed_wins=False) == "copy"
    assert choose_streaming("managed", managed_wins=False) == "managed"  # asked for: checked against free memory
    assert choose_streaming("copy", managed_wins=True) == "copy"
    assert choose_streaming("mapped", managed_wins=True) == "mapped"  # only on request
    with pytest.raises(OverspillError, match="auto, copy, managed, mapped"):
        choose_streaming("zero-copy", managed_wins=False)


def test_managed_memory_is_refused_beyond_half_of_a_pcie_gpus_free_memory() -> None:
    check_managed_bytes(10 * GiB, 79 * GiB, coherent=False)
    check_managed_bytes(200 * GiB, 90 * GiB, coherent=True)  # GH200: may exceed GPU memory
    with pytest.raises(OverspillError) as err:
        check_managed_bytes(70 * GiB, 79 * GiB, coherent=False)
    assert "70.00 GiB" in str(err.value) and "79.00 GiB" in str(err.value) and "pinned" in str(err.value)


def test_managed_streaming_needs_cuda(tiny_checkpoint) -> None:
    from test_placement import load_tiny

    for mode in ("managed", "mapped"):
        with pytest.raises(OverspillError, match="CUDA device"):
            load_tiny(tiny_checkpoint("llama"), 4, streaming=mode)
    model = load_tiny(tiny_checkpoint("llama"), 4, streaming="auto")
    assert model.overspill.plan.streaming == "copy" and model.overspill.plan.streamed_layers


def test_managed_memory_without_cuda_bindings_names_the_package(monkeypatch) -> None:
    from overspill.runtime.managed import ManagedMemory

    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(OverspillError, match="cuda-bindings"):
        ManagedMemory(torch.device("cuda", 0))


def test_plan_records_and_reports_managed_streaming() -> None:
    from dataclasses import replace

    from overspill.planning.placement import greedy_plan
    from overspill.planning.plan import Footprint, Workload

    fp = Footprint(layer_bytes=(100,) * 8, embed_bytes=50, head_bytes=50, other_bytes=1, tied_embeddings=False,
                   kv_bytes_per_token=8, activation_bytes_per_token=4)
    plan = replace(greedy_plan(fp, 1400, Workload(16, 1, activation_floor=0), depth=2), streaming="managed")
    assert plan.streamed_layers and Plan.from_json(plan.to_json()).streaming == "managed"
    assert "CUDA managed memory" in plan.summary() and "at most 3 layers on the GPU" in plan.summary()
    mapped = replace(plan, streaming="mapped")
    assert "CUDA managed memory" in mapped.summary() and "in place over the link" in mapped.summary()


class _Recorder:
    """A copier that records what the ring asks of it (the ManagedCopier interface, no CUDA)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def copy(self, dst, src, slot):
        self.calls.append(("fetch", src, slot, dst))

    def wait_ready(self, slot):
        self.calls.append(("wait", slot))

    def mark_done(self, slot):
        self.calls.append(("done", slot))

    def synchronize(self):
        pass


class _Layer:
    def __init__(self, name: str) -> None:
        self.host = name


def test_in_place_ring_fetches_layers_ahead_without_slot_buffers() -> None:
    copier = _Recorder()
    ring = LayerRing([], copier, in_place_slots=2)
    ring.layers = [_Layer(f"L{i}") for i in range(3)]
    assert ring.in_place and ring.n_slots == 2
    for _ in range(2):  # two steps over 3 streamed layers
        for position in range(3):
            slot = ring.enter(position)
            ring.exit(slot)
    fetches = [c for c in copier.calls if c[0] == "fetch"]
    assert all(dst is None for *_, dst in fetches)
    assert [src for _, src, _, _ in fetches][:6] == ["L0", "L1", "L2", "L0", "L1", "L2"]
    assert [slot for _, _, slot, _ in fetches][:4] == [0, 1, 0, 1]
    # a layer's fetch is issued only after the slot's previous layer was marked done
    first_fetch_into_0_again = copier.calls.index(fetches[2])
    assert ("done", 0) in copier.calls[:first_fetch_into_0_again]


def _streamed_footprint(layer_bytes: int = 10 * GiB):
    from overspill.planning.plan import Footprint

    return Footprint(layer_bytes=(layer_bytes,) * 8, embed_bytes=GiB, head_bytes=GiB, other_bytes=1,
                     tied_embeddings=False, kv_bytes_per_token=8, activation_bytes_per_token=4)


def _streamed_plan(layer_bytes: int = 10 * GiB):
    from overspill.planning.placement import greedy_plan
    from overspill.planning.plan import Workload

    return greedy_plan(_streamed_footprint(layer_bytes), 40 * GiB, Workload(16, 1, activation_floor=0), depth=2)


@pytest.fixture
def pcie_gpu(monkeypatch):
    """`_with_streaming` on a simulated CUDA device: (set_free(bytes), set_coherent(bool), set_bindings(bool))."""
    from overspill import api
    from overspill.runtime import hardware

    state = {"free": 79 * GiB, "coherent": False, "bindings": True}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * GiB))
    monkeypatch.setattr(hardware, "coherent_platform", lambda index=0: state["coherent"])
    monkeypatch.setattr(api, "_has_cuda_bindings", lambda: state["bindings"])
    return state


def test_refusal_counts_what_the_plan_will_allocate_first(pcie_gpu) -> None:
    from overspill.api import _with_streaming

    plan = _streamed_plan()
    streamed, device = plan.streamed_bytes_per_step, plan.device_bytes
    assert streamed and device
    pcie_gpu["free"] = device + 2 * streamed + GiB  # half of what stays free covers the streamed layers
    assert _with_streaming(plan, "managed", torch.device("cuda", 0)).streaming == "managed"
    pcie_gpu["free"] = 2 * streamed + GiB  # enough before loading, not once resident weights are placed
    for mode in ("managed", "mapped"):  # mapped layers are managed memory too
        with pytest.raises(OverspillError, match="refusing"):
            _with_streaming(plan, mode, torch.device("cuda", 0))


def test_auto_copies_unless_managed_was_measured_faster_and_can_run(pcie_gpu) -> None:
    from overspill.api import _with_streaming

    pcie_gpu.update(coherent=True, free=8 * GiB)  # coherent: managed may exceed GPU memory
    cuda = torch.device("cuda", 0)
    assert _with_streaming(_streamed_plan(), "auto", cuda).streaming == "copy"  # not measured: copy
    assert _with_streaming(_streamed_plan(), "auto", cuda, managed_wins=True).streaming == "mapped"
    pcie_gpu["bindings"] = False
    plan = _with_streaming(_streamed_plan(), "auto", cuda, managed_wins=True)
    assert plan.streaming == "copy" and any("overspill[managed]" in note for note in plan.notes)


class _Memory:
    """Records prefetches as ops on their stream (the simulated device of test_capture_schedule)."""

    def __init__(self, sim) -> None:
        self.sim, self.log = sim, []

    def prefetch(self, buf, host: bool, stream) -> None:
        self.log.append(("home" if host else "fetch", buf.name, stream, self.sim.op(stream)))


def test_managed_copier_evicts_after_compute_and_fetches_after_eviction(device) -> None:
    """Eviction of a layer waits for its compute; a fetch into a slot waits for the previous
    occupant's eviction; a layer fetched but never computed (ring restart) is sent home too."""
    from test_capture_schedule import FakeTensor

    from overspill.runtime.streams import ManagedCopier

    memory = _Memory(device)
    copier = ManagedCopier(torch.device("cuda"), 2, memory)
    ring = LayerRing([], copier, in_place_slots=2)

    class Layer:
        def __init__(self, i: int) -> None:
            self.host = FakeTensor(10, f"L{i}")

    ring.layers = [Layer(i) for i in range(3)]
    main = device.current
    computed: dict[str, int] = {}
    for _ in range(2):
        for position in range(3):
            slot = ring.enter(position)
            assert id(copier.ready[slot]) in main.waited
            computed[f"L{position}"] = device.op(main)
            ring.exit(slot)
    homes = [entry for entry in memory.log if entry[0] == "home"]
    fetches = [entry for entry in memory.log if entry[0] == "fetch"]
    assert homes and all(stream is copier.evict_stream for *_, stream, _ in homes)
    assert all(stream is copier.stream for *_, stream, _ in fetches)
    # every fetch beyond the first two reuses a slot: the copy stream waited on that slot's eviction first
    assert len(fetches) >= 4 and {id(e) for e in copier.evicted} <= copier.stream.waited
    assert {id(e) for e in copier.done} <= copier.evict_stream.waited  # evictions follow compute
    assert [name for _, name, _, _ in fetches[:6]] == ["L0", "L1", "L2", "L0", "L1", "L2"]
    ring.enter(1)  # out of order: the ring restarts; L1 is fetched again
    ring.enter(0)  # restart again before L1 computed: its slot's layer must go home first
    assert [entry[1] for entry in memory.log if entry[0] == "home"][-1] in {"L1", "L2"}


def test_mapped_ring_issues_nothing_and_computes_in_place() -> None:
    """Mapped layers are read where they are: the ring's copies and events are no-ops, and a
    graphed step over them has no captured events to replay."""
    from overspill.runtime.executor import LayerRing
    from overspill.runtime.streams import MappedCopier

    copier = MappedCopier()
    ring = LayerRing([], copier, in_place_slots=2)
    ring.layers = [_Layer(f"L{i}") for i in range(3)]
    for _ in range(2):
        for position in range(3):
            ring.exit(ring.enter(position))
    assert ring.in_place and ring.restarts == 1 and ring.step_phase() is not None
    assert not copier.capturing and tuple(copier.captured_events) == ()


def test_mapped_plans_are_predicted_at_the_measured_in_place_read_speed() -> None:
    from dataclasses import replace

    from overspill.planning.placement import with_prediction
    from overspill.planning.profile import REFERENCE_PROFILES

    plan = _streamed_plan()
    fp = _streamed_footprint()
    h100 = replace(REFERENCE_PROFILES["h100-pcie5"], managed_bytes_s=27e9)  # half the pinned copy speed
    copy = with_prediction(fp, plan, h100).prediction
    mapped = with_prediction(fp, replace(plan, streaming="mapped"), h100).prediction
    assert mapped.link_s == pytest.approx(2 * copy.link_s)
    unmeasured = with_prediction(fp, replace(plan, streaming="mapped"), REFERENCE_PROFILES["h100-pcie5"]).prediction
    assert unmeasured.link_s == pytest.approx(copy.link_s)


def test_probe_measures_no_mapped_speed_without_managed_memory(monkeypatch) -> None:
    from overspill.runtime.hardware import measure_mapped

    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    assert measure_mapped(torch.device("cuda", 0)) == 0.0
