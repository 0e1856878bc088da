"""`overspill.runtime.unified`: the unified-memory decision on synthetic machines, the errors a user meets,
the RMM allocator swap against a fake `rmm`, and the example's CPU fallback in a real process.

No test here touches CUDA or needs RMM: the apply step runs against fake `rmm` modules injected
into `sys.modules` and a patched `torch.cuda`, with the platform probe replaced by fixed numbers.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from overspill.errors import OverspillError
from overspill.planning.profile import REFERENCE_PROFILES
from overspill.runtime import unified
from overspill.runtime.unified import DEFAULT_MARGIN_BYTES, decide, decide_for, enable_unified_memory

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


# ---------------------------------------------------------------- the pure decision

def test_gh200_pool_may_exceed_gpu_memory() -> None:
    gh200 = REFERENCE_PROFILES["gh200"]
    d = decide_for(gh200)
    assert d.coherent and not d.refused and d.pool_bytes is None  # unlimited
    big = decide_for(gh200, 400 * GiB)
    assert not big.refused and not big.oversubscribed
    assert big.pool_bytes == 400 * GiB > gh200.gpu_total_bytes
    assert "NVLink-C2C" in big.message


@pytest.mark.parametrize("name", ["h100-pcie5", "a100-pcie4"])
def test_pcie_default_is_capped_at_free_minus_margin(name: str) -> None:
    p = REFERENCE_PROFILES[name]
    d = decide_for(p)
    assert not d.coherent and not d.refused
    assert d.pool_bytes == p.gpu_free_bytes - DEFAULT_MARGIN_BYTES
    assert "overspill.load" in d.message


def test_pcie_request_within_free_is_granted_as_asked() -> None:
    d = decide_for(REFERENCE_PROFILES["h100-pcie5"], 40 * GiB)
    assert not d.refused and d.pool_bytes == 40 * GiB and d.requested_bytes == 40 * GiB
    edge = decide_for(REFERENCE_PROFILES["h100-pcie5"], 77 * GiB)  # exactly free (79) - margin (2)
    assert not edge.refused and edge.pool_bytes == 77 * GiB


@pytest.mark.parametrize("request_gib", [77.5, 79, 120, 400])
def test_pcie_request_over_free_is_refused_with_reason_and_alternative(request_gib: float) -> None:
    d = decide_for(REFERENCE_PROFILES["h100-pcie5"], int(request_gib * GiB))
    assert d.refused and d.pool_bytes is None and not d.oversubscribed
    msg = d.message
    assert "hang" in msg and "overspill.load(model, gpu_memory=" in msg
    assert "8-10 GB/s" in msg and "allow_oversubscription=True" in msg
    assert "pool_size <= 77 GiB" in msg
    assert "\n" not in msg


def test_allow_oversubscription_grants_with_a_warning() -> None:
    d = decide_for(REFERENCE_PROFILES["h100-pcie5"], 120 * GiB, allow_oversubscription=True)
    assert not d.refused and d.oversubscribed and d.pool_bytes == 120 * GiB
    assert d.message.startswith("WARNING") and "hang" in d.message and "overspill.load" in d.message


def test_allow_oversubscription_never_enlarges_the_default() -> None:
    p = REFERENCE_PROFILES["h100-pcie5"]
    assert decide_for(p, None, allow_oversubscription=True).pool_bytes == p.gpu_free_bytes - DEFAULT_MARGIN_BYTES
    # a request that fits is not an oversubscription, with or without the flag
    assert not decide_for(p, 10 * GiB, allow_oversubscription=True).oversubscribed


def test_full_gpu_refuses_even_the_default() -> None:
    busy = replace(REFERENCE_PROFILES["h100-pcie5"], gpu_free_bytes=512 * 2**20)
    d = decide_for(busy)
    assert d.refused and "overspill.load" in d.message
    small = decide_for(busy, 100 * 2**20)
    assert small.refused and "free GPU memory first" in small.message


def test_no_gpu_and_bad_sizes_are_refused() -> None:
    d = decide_for(REFERENCE_PROFILES["cpu"])
    assert d.refused and "needs a CUDA GPU" in d.message and "overspill.load" in d.message
    assert decide(False, 10 * GiB, 80 * GiB, 0, False).refused
    assert decide(True, 10 * GiB, 80 * GiB, -1, True).refused


def test_margin_is_a_parameter() -> None:
    d = decide(False, 20 * GiB, 24 * GiB, None, False, margin_bytes=4 * GiB)
    assert d.pool_bytes == 16 * GiB
    assert decide(False, 20 * GiB, 24 * GiB, 17 * GiB, False, margin_bytes=4 * GiB).refused


def test_decision_is_frozen_data() -> None:
    d = decide_for(REFERENCE_PROFILES["gh200"])
    with pytest.raises(AttributeError):
        d.pool_bytes = 1  # type: ignore[misc]
    assert d == decide_for(REFERENCE_PROFILES["gh200"])


def test_decision_code_does_not_import_torch() -> None:
    code = (
        "import sys; from overspill.runtime.unified import decide_for; from overspill.planning.profile import REFERENCE_PROFILES;"
        "decide_for(REFERENCE_PROFILES['gh200']); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- errors before anything is applied

@pytest.fixture
def fresh(monkeypatch):
    """No earlier enable_unified_memory() in this process."""
    monkeypatch.setattr(unified, "_ENABLED", None)


@pytest.fixture
def cuda_present(monkeypatch, fresh):
    """torch believes a GPU is there and untouched; the probe answers without a driver."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def no_probe(device):
        raise AssertionError("the platform was probed before the preconditions were checked")

    monkeypatch.setattr(unified, "_probe_platform", no_probe)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_cuda_error_on_this_machine(fresh) -> None:
    with pytest.raises(OverspillError, match=r"needs a CUDA GPU; on this machine use overspill\.load\(\.\.\.\) which runs on CPU"):
        enable_unified_memory()


def test_no_cuda_error(monkeypatch, fresh) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OverspillError, match="needs a CUDA GPU") as info:
        enable_unified_memory("40GiB")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cuda,package", [("12.8", "rmm-cu12"), ("13.0", "rmm-cu13"), (None, "rmm-cu12 or rmm-cu13")])
def test_rmm_missing_error_names_the_extra(monkeypatch, cuda_present, cuda, package) -> None:
    monkeypatch.setattr(unified, "_rmm_installed", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    with pytest.raises(OverspillError) as info:
        enable_unified_memory()
    msg = str(info.value)
    assert "pip install 'overspill[rmm]'" in msg and package in msg
    assert f"CUDA {cuda or 'unknown'}" in msg


@pytest.mark.skipif(importlib.util.find_spec("rmm") is not None, reason="RMM is installed here")
def test_rmm_missing_is_detected_for_real() -> None:
    assert unified._rmm_installed() is False


def test_cuda_already_initialised_error(monkeypatch, cuda_present) -> None:
    monkeypatch.setattr(unified, "_rmm_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(OverspillError, match=r"before anything touches CUDA \(before loading any model"):
        enable_unified_memory()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_memory_probe_without_a_driver_is_a_clear_error() -> None:
    with pytest.raises(OverspillError, match="CUDA driver"):
        unified._gpu_memory(0)


def test_bad_pool_size_is_a_clear_error(fresh) -> None:
    with pytest.raises(OverspillError, match="invalid memory size"):
        enable_unified_memory("lots")


# ---------------------------------------------------------------- the apply step, with a fake RMM

class FakeRMM:
    """`rmm`, `rmm.mr`, `rmm.allocators.torch` as modules that record what they are asked to do."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.allocator = object()
        calls = self.calls

        class ManagedMemoryResource:
            def __init__(self) -> None:
                calls.append(("ManagedMemoryResource",))

        class LimitingResourceAdaptor:
            def __init__(self, upstream, allocation_limit) -> None:
                assert isinstance(upstream, ManagedMemoryResource)
                self.upstream, self.allocation_limit = upstream, allocation_limit
                calls.append(("LimitingResourceAdaptor", allocation_limit))

        def set_per_device_resource(device, mr) -> None:
            calls.append(("set_per_device_resource", device, mr))

        self.rmm = types.ModuleType("rmm")
        self.rmm.__spec__ = importlib.machinery.ModuleSpec("rmm", None)  # find_spec("rmm") finds it
        self.mr = types.ModuleType("rmm.mr")
        self.mr.ManagedMemoryResource = ManagedMemoryResource
        self.mr.LimitingResourceAdaptor = LimitingResourceAdaptor
        self.mr.set_per_device_resource = set_per_device_resource
        self.allocators = types.ModuleType("rmm.allocators")
        self.torch_mod = types.ModuleType("rmm.allocators.torch")
        self.torch_mod.rmm_torch_allocator = self.allocator
        self.rmm.mr, self.rmm.allocators, self.allocators.torch = self.mr, self.allocators, self.torch_mod

    def install(self, monkeypatch) -> None:
        for name, mod in [("rmm", self.rmm), ("rmm.mr", self.mr), ("rmm.allocators", self.allocators),
                          ("rmm.allocators.torch", self.torch_mod)]:
            monkeypatch.setitem(sys.modules, name, mod)

    def resource(self):
        (device_call,) = [c for c in self.calls if c[0] == "set_per_device_resource"]
        return device_call[1], device_call[2]


@pytest.fixture
def fake_gpu(monkeypatch, fresh):
    """A CUDA machine with fake RMM; `fake_gpu(coherent, free, total)` sets what the probe reports."""
    rmm = FakeRMM()
    rmm.install(monkeypatch)
    swaps: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda.memory, "change_current_allocator", swaps.append)
    probes: list[int] = []

    def configure(coherent: bool, free: int, total: int):
        def probe(device: int):
            probes.append(device)
            return coherent, free, total

        monkeypatch.setattr(unified, "_probe_platform", probe)
        return rmm, swaps, probes

    return configure


def test_apply_on_pcie_limits_rmm_to_the_decided_pool(fake_gpu) -> None:
    rmm, swaps, probes = fake_gpu(False, 79 * GiB, 80 * GiB)
    d = enable_unified_memory("40GiB")
    assert not d.refused and d.pool_bytes == 40 * GiB
    assert rmm.calls[0] == ("ManagedMemoryResource",)
    assert rmm.calls[1] == ("LimitingResourceAdaptor", 40 * GiB)
    device, mr = rmm.resource()
    assert device == 0 and mr.allocation_limit == 40 * GiB
    assert swaps == [rmm.allocator] and probes == [0]


def test_apply_default_on_pcie_limits_to_free_minus_margin(fake_gpu) -> None:
    rmm, swaps, _ = fake_gpu(False, 30 * GiB, 80 * GiB)
    d = enable_unified_memory(device=1)
    assert d.pool_bytes == 28 * GiB  # free minus the 2 GiB margin
    device, mr = rmm.resource()
    assert device == 1 and mr.allocation_limit == 28 * GiB
    assert swaps == [rmm.allocator]


def test_apply_on_coherent_platform_is_unlimited(fake_gpu) -> None:
    rmm, swaps, _ = fake_gpu(True, 95 * GiB, 96 * GiB)
    d = enable_unified_memory()
    assert d.coherent and d.pool_bytes is None
    assert [c[0] for c in rmm.calls] == ["ManagedMemoryResource", "set_per_device_resource"]
    assert swaps == [rmm.allocator]


def test_apply_on_coherent_platform_with_a_size_beyond_the_gpu(fake_gpu) -> None:
    rmm, _, _ = fake_gpu(True, 95 * GiB, 96 * GiB)
    assert enable_unified_memory(300 * GiB).pool_bytes == 300 * GiB
    assert rmm.resource()[1].allocation_limit == 300 * GiB


def test_refusal_applies_nothing_and_records_nothing(fake_gpu) -> None:
    rmm, swaps, _ = fake_gpu(False, 79 * GiB, 80 * GiB)
    with pytest.raises(OverspillError, match="hang") as info:
        enable_unified_memory("120GiB")
    assert "overspill.load" in str(info.value)
    assert rmm.calls == [] and swaps == [] and unified._ENABLED is None
    assert enable_unified_memory("40GiB").pool_bytes == 40 * GiB  # a fitting retry still works


def test_knowing_oversubscription_is_applied_with_a_warning(fake_gpu) -> None:
    rmm, swaps, _ = fake_gpu(False, 79 * GiB, 80 * GiB)
    with pytest.warns(RuntimeWarning, match="can hang the GPU"):
        d = enable_unified_memory("120GiB", allow_oversubscription=True)
    assert d.oversubscribed and rmm.resource()[1].allocation_limit == 120 * GiB
    assert swaps == [rmm.allocator]


def test_second_call_is_a_no_op_and_other_settings_are_refused(fake_gpu) -> None:
    rmm, swaps, probes = fake_gpu(False, 79 * GiB, 80 * GiB)
    first = enable_unified_memory("40GiB")
    again = enable_unified_memory(40 * GiB)  # the same size, spelt differently
    assert again is first
    assert swaps == [rmm.allocator] and len(rmm.calls) == 3 and probes == [0]
    with pytest.raises(OverspillError, match="already enabled.*restart the process"):
        enable_unified_memory("20GiB")
    assert swaps == [rmm.allocator]


def test_rmm_without_a_torch_allocator_is_a_clear_error(fake_gpu) -> None:
    rmm, swaps, _ = fake_gpu(True, 95 * GiB, 96 * GiB)
    rmm.torch_mod.rmm_torch_allocator = None  # what RMM exports when its CUDA build does not fit torch
    with pytest.raises(OverspillError, match=r"overspill\[rmm\]"):
        enable_unified_memory()
    assert swaps == [] and unified._ENABLED is None


def test_allocator_swap_failure_is_explained(fake_gpu, monkeypatch) -> None:
    fake_gpu(True, 95 * GiB, 96 * GiB)

    def refuse(allocator):
        raise RuntimeError("Can't swap an already initialized allocator")

    monkeypatch.setattr(torch.cuda.memory, "change_current_allocator", refuse)
    with pytest.raises(OverspillError, match="already initialized allocator.*before anything touches CUDA"):
        enable_unified_memory()
    assert unified._ENABLED is None


# ---------------------------------------------------------------- the example, as a user runs it

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_example_falls_back_to_streaming_on_cpu(default_model_dir) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "unified_memory_pipeline.py"), "--max-new-tokens", "24"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "unified memory not enabled: unified memory needs a CUDA GPU" in out.stdout
    assert "falling back to overspill.load" in out.stdout
    answer = [line for line in out.stdout.splitlines() if line.startswith("A: ")]
    assert answer and "Everest" in answer[0], out.stdout


def test_rmm_that_does_not_load_gives_a_clear_error(monkeypatch) -> None:
    """RMM found but failing at import (bad CUDA bindings, missing librmm.so): an OverspillError, not a crash."""
    from overspill.runtime import unified

    monkeypatch.setitem(sys.modules, "rmm", None)  # `import rmm` now raises ImportError
    decision = decide(False, 30 * GiB, 80 * GiB, None, False)
    with pytest.raises(OverspillError, match="does not load"):
        unified._apply(decision, 0)
