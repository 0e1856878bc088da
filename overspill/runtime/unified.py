"""`enable_unified_memory()`: NVIDIA's GH200 recipe for models beyond GPU memory, as one safe call.

The recipe is two lines run before anything touches CUDA::

    rmm.reinitialize(managed_memory=True)
    torch.cuda.memory.change_current_allocator(rmm_torch_allocator)

after which an unmodified `transformers.pipeline(...)` allocates every tensor as CUDA managed
memory. On a coherent platform (GH200/GB200: the GPU reads host memory through the host's page
tables over NVLink-C2C) that is one CPU+GPU address space and a model may exceed GPU memory.
Elsewhere (an H100 or A100 on PCIe) managed memory beyond the GPU pages on faults at ~8-10 GB/s,
and oversubscribed managed memory on such a GPU can hang the GPU, so there the pool is capped at
the GPU's free memory and a larger request is refused unless the caller passes
`allow_oversubscription=True` knowingly.

The module has two halves:

- `decide` / `decide_for`: pure functions of plain numbers (or a `Profile`) returning a frozen
  `UnifiedMemoryDecision`; no torch, no CUDA; unit-tested on synthetic machines.
- `enable_unified_memory`: the side effects, in this order, none of which initialises torch's
  CUDA (the allocator can only be swapped before torch's first CUDA allocation):
    1. `torch.cuda.is_available()` (counts devices; creates no context),
    2. RMM installed? (`importlib.util.find_spec`, nothing imported),
    3. `torch.cuda.is_initialized()` must still be False,
    4. coherence from the driver attribute (`hardware.coherent_platform`, through `cuda_driver`),
    5. total memory from the driver (`cuDeviceTotalMem_v2`); free memory from NVML
       (`pynvml` / nvidia-ml-py, matched by PCI bus id), else from the driver in the device's
       primary context (`cuMemGetInfo_v2`, the context released afterwards);
       never `torch.cuda.mem_get_info`, which would initialise torch's CUDA,
    6. `decide(...)`; a refusal raises `OverspillError` with the decision's message,
    7. apply: RMM managed memory resource, wrapped in a `LimitingResourceAdaptor` at the
       decided size when there is one, set as the device's resource; torch's allocator swapped
       to `rmm_torch_allocator`.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import OverspillError
from ..planning.units import format_bytes, parse_bytes

if TYPE_CHECKING:
    from ..planning.profile import Profile

__all__ = ["UnifiedMemoryDecision", "decide", "decide_for", "enable_unified_memory", "DEFAULT_MARGIN_BYTES"]

DEFAULT_MARGIN_BYTES = 2 << 30  # CUDA context (~0.6 GiB on CUDA 13), kernels loaded later, cuBLAS workspaces
RMM_EXTRA_HINT = "pip install 'overspill[rmm]' (installs rmm-cu12 or rmm-cu13 to match your CUDA)"
_STREAMING_HINT = (
    "for a model larger than GPU memory use overspill.load(model, gpu_memory=...), which streams "
    "layers from pinned host memory at link speed (~50 GB/s on PCIe Gen5)"
)
_WHY_NOT = (
    "this GPU is not coherent with host memory (no NVLink-C2C access through host page tables), so "
    "managed memory beyond it pages on faults at ~8-10 GB/s over PCIe, and oversubscribed managed "
    "memory on a non-coherent GPU can hang the GPU"
)


@dataclass(frozen=True)
class UnifiedMemoryDecision:
    """What `enable_unified_memory` does (or refuses to do) on one machine. Pure data."""

    coherent: bool  # GPU reads host memory through host page tables (GH200/GB200)
    pool_bytes: int | None  # cap on managed memory; None = unlimited (coherent platforms only)
    gpu_free_bytes: int
    requested_bytes: int | None  # what the caller asked for; None = the default for the platform
    refused: bool
    message: str  # why refused, a warning when oversubscribing, else a one-line summary
    oversubscribed: bool = False  # a non-coherent pool larger than free memory, knowingly allowed


def decide(
    coherent: bool,
    gpu_free_bytes: int,
    gpu_total_bytes: int,
    requested_bytes: int | None,
    allow_oversubscription: bool,
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
) -> UnifiedMemoryDecision:
    """The managed-memory pool for a machine, or a refusal that says why and what to use instead.

    Coherent platforms: the pool may exceed GPU memory (host memory is reached over NVLink-C2C);
    no request means no limit. Non-coherent platforms: the pool is capped at free memory minus
    `margin_bytes`; a larger request is refused unless `allow_oversubscription` (then it is
    granted with a warning naming the risk). `allow_oversubscription` never enlarges the default.
    """

    def result(pool: int | None, refused: bool, message: str, oversubscribed: bool = False) -> UnifiedMemoryDecision:
        return UnifiedMemoryDecision(coherent, pool, gpu_free_bytes, requested_bytes, refused, message, oversubscribed)

    if gpu_total_bytes <= 0:
        return result(None, True, "unified memory needs a CUDA GPU; on this machine use overspill.load(...) which runs on CPU")
    if requested_bytes is not None and requested_bytes <= 0:
        return result(None, True, f"pool_size must be positive, got {requested_bytes}; pass e.g. '40GiB' or None for the default")
    free, total = format_bytes(gpu_free_bytes), format_bytes(gpu_total_bytes)
    if coherent:
        where = "unlimited" if requested_bytes is None else format_bytes(requested_bytes)
        return result(
            requested_bytes, False,
            f"coherent platform: managed memory pool {where}; it may exceed the GPU's {total} "
            f"({free} free) since the GPU reads host memory over NVLink-C2C",
        )
    cap = gpu_free_bytes - margin_bytes
    if requested_bytes is None:
        if cap <= 0:
            return result(
                None, True,
                f"the GPU has only {free} free, less than the {format_bytes(margin_bytes)} margin, so there is no "
                f"room for a managed memory pool; free GPU memory first, or {_STREAMING_HINT}",
            )
        return result(
            cap, False,
            f"non-coherent platform: managed memory pool capped at {format_bytes(cap)} ({free} free minus "
            f"{format_bytes(margin_bytes)} margin); {_STREAMING_HINT}",
        )
    asked = format_bytes(requested_bytes)
    if requested_bytes <= cap:
        return result(
            requested_bytes, False,
            f"non-coherent platform: managed memory pool {asked} (within {free} free); {_STREAMING_HINT}",
        )
    if allow_oversubscription:
        return result(
            requested_bytes, False,
            f"WARNING: oversubscribing managed memory: {asked} requested, {free} free of {total} on a non-coherent "
            f"GPU (allow_oversubscription=True). {_WHY_NOT[0].upper()}{_WHY_NOT[1:]}; other processes on this GPU "
            f"are at risk too. Instead, {_STREAMING_HINT}",
            oversubscribed=True,
        )
    room = f"pass pool_size <= {format_bytes(cap)}" if cap > 0 else "free GPU memory first"
    return result(
        None, True,
        f"refusing {asked} of CUDA managed memory with {free} free of {total}: {_WHY_NOT}. Instead, "
        f"{_STREAMING_HINT}; or {room}; or pass allow_oversubscription=True if you accept the risk",
    )


def decide_for(
    profile: "Profile",
    requested_bytes: int | None = None,
    allow_oversubscription: bool = False,
    margin_bytes: int = DEFAULT_MARGIN_BYTES,
) -> UnifiedMemoryDecision:
    """`decide` for a measured or reference `Profile` (e.g. `REFERENCE_PROFILES['gh200']`)."""
    return decide(
        profile.coherent, profile.gpu_free_bytes, profile.gpu_total_bytes, requested_bytes,
        allow_oversubscription, margin_bytes,
    )


# ---------------------------------------------------------------------------------------------
# Side effects: probes (driver / NVML, never torch's CUDA context) and the RMM allocator swap.

_ENABLED: tuple[tuple[int | None, bool, int], UnifiedMemoryDecision] | None = None


def _rmm_installed() -> bool:
    try:
        return importlib.util.find_spec("rmm") is not None
    except (ImportError, ValueError):
        return False


def _rmm_package_for(cuda_version: str | None) -> str:
    major = (cuda_version or "").split(".")[0]
    return f"rmm-cu{major}" if major in ("12", "13") else "rmm-cu12 or rmm-cu13"


def _nvml_free_bytes(pci_bus_id: str) -> int | None:
    """Free memory from NVML for the GPU at `pci_bus_id`, or None when NVML is not usable."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML errors are pynvml.NVMLError subclasses; any failure means "not usable"
        return None


def _gpu_memory(device: int) -> tuple[int, int]:
    """(free, total) bytes of CUDA device `device` without initialising torch's CUDA context."""
    import ctypes

    from .cuda_driver import driver

    cuda = driver()
    dev = ctypes.c_int()
    if cuda.cuDeviceGet(ctypes.byref(dev), device) != 0:
        raise OverspillError(f"CUDA device {device} does not exist; pass device= an index below the GPU count")
    total = ctypes.c_size_t()
    if cuda.cuDeviceTotalMem_v2(ctypes.byref(total), dev) != 0:
        raise OverspillError(f"cannot read the memory size of CUDA device {device}")
    bus = ctypes.create_string_buffer(64)
    free = None
    if cuda.cuDeviceGetPCIBusId(bus, 64, dev) == 0:
        free = _nvml_free_bytes(bus.value.decode())
        # NVML sees the whole board: a MIG slice (or a mismatched board) reports another total.
        if free is not None and free > total.value * 1.05:
            free = None
    if free is None:
        ctx = ctypes.c_void_p()
        if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0:
            raise OverspillError(f"cannot read free memory of CUDA device {device} (NVML unavailable, no context)")
        try:
            if cuda.cuCtxPushCurrent_v2(ctx) != 0:
                raise OverspillError(f"cannot read free memory of CUDA device {device}")
            try:
                f, t = ctypes.c_size_t(), ctypes.c_size_t()
                if cuda.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) != 0:
                    raise OverspillError(f"cannot read free memory of CUDA device {device}")
                free = f.value
            finally:
                cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        finally:
            cuda.cuDevicePrimaryCtxRelease_v2(dev)
    return int(free), int(total.value)


def _probe_platform(device: int) -> tuple[bool, int, int]:
    """(coherent, free bytes, total bytes) of CUDA device `device`, from the driver and NVML.

    Raises:
        OverspillError: the device cannot allocate managed memory at all (some VMs and MIG setups).
    """
    from . import cuda_driver
    from .hardware import coherent_platform

    free, total = _gpu_memory(device)
    if not cuda_driver.device_attribute(device, cuda_driver.MANAGED_MEMORY):
        raise OverspillError(f"CUDA device {device} does not support managed memory here; {_STREAMING_HINT}")
    return coherent_platform(device), free, total


def _apply(decision: UnifiedMemoryDecision, device: int) -> None:
    """Make RMM managed memory torch's CUDA allocator, limited to `decision.pool_bytes`."""
    import torch

    try:  # `import rmm` first: it loads librmm.so, which the torch allocator's extension needs
        import rmm
        import rmm.mr
    except (ImportError, OSError) as exc:  # installed but unusable (CUDA bindings, librmm.so)
        raise OverspillError(f"RMM is installed but does not load ({exc}); reinstall it: {RMM_EXTRA_HINT}") from None
    try:
        from rmm.allocators.torch import rmm_torch_allocator
    except ImportError:  # RMM before 23.04 exported it at the top level
        rmm_torch_allocator = getattr(rmm, "rmm_torch_allocator", None)
    if rmm_torch_allocator is None:
        raise OverspillError(
            "RMM has no PyTorch allocator here (rmm.allocators.torch.rmm_torch_allocator is None): its "
            f"CUDA build must match torch's (CUDA {torch.version.cuda}); reinstall with {RMM_EXTRA_HINT}"
        )
    # Managed memory with no pool on top: construction allocates nothing, so the resource is not
    # tied to the device active now; RMM's torch allocator selects `device` on every call.
    mr = rmm.mr.ManagedMemoryResource()
    if decision.pool_bytes is not None:
        # The process can never hold more managed memory than decided: past it, allocations fail
        # with an out-of-memory error instead of oversubscribing the GPU.
        mr = rmm.mr.LimitingResourceAdaptor(mr, allocation_limit=decision.pool_bytes)
    rmm.mr.set_per_device_resource(device, mr)
    try:
        torch.cuda.memory.change_current_allocator(rmm_torch_allocator)
    except RuntimeError as exc:
        raise OverspillError(
            f"cannot swap torch's CUDA allocator ({str(exc).splitlines()[0]}): call enable_unified_memory() "
            f"before anything touches CUDA (before loading any model or creating CUDA tensors)"
        ) from None


def enable_unified_memory(
    pool_size: int | str | None = None,
    allow_oversubscription: bool = False,
    device: int = 0,
) -> UnifiedMemoryDecision:
    """Route all of torch's CUDA allocations through RMM managed (unified) memory.

    Call it first, before anything touches CUDA; then plain `transformers` code
    (`pipeline("text-generation", model=..., device="cuda")`) loads into managed memory. Pass
    `device=`, not `device_map=`: with a pluggable allocator torch cannot report memory statistics
    (`torch.cuda.memory_allocated` raises), which transformers reads when given a device map.

    Args:
        pool_size: most managed memory the process may hold: "40GiB", bytes, or None for the
            platform's default (unlimited on a coherent GH200/GB200; free GPU memory minus 2 GiB
            elsewhere).
        allow_oversubscription: on a non-coherent GPU, grant a `pool_size` larger than free GPU
            memory anyway (with a warning). It pages on faults and can hang the GPU: prefer
            `overspill.load(model, gpu_memory=...)`, which streams layers at link speed.
        device: CUDA device index whose allocations use managed memory.

    Returns:
        The `UnifiedMemoryDecision` applied. A second call with the same arguments returns it again.

    Raises:
        OverspillError: no CUDA GPU, RMM not installed, CUDA already initialised by torch, or a
            refused oversubscription; the message says what to do.
    """
    global _ENABLED
    requested = None if pool_size is None else parse_bytes(pool_size, "pool_size")
    key = (requested, bool(allow_oversubscription), int(device))
    if _ENABLED is not None:
        if _ENABLED[0] == key:
            return _ENABLED[1]
        raise OverspillError(
            f"unified memory is already enabled in this process ({_ENABLED[1].message}); torch's allocator "
            f"cannot be changed again, so restart the process to use other settings"
        )
    import torch

    if not torch.cuda.is_available():
        raise OverspillError("unified memory needs a CUDA GPU; on this machine use overspill.load(...) which runs on CPU")
    if not _rmm_installed():
        cuda = torch.version.cuda
        raise OverspillError(
            f"unified memory needs RMM, which is not installed: {RMM_EXTRA_HINT}; torch here is built for "
            f"CUDA {cuda or 'unknown'}, so that is {_rmm_package_for(cuda)}"
        )
    if torch.cuda.is_initialized():
        raise OverspillError(
            "CUDA is already initialised in this process: call enable_unified_memory() before anything touches "
            "CUDA (before loading any model or creating CUDA tensors)"
        )
    coherent, free, total = _probe_platform(device)
    decision = decide(coherent, free, total, requested, allow_oversubscription)
    if decision.refused:
        raise OverspillError(decision.message)
    if decision.oversubscribed:
        warnings.warn(decision.message, RuntimeWarning, stacklevel=2)
    _apply(decision, device)
    _ENABLED = (key, decision)
    return decision
