"""The CUDA driver API (libcuda) through ctypes, loaded once for the whole package.

Asking the driver needs neither torch nor a CUDA context: `overspill plan` learns whether a GPU
is present without importing torch (~2 s), and `enable_unified_memory` reads free memory before
torch initialises CUDA (after that, torch's allocator can no longer be swapped). Imports nothing
heavy.
"""

from __future__ import annotations

import ctypes
import functools

from ..errors import OverspillError

LIBRARY = "libcuda.so.1"
# CUdevice_attribute values used here (cuda.h)
MANAGED_MEMORY = 83
PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES = 100


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(LIBRARY)
    except OSError:
        return None


@functools.cache
def _initialised() -> bool:
    cuda = _library()
    return cuda is not None and cuda.cuInit(0) == 0


def driver() -> ctypes.CDLL:
    """The initialised driver library.

    Raises:
        OverspillError: one line saying whether the library is missing or `cuInit` failed.
    """
    cuda = _library()
    if cuda is None:
        raise OverspillError(f"cannot load the CUDA driver ({LIBRARY}); check the NVIDIA driver installation")
    if not _initialised():
        raise OverspillError("the CUDA driver failed to initialise (cuInit); check nvidia-smi")
    return cuda


def device_count() -> int:
    """GPUs the driver sees; 0 without a driver or when it does not initialise."""
    try:
        cuda = driver()
    except OverspillError:
        return 0
    count = ctypes.c_int(0)
    return count.value if cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0


def device_attribute(device_index: int, attribute: int) -> int | None:
    """A `CUdevice_attribute` of GPU `device_index`; None when there is no driver or no such device."""
    try:
        cuda = driver()
    except OverspillError:
        return None
    dev, value = ctypes.c_int(), ctypes.c_int()
    if cuda.cuDeviceGet(ctypes.byref(dev), device_index) != 0:
        return None
    if cuda.cuDeviceGetAttribute(ctypes.byref(value), attribute, dev) != 0:
        return None
    return value.value
