"""Flat byte layouts: all tensors of one layer packed into one buffer, so a layer moves in one copy.

Also allocates that buffer in page-locked host memory. torch's pinned allocator rounds every
request up to a power of two (a 436 MB Llama-3-8B layer would take 512 MB); registering an
ordinary allocation with `cudaHostRegister` pins exactly the bytes asked for.
"""

from __future__ import annotations

import math
import weakref
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
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


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


def _unregister(ptr: int) -> None:
    """Unlock pages once no copy can still read them: a KV prefetch issued ahead on a side stream may
    outlive the cache that owned them."""
    try:
        torch.cuda.synchronize()
    except RuntimeError:  # CUDA already torn down at interpreter exit
        return
    torch.cuda.cudart().cudaHostUnregister(ptr)


class _PinnedPages:
    """Owns a registered host buffer; the tensors `pinned_bytes` makes over it keep it alive (through
    numpy), so the pages stay locked as long as any view of them exists, and are unlocked only then."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.__array_interface__ = {"shape": (buf.numel(),), "typestr": "|u1", "data": (buf.data_ptr(), False),
                                    "version": 3}


def pinned_bytes(nbytes: int) -> torch.Tensor:
    """A flat uint8 host tensor whose pages are locked for DMA (exact size, no rounding), for as long
    as it or any view of it lives."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes == 0:
        return buf
    ptr = buf.data_ptr()
    err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        # Registration can fail under locked-memory limits; torch's allocator may still succeed.
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    owner = _PinnedPages(buf)
    weakref.finalize(owner, _unregister, ptr)
    return torch.from_numpy(np.asarray(owner))


def host_bytes(nbytes: int, pinned: bool) -> torch.Tensor:
    """Host staging for one layer: page-locked when a CUDA device will read it."""
    return pinned_bytes(nbytes) if pinned else torch.empty(nbytes, dtype=torch.uint8)


def host_tensor(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A typed host tensor, page-locked when a CUDA device will read it (the host KV tier, the prefix pool)."""
    return host_bytes(math.prod(shape) * dtype.itemsize, pinned).view(dtype).view(shape)
