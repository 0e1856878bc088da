"""CUDA managed memory for streamed weights: allocation, advice and prefetch, through cuda-bindings.

Why a managed tier: on coherent platforms (GH200/GB200, NVLink-C2C) managed pages move at link
speed and the GPU may hold more than its own memory; bulk `cudaMemPrefetchAsync` of layer i+depth
on the copy stream replaces fault-driven paging. On a PCIe GPU, managed memory beyond the GPU's
free memory can hang the GPU, so there it is only allowed well inside free memory (tests, the
benchmark) and the planner keeps pinned copies.

cuda-bindings 13 (`from cuda.bindings import runtime`) takes a `cudaMemLocation` in
`cudaMemPrefetchAsync(ptr, count, location, flags, stream)` and `cudaMemAdvise(ptr, count, advice,
location)`: read from the 13.0.0 and 13.5.0 wheels (identical there), whose argument checks accepted
these calls on a machine without a driver. Not yet run on a GPU.
"""

from __future__ import annotations

import time
import weakref

import torch

from ..errors import OverspillError

NON_COHERENT_FRACTION = 0.5  # of free GPU memory: the most managed memory allowed on a PCIe GPU


def check_managed_bytes(total: int, gpu_free: int, coherent: bool, fraction: float = NON_COHERENT_FRACTION) -> None:
    """Refuse managed memory that could oversubscribe a non-coherent GPU."""
    if coherent or total <= fraction * gpu_free:
        return
    raise OverspillError(
        f"refusing {total / 2**30:.2f} GiB of CUDA managed memory: this GPU is not coherent with host memory "
        f"(PCIe), where managed memory beyond the GPU's free memory pages on faults and can hang the GPU; "
        f"at most {fraction:g} of its {gpu_free / 2**30:.2f} GiB free is allowed. Stream from pinned memory "
        "instead (the default: streaming='copy')"
    )


def check(name: str, result):
    """The value a cuda-bindings call returned after its error code; raise naming `name` unless cudaSuccess."""
    from cuda.bindings import runtime as cudart

    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise OverspillError(f"{name} failed: {err.name} ({int(err)}): {cudart.cudaGetErrorString(err)[1].decode()}")
    return values[0] if values else None


class _Buffer:
    """One cudaMallocManaged allocation, exported to torch through `__cuda_array_interface__`.

    torch keeps the exporter alive as long as any tensor over it, so the memory is freed only when
    the last view of it is gone (not at interpreter exit, while another thread may still read it)."""

    def __init__(self, runtime, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2}
        self.release = weakref.finalize(self, runtime.cudaFree, ptr)
        self.release.atexit = False


class ManagedMemory:
    """Allocates cudaMallocManaged buffers on one device and migrates them; each buffer is freed
    with the last tensor over it.

    Raises OverspillError when cuda-bindings is missing or the device cannot prefetch managed memory.
    """

    def __init__(self, device: torch.device):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError as exc:
            raise OverspillError("managed weights need cuda-python: pip install 'overspill[managed]' "
                                 "(cuda-bindings>=13)") from exc
        from importlib.metadata import PackageNotFoundError, version

        try:
            major = int(version("cuda-bindings").split(".")[0])
        except (PackageNotFoundError, ValueError):
            major = 0
        if major < 13:  # 12.x takes a device int where 13 takes a cudaMemLocation
            raise OverspillError("managed weights need cuda-bindings 13 or newer (CUDA 13 call forms); "
                                 "pip install 'overspill[managed]'")
        self.rt, self.device = cudart, torch.device(device)
        self.index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)
        self.call_s = 0.0  # host time spent inside prefetch calls (a blocking driver shows here)
        self._buffers: list[weakref.ref] = []
        for name in ("cudaDevAttrManagedMemory", "cudaDevAttrConcurrentManagedAccess"):
            attr = getattr(cudart.cudaDeviceAttr, name)
            if not check(f"cudaDeviceGetAttribute({name})", cudart.cudaDeviceGetAttribute(attr, self.index)):
                raise OverspillError(f"{name} is 0 on {self.device}: managed memory cannot be prefetched to it")

    def tensor(self, nbytes: int) -> torch.Tensor:
        """A new managed buffer as a flat uint8 CUDA tensor (no copy; valid while this object lives)."""
        with torch.cuda.device(self.index):  # the runtime allocates on its current device (torch's)
            ptr = int(check("cudaMallocManaged", self.rt.cudaMallocManaged(nbytes, self.rt.cudaMemAttachGlobal)))
        buffer = _Buffer(self.rt, ptr, nbytes)
        self._buffers.append(weakref.ref(buffer))
        out = torch.as_tensor(buffer, device=self.device)
        if out.data_ptr() != ptr or out.numel() != nbytes:
            raise OverspillError(f"managed tensor wraps {out.data_ptr():#x}/{out.numel()} bytes, expected {ptr:#x}/{nbytes}")
        return out

    def _location(self, host: bool):
        loc, kind = self.rt.cudaMemLocation(), self.rt.cudaMemLocationType
        loc.type = kind.cudaMemLocationTypeHost if host else kind.cudaMemLocationTypeDevice
        loc.id = 0 if host else self.index  # a host location's id is ignored
        return loc

    def advise_host_home(self, buf: torch.Tensor) -> None:
        """Pages live in host memory and the GPU maps them: prefetches move them, evictions bring them home."""
        n = buf.numel() * buf.element_size()
        advice = self.rt.cudaMemoryAdvise
        check("cudaMemAdvise(SetPreferredLocation host)",
              self.rt.cudaMemAdvise(buf.data_ptr(), n, advice.cudaMemAdviseSetPreferredLocation, self._location(True)))
        check("cudaMemAdvise(SetAccessedBy device)",
              self.rt.cudaMemAdvise(buf.data_ptr(), n, advice.cudaMemAdviseSetAccessedBy, self._location(False)))

    def prefetch(self, buf: torch.Tensor, host: bool, stream: torch.cuda.Stream) -> None:
        """Queue a bulk migration of `buf` to the host or this device on `stream`."""
        t = time.perf_counter()
        where = "host" if host else str(self.device)
        check(f"cudaMemPrefetchAsync(to {where})",
              self.rt.cudaMemPrefetchAsync(buf.data_ptr(), buf.numel() * buf.element_size(), self._location(host), 0,
                                           stream.cuda_stream))
        self.call_s += time.perf_counter() - t

    def free(self) -> None:
        """Free every buffer now, for benchmarks that reuse the GPU at once: their tensors must not be used after."""
        for ref in self._buffers:
            buffer = ref()
            if buffer is not None:
                buffer.release()
        self._buffers.clear()
