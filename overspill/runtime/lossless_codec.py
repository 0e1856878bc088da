"""Entropy codecs for the high byte plane of streamed layers: nvCOMP ANS on CUDA, zlib on the CPU.

The high byte of a bf16 weight is its sign and 7 exponent bits; trained (and N(0, s)) weights use
few exponents, so that plane carries ~3 bits of entropy a byte. nvCOMP's ANS codec shrank it to
0.365 and decoded at 137 GB/s on the H200 (faster than the 54 GB/s link, so decoding hides behind
the next copy). On the CPU, for the tests and for CPU-only loads, the same container uses zlib
from the standard library (slower and a little larger, but bit-exact the same way).

nvCOMP's Python API (`nvidia.nvcomp`, wheels nvidia-nvcomp-cu13 + nvidia-libnvcomp-cu13, 6.0) as its
docstrings give it: `Codec(algorithm="ANS", cuda_stream=...)` bound to a stream, `as_array` wrapping
torch tensors without a copy, `encode` returning a device `Array` (`buffer_size`, `__dlpack__`),
`decompression_config(coded)` parsing a header once (a sync) for reuse on every chunk of the same
decompressed size, and `decode(src, out=dst, decompression_config=...)` writing into a preallocated
buffer without a sync. The module imports on a CPU-only machine but runs only on a GPU
(tests/test_gpu_formats.py).

This module imports torch only inside the codecs, so `overspill plan` can ask `codec_installed()`.
"""

from __future__ import annotations

import importlib.util
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ZLIB_LEVEL = 6


def codec_installed() -> bool:
    """Whether nvCOMP's Python package is importable (nothing is imported to find out)."""
    try:
        return importlib.util.find_spec("nvidia.nvcomp") is not None
    except (ModuleNotFoundError, ValueError):  # no `nvidia` namespace at all
        return False


class ZlibPlane:
    """The CPU codec: zlib over the plane's bytes."""

    name = "zlib"

    def encode(self, plane: "torch.Tensor") -> "torch.Tensor":
        import torch

        data = zlib.compress(plane.contiguous().numpy().tobytes(), ZLIB_LEVEL)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def decode(self, encoded: "torch.Tensor", out: "torch.Tensor") -> None:
        import torch

        raw = zlib.decompress(encoded.numpy().tobytes())
        out.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


class NvcompAns:
    """nvCOMP's ANS codec on the GPU, bound to one CUDA stream (the ring's expand stream, which also
    codes the layers at load). Each decode passes a decompression config, kept per decompressed size,
    so it needs no host sync; a config is parsed once from the first coded chunk of its size (that one
    call syncs: at load for the chunks this process codes, at the first decode for cached ones)."""

    name = "nvcomp-ans"

    def __init__(self, stream: "torch.cuda.Stream"):
        from nvidia import nvcomp

        self.nvcomp = nvcomp
        self.stream = stream
        self.codec = nvcomp.Codec(algorithm="ANS", cuda_stream=stream.cuda_stream)
        self._configs: dict[int, object] = {}

    def _array(self, tensor: "torch.Tensor"):
        return self.nvcomp.as_array(tensor, cuda_stream=self.stream.cuda_stream)

    def _config(self, coded, size: int):
        if size not in self._configs:
            self._configs[size] = self.codec.decompression_config(coded)
        return self._configs[size]

    def encode(self, plane: "torch.Tensor") -> "torch.Tensor":
        """Compress a device uint8 plane; returns the compressed bytes as a device tensor (syncs: load time)."""
        import torch

        encoded = self.codec.encode(self._array(plane.contiguous()))
        self._config(encoded, plane.numel())
        self.stream.synchronize()
        size = int(encoded.buffer_size)
        return torch.from_dlpack(encoded).reshape(-1).view(torch.uint8)[:size].clone()

    def decode(self, encoded: "torch.Tensor", out: "torch.Tensor") -> None:
        """Decompress device bytes into `out` (device uint8, exactly the decompressed size), enqueued on the stream."""
        src = self._array(encoded)
        self.codec.decode(src, out=self._array(out), decompression_config=self._config(src, out.numel()))


def plane_codec(device: "torch.device", stream: "torch.cuda.Stream | None" = None) -> ZlibPlane | NvcompAns:
    """The codec for `device`: nvCOMP ANS on CUDA (on `stream`, else the current one), zlib on the CPU."""
    if device.type != "cuda":
        return ZlibPlane()
    import torch

    return NvcompAns(stream or torch.cuda.current_stream(device))
