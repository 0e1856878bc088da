"""Streamed layers in a stream format: their encoded host layout, encoding at load, expansion in the slot.

A streamed layer normally sits in pinned host memory exactly as it computes (`layout.LayerLayout`).
In a stream format (`overspill.planning.formats`) its host buffer holds the encoded bytes instead;
the ring copies them into one of two staging buffers and expands them into the layer's slot on the
GPU, on a side stream ordered by events (`streams.CudaCopier.copy_expand`), so the next copy and
earlier layers' compute overlap it. Only streamed layers change; resident ones stay in the compute dtype.

- `LossyLayer` (int8 / fp8 / int4): per tensor, matrices quantized (`quant`), vectors raw; the
  layout follows from the shapes alone, so the planner knows the exact bytes before loading.
- `LosslessLayer`: the whole flat layer split into byte planes: the low plane(s) raw, the high plane
  (sign and exponent bits) entropy-coded (`lossless_codec`); the expansion decodes the high plane into
  a scratch buffer and interleaves the planes into the slot in one kernel. Identical bits.

Encoding happens layer by layer in the first ring slot and staging buffer (on the GPU when there is
one), so loading needs no host copy of the model beyond the encoded host buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import OverspillError
from ..planning.formats import LOSSLESS_CHUNK, LOSSY, NATIVE, STAGING_BUFFERS
from . import quant
from .layout import ALIGN, LayerLayout, TensorEntry
from .lossless_codec import plane_codec


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# (kind, entry) -> (the entry's kind, the (shape, dtype) of each of its parts): "raw" keeps it as it is
PartsOf = Callable[[str, TensorEntry], tuple[str, list[tuple[tuple[int, ...], torch.dtype]]]]


def _own_parts(kind: str, entry: TensorEntry) -> tuple[str, list[tuple[tuple[int, ...], torch.dtype]]]:
    if quant.encodable(kind, entry.shape, entry.dtype):
        return kind, quant.part_shapes(kind, entry.shape)
    return "raw", [(entry.shape, entry.dtype)]


@dataclass(frozen=True)
class EncodedTensor:
    entry: TensorEntry  # where it expands to in the layer layout
    kind: str  # "raw" or a lossy kind
    parts: tuple[quant.Part, ...]


@dataclass(frozen=True)
class LossyLayer:
    """A layer's tensors in int8 / fp8 / int4 (matrices) or raw (the rest), packed in one flat buffer."""

    tensors: tuple[EncodedTensor, ...]
    nbytes: int

    @classmethod
    def of(cls, kind: str, layout: LayerLayout, parts_of: PartsOf | None = None) -> "LossyLayer":
        """The layer's tensors quantized by `kind` where `quant.encodable`, raw otherwise; or, with `parts_of`
        (a pre-quantized checkpoint's: `runtime.prequantized`), what it says for each entry."""
        tensors, offset = [], 0
        for entry in layout.entries:
            k, shapes = (parts_of or _own_parts)(kind, entry)
            parts = []
            for shape, dtype in shapes:
                part = quant.Part(offset, tuple(shape), dtype)
                parts.append(part)
                offset += _align(part.nbytes)
            tensors.append(EncodedTensor(entry, k, tuple(parts)))
        return cls(tuple(tensors), offset)

    def encode(self, layout: LayerLayout, raw: torch.Tensor, staging: torch.Tensor) -> None:
        """Encode the layer in `raw` (flat, `layout`) into `staging` (flat, same device)."""
        for t, src in zip(self.tensors, layout.views(raw)):
            parts = [p.view(staging) for p in t.parts]
            if t.kind == "raw":
                parts[0].copy_(src)
            else:
                quant.encode(t.kind, src, parts)

    def expand(self, staging: torch.Tensor, slot: torch.Tensor, expander: "Expander") -> None:
        for t in self.tensors:
            out = slot[t.entry.offset : t.entry.offset + t.entry.nbytes].view(t.entry.dtype).view(t.entry.shape)
            parts = [p.view(staging) for p in t.parts]
            if t.kind == "raw":
                out.copy_(parts[0])
            else:
                quant.expand(t.kind, parts, out, expander.scratch)


CODE_CHUNK = LOSSLESS_CHUNK  # high-plane bytes coded as one stream: bounds the codec's buffers and the scratch


@dataclass(frozen=True)
class LosslessLayer:
    """A flat layer as byte planes: `low` ([elements, itemsize - 1], raw), then the top plane coded in
    `chunks` of up to `CODE_CHUNK` bytes each, one after another (each aligned)."""

    elements: int
    itemsize: int
    low: quant.Part
    chunks: tuple[quant.Part, ...]

    @property
    def high(self) -> quant.Part:
        """Every coded chunk, as one span of the buffer."""
        return quant.Part(self.chunks[0].offset, (self.nbytes - self.chunks[0].offset,), torch.uint8)

    @property
    def nbytes(self) -> int:
        return self.chunks[-1].offset + self.chunks[-1].nbytes

    @staticmethod
    def low_bytes(layout: LayerLayout) -> int:
        return layout.nbytes - layout.nbytes // itemsize_of(layout)

    def expand(self, staging: torch.Tensor, slot: torch.Tensor, expander: "Expander") -> None:
        """Each coded chunk decoded into the scratch, then interleaved with its rows of the low planes into
        the slot: the scratch holds one chunk, not the layer's whole high plane."""
        codec = expander.codec()
        low = self.low.view(staging)
        out = slot[: self.elements * self.itemsize].view(self.elements, self.itemsize)
        for k, chunk in enumerate(self.chunks):
            start, end = k * CODE_CHUNK, min(self.elements, (k + 1) * CODE_CHUNK)
            high = expander.scratch[: end - start]
            codec.decode(chunk.view(staging), high)
            torch.cat([low[start:end], high.view(-1, 1)], dim=1, out=out[start:end])


def itemsize_of(layout: LayerLayout) -> int:
    """The one element size of a layer's tensors (lossless splits bytes by their place in an element)."""
    sizes = {e.dtype.itemsize for e in layout.entries}
    if len(sizes) != 1:
        raise OverspillError("stream format lossless needs every tensor of a layer in one dtype; "
                             "use --stream-format bf16")
    return sizes.pop()


def encode_lossless(layout: LayerLayout, raw: torch.Tensor, staging: torch.Tensor,
                    expander: "Expander") -> tuple[LosslessLayer, torch.Tensor]:
    """Split `raw` into planes: the low plane(s) into `staging`, the high plane coded.

    Each coded chunk moves to host memory as soon as it is made, so the device holds one chunk's
    code beyond the plan's staging and scratch at a time (a layer's whole coded plane on the device,
    twice over, took the 8B shape at 6 GiB past its budget on an H100).

    Returns:
        (the layer's layout, the coded high plane in host memory).
    """
    size = itemsize_of(layout)
    n = layout.nbytes // size
    planes = raw[: n * size].view(n, size)
    low = quant.Part(0, (n, size - 1), torch.uint8)
    with expander.on_stream():
        low.view(staging).copy_(planes[:, : size - 1])
        codec = expander.codec()
        pieces = []
        for start in range(0, n, CODE_CHUNK):  # a chunk of the high plane at a time through the scratch
            high = expander.scratch[: min(n - start, CODE_CHUNK)]
            high.copy_(planes[start : start + high.numel(), size - 1])
            pieces.append(codec.encode(high).cpu())
    chunks, offset = [], _align(low.nbytes)
    for piece in pieces:
        chunks.append(quant.Part(offset, (piece.numel(),), torch.uint8))
        offset = _align(offset + piece.numel())
    layer = LosslessLayer(n, size, low, tuple(chunks))
    coded = torch.zeros(layer.high.nbytes, dtype=torch.uint8)  # the chunks with their padding
    for chunk, piece in zip(chunks, pieces):
        coded[chunk.offset - layer.high.offset :][: piece.numel()].copy_(piece)
    return layer, coded


class Expander:
    """What expansions share: `STAGING_BUFFERS` staging buffers the link's bytes land in (used in turn),
    the scratch buffer (lossless decodes the high plane there; one suffices, as expansions run one
    after another on one stream), and on CUDA the stream they run on with its one plane codec, which
    also codes the layers at load (nvCOMP's decode configs belong to the codec that makes them)."""

    def __init__(self, device: torch.device, staging_bytes: int, scratch_bytes: int):
        self.device = device
        self.staging = [torch.empty(staging_bytes, dtype=torch.uint8, device=device) for _ in range(STAGING_BUFFERS)]
        self.scratch = torch.empty(scratch_bytes, dtype=torch.uint8, device=device)
        self.turn = 0  # staging buffer of the next copy
        self.stream = torch.cuda.Stream(device=device, priority=-1) if device.type == "cuda" else None
        self._codec = None

    def grow_staging(self, nbytes: int) -> None:
        """Make every staging buffer hold `nbytes` (a lossless layer's size is known once it is coded)."""
        if nbytes > self.staging[0].numel():
            count = len(self.staging)
            self.staging.clear()  # the old buffers go first: the new ones may reuse their memory
            self.staging.extend(torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(count))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.staging) + self.scratch.numel()

    def next_staging(self) -> int:
        index, self.turn = self.turn, (self.turn + 1) % len(self.staging)
        return index

    def codec(self):
        """The plane codec: nvCOMP on this expander's stream (CUDA), zlib on the CPU."""
        if self._codec is None:
            self._codec = plane_codec(self.device, self.stream)
        return self._codec

    @contextlib.contextmanager
    def on_stream(self):
        """Run the body on the expander's stream, ordered after and before the current stream's work."""
        if self.stream is None:
            yield
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)


def lossy_layout(fmt: str, layout: LayerLayout) -> LossyLayer:
    if fmt not in LOSSY:
        raise ValueError(f"{fmt!r} is not a lossy stream format")
    return LossyLayer.of(fmt, layout)


def staging_bytes_at_load(fmt: str, layout: LayerLayout) -> int:
    """Staging a layer needs while it is encoded in a slot: its exact encoded size (lossy), or its
    raw low planes (lossless; the coded plane goes straight to the host)."""
    if fmt == "lossless":
        return _align(LosslessLayer.low_bytes(layout))
    return 0 if fmt == NATIVE else lossy_layout(fmt, layout).nbytes
