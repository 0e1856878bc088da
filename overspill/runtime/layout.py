"""Flat byte layouts: all tensors of one layer packed into one buffer, so a layer moves in one copy.

Also allocates that buffer in page-locked host memory. torch's pinned allocator rounds every
request up to a power of two (a 436 MB Llama-3-8B layer would take 512 MB); registering an
ordinary allocation with `cudaHostRegister` pins exactly the bytes asked for.

Unlocking (`cudaHostUnregister`) must wait for every copy that may still read the pages, so it
synchronizes the device. Owners that can say when they are done (`PinnedHost.close`, e.g.
`TieredCache.close`) unlock explicitly; otherwise the pages are unlocked when their last view dies,
by a finalizer that never syncs inside a CUDA graph capture on its thread: there it defers the
unlock to the next safe point (the next pinned allocation, `close`, or `release_deferred`).
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

ALIGN = 256  # bytes; keeps every view aligned for vectorised kernels


@dataclass(frozen=True)
class TensorEntry:
    name: str  # qualified name inside the layer, e.g. "self_attn.q_proj.weight"
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class LayerLayout:
    entries: tuple[TensorEntry, ...]
    nbytes: int

    @classmethod
    def of(cls, named: list[tuple[str, tuple[int, ...], torch.dtype]]) -> "LayerLayout":
        entries = []
        offset = 0
        for name, shape, dtype in named:
            entry = TensorEntry(name, offset, tuple(shape), dtype)
            entries.append(entry)
            offset += -(-entry.nbytes // ALIGN) * ALIGN
        return cls(tuple(entries), offset)

    @property
    def signature(self) -> tuple:
        """Layers with equal signatures can share one set of views per ring slot."""
        return tuple((e.offset, e.shape, e.dtype) for e in self.entries)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Typed, shaped views of `buffer` (a flat uint8 tensor) in entry order."""
        return [buffer[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]


def _capturing() -> bool:
    """Whether this thread is capturing a CUDA graph, where a device sync would invalidate the capture."""
    if not torch.cuda.is_initialized():
        return False
    try:
        return torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # CUDA already torn down at interpreter exit
        return False


# Pages whose release came during a capture, with their buffer (kept mapped until it is unregistered).
_deferred: deque[tuple[torch.Tensor, int]] = deque()


def _release(pages: list[tuple[torch.Tensor, int]]) -> None:
    """Unlock `pages` (buffer, pointer) and any deferred ones once no copy can still read them: a KV
    prefetch issued ahead on a side stream may outlive the cache that owned them, hence one device
    sync first. During a capture on this thread that sync would break the graph: defer instead."""
    if _capturing():
        _deferred.extend(pages)
        return
    while _deferred:  # popleft is atomic: a finalizer on another thread may append meanwhile
        try:
            pages.append(_deferred.popleft())
        except IndexError:
            break
    if not pages:
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError:  # CUDA already torn down at interpreter exit
        return
    cudart = torch.cuda.cudart()
    for _, ptr in pages:
        cudart.cudaHostUnregister(ptr)


def release_deferred() -> None:
    """Unlock pages whose last view died during a CUDA graph capture; call at a point a device sync is
    safe (every pinned allocation and `PinnedHost.close` do it too)."""
    _release([])


def _finalize(buf: torch.Tensor, ptr: int) -> None:
    _release([(buf, ptr)])


class _PinnedPages:
    """Owns a registered host buffer; the tensors `pinned_bytes` makes over it keep it alive (through
    numpy), so the pages stay locked as long as any view of them exists, and are unlocked only then."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.__array_interface__ = {"shape": (buf.numel(),), "typestr": "|u1", "data": (buf.data_ptr(), False),
                                    "version": 3}


def _pin(nbytes: int) -> tuple[torch.Tensor, weakref.finalize | None]:
    """A page-locked flat uint8 tensor and the finalizer that unlocks it (None: nothing to unlock)."""
    release_deferred()
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes == 0:
        return buf, None
    ptr = buf.data_ptr()
    err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        # Registration can fail under locked-memory limits; torch's allocator may still succeed.
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None
    owner = _PinnedPages(buf)
    return torch.from_numpy(np.asarray(owner)), weakref.finalize(owner, _finalize, buf, ptr)


def pinned_bytes(nbytes: int) -> torch.Tensor:
    """A flat uint8 host tensor whose pages are locked for DMA (exact size, no rounding), for as long
    as it or any view of it lives (a `PinnedHost` unlocks them at a time of its owner's choosing)."""
    return _pin(nbytes)[0]


def host_bytes(nbytes: int, pinned: bool) -> torch.Tensor:
    """Host staging for one layer: page-locked when a CUDA device will read it."""
    return pinned_bytes(nbytes) if pinned else torch.empty(nbytes, dtype=torch.uint8)


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A typed host tensor, page-locked when a CUDA device will read it (the host KV tier, the prefix pool)."""
    return host_bytes(math.prod(shape) * dtype.itemsize, pinned).view(dtype).view(shape)


class PinnedHost:
    """The pinned host tensors of one owner (a cache's host tier), unlocked together by `close()`.

    Unlocking synchronizes the device, so it happens where the owner says, not whenever the garbage
    collector runs (graph captures had to turn the collector off around themselves). Tensors stay
    valid after `close`, as pageable memory; tensors never closed are unlocked with their last view.
    """

    def __init__(self) -> None:
        self._finalizers: list[weakref.finalize] = []

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype, pinned: bool = True) -> torch.Tensor:
        """A typed host tensor of this owner, page-locked when `pinned` (a CUDA device will read it)."""
        if not pinned:
            return torch.empty(shape, dtype=dtype)
        flat, finalizer = _pin(math.prod(shape) * dtype.itemsize)
        if finalizer is not None:
            self._finalizers.append(finalizer)
        return flat.view(dtype).view(shape)

    def close(self) -> None:
        """Unlock every page of this owner now, after one device sync (deferred if this thread is
        capturing a CUDA graph). Idempotent; pages already unlocked by their finalizer are skipped."""
        pages = []
        for finalizer in self._finalizers:
            detached = finalizer.detach()  # None once the finalizer ran
            if detached is not None:
                pages.append(tuple(detached[2]))
        self._finalizers.clear()
        _release(pages)

    def __enter__(self) -> "PinnedHost":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
