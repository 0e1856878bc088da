"""`overspill.runtime.cuda_driver`: libcuda loaded in one place, with one-line errors, for `plan`
(no torch), the probe's coherence check and `enable_unified_memory` (no CUDA context)."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

from overspill import commands
from overspill.errors import OverspillError
from overspill.runtime import cuda_driver, hardware

ROOT = Path(__file__).resolve().parents[1]


class FakeDriver:
    """The few libcuda entry points overspill calls, answering for `count` GPUs with one attribute value."""

    def __init__(self, count: int = 2, attribute: int = 1, init: int = 0) -> None:
        self.count, self.attribute, self.init = count, attribute, init

    def cuInit(self, flags: int) -> int:
        return self.init

    def cuDeviceGetCount(self, out) -> int:
        out._obj.value = self.count
        return 0

    def cuDeviceGet(self, out, index: int) -> int:
        if index >= self.count:
            return 101  # CUDA_ERROR_INVALID_DEVICE
        out._obj.value = index
        return 0

    def cuDeviceGetAttribute(self, out, attribute: int, dev) -> int:
        out._obj.value = self.attribute
        return 0


def use(monkeypatch, library) -> None:
    monkeypatch.setattr(cuda_driver, "_library", lambda: library)
    monkeypatch.setattr(cuda_driver, "_initialised", lambda: library is not None and library.cuInit(0) == 0)


def test_without_a_driver_nothing_is_present_and_driver_is_one_line(monkeypatch) -> None:
    use(monkeypatch, None)
    assert cuda_driver.device_count() == 0 and not commands._cuda_device_present()
    assert cuda_driver.device_attribute(0, cuda_driver.MANAGED_MEMORY) is None
    assert hardware.coherent_platform(0) is False
    with pytest.raises(OverspillError, match=r"cannot load the CUDA driver \(libcuda.so.1\)") as info:
        cuda_driver.driver()
    assert "\n" not in str(info.value)


def test_a_driver_that_does_not_initialise(monkeypatch) -> None:
    use(monkeypatch, FakeDriver(init=3))
    assert cuda_driver.device_count() == 0
    with pytest.raises(OverspillError, match="cuInit"):
        cuda_driver.driver()


def test_the_three_callers_read_one_driver(monkeypatch) -> None:
    use(monkeypatch, FakeDriver(count=2, attribute=1))
    assert cuda_driver.device_count() == 2 and commands._cuda_device_present()
    assert hardware.coherent_platform(1) is True
    assert hardware.coherent_platform(5) is False  # no such GPU
    use(monkeypatch, FakeDriver(count=1, attribute=0))
    assert hardware.coherent_platform(0) is False


def test_the_real_library_is_loaded_once() -> None:
    assert cuda_driver._library() is cuda_driver._library()
    assert cuda_driver._library() is None or isinstance(cuda_driver._library(), ctypes.CDLL)


def test_libcuda_is_opened_only_in_the_shim() -> None:
    opened = [str(p.relative_to(ROOT)) for p in (ROOT / "overspill").rglob("*.py") if "libcuda" in p.read_text()
              and "CDLL" in p.read_text()]
    assert opened == ["overspill/runtime/cuda_driver.py"]


def test_the_shim_imports_no_torch() -> None:
    code = "import sys, overspill.runtime.cuda_driver as d; d.device_count(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
