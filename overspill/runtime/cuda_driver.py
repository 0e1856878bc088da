"""The CUDA driver API (libcuda) through ctypes, loaded once for the whole package.

Asking the driver needs neither torch nor a CUDA context: `overspill plan` learns whether a GPU
is present without importing torch (~2 s), and `enable_unified_memory` reads free memory before
torch initialises CUDA (after that, torch's allocator can no longer be swapped); the CPU rank's
joins make a stream wait for a counter in pinned host memory (`stream_wait_value32`), which torch
does not expose. Imports nothing heavy.
"""

from __future__ import annotations

import ctypes
import functools

from ..errors import OverspillError

LIBRARY = "libcuda.so.1"
# CUdevice_attribute values used here (cuda.h)
MANAGED_MEMORY = 83
PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES = 100
STREAM_WAIT_VALUE_GEQ = 0  # CUstreamWaitValue_flags: until (int32_t)(*addr - value) >= 0, a cyclic comparison


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


def _check(status: int, call: str) -> None:
    if status != 0:
        name, lookup = ctypes.c_char_p(), getattr(driver(), "cuGetErrorName", None)
        known = lookup is not None and lookup(status, ctypes.byref(name)) == 0 and name.value
        raise OverspillError(f"{call} failed: {known.decode() if known else 'CUresult'} ({status})")


@functools.cache
def _stream_wait_value32():
    cuda = driver()
    for symbol in ("cuStreamWaitValue32_v2", "cuStreamWaitValue32"):  # CUDA 12 and 13 export the _v2 form
        fn = getattr(cuda, symbol, None)
        if fn is not None:
            fn.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint)
            fn.restype = ctypes.c_int
            return fn
    raise OverspillError("the CUDA driver has no cuStreamWaitValue32; update the NVIDIA driver")


def stream_wait_value32(stream: int, address: int, value: int, flags: int = STREAM_WAIT_VALUE_GEQ) -> None:
    """Make the work queued next on `stream` (a CUstream handle: torch's `Stream.cuda_stream`) wait until the
    32-bit word at device address `address` compares with `value` as `flags` say (default: reaches it,
    cyclically). Returns at once: the wait happens on the device.

    Raises:
        OverspillError: one line naming the driver's error.
    """
    _check(_stream_wait_value32()(stream, address, value & 0xFFFFFFFF, flags), "cuStreamWaitValue32")


def host_device_pointer(host: int) -> int:
    """The device address of pinned (page-locked) host memory at `host`, in the calling thread's CUDA context.

    Raises:
        OverspillError: one line naming the driver's error (not pinned memory, no context).
    """
    out = ctypes.c_uint64(0)
    _check(driver().cuMemHostGetDevicePointer_v2(ctypes.byref(out), ctypes.c_void_p(host), 0),
           "cuMemHostGetDevicePointer")
    return out.value
