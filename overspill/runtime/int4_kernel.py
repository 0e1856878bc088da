"""int4 expansion in one Triton launch per weight (`quant._expand_int4`'s CUDA path).

`dst[rows, cols]` = `q * scale + (zero - 8 * scale)` by groups, q the codes of `packed[rows, cols // 2]`
(the even column in the high nibble), `scale` and `zero` bf16 [rows, groups]. Each program reads a tile of
`BLOCK_ROWS` rows by up to `BLOCK_BYTES` packed bytes once, with one scale and zero per row and group,
and writes both codes of each byte as one word: the two outputs' bits side by side (the even column in the
low half: little-endian), so a byte's pair is one 4-byte store (8 for float32) and a thread's run of bytes
one vector. The arithmetic is the torch path's, so the bits are the same: in float32, shift = zero - 8 * scale
(exact: 8 * scale is, and a bf16 minus a bf16 of the same magnitude fits 24 bits; in any case one
rounding, the same in both), then shift + q * scale (q * scale is exact in float32, so a fused multiply-add
rounds as a multiply then an add), then one round-to-nearest-even into the destination dtype: for bf16 in
integer arithmetic on the float32 bits (`(bits + 0x7FFF + lsb) >> 16`, what torch's cast and the GPU's
`cvt.rn.bf16.f32` give for every value but NaN, which finite scales and zeros never produce; Triton's
interpreter truncates instead, so written out it checks on the CPU too), for fp16 Triton's default
round-to-nearest-even cast (`cvt.rn.f16.f32`, as torch's), float32 stored as computed.

Triton is imported when the kernel is first built, so the package imports without it; any failure to build
or compile leaves `expand_int4` answering False for good, and the caller's torch path writes the weight.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

BLOCK_ROWS = 16  # rows a program expands
BLOCK_BYTES = 256  # packed bytes of each row a program reads (512 outputs): 4 KiB in, 16 KiB of bf16 out
NUM_WARPS = 4
# The word two outputs of a byte share, and the kernel's code for the destination dtype
WORDS = {torch.bfloat16: (torch.int32, 0), torch.float16: (torch.int32, 1), torch.float32: (torch.int64, 2)}
STORES = (torch.bfloat16,)  # the scale and zero dtypes the kernel takes: those checked on a GPU

_kernel = None  # the built Triton function; False once building, compiling or a launch failed here


def build():
    """The Triton kernel, defined on call (the import of Triton with it); raises ImportError without Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def _expand(packed, scale, zero, words, rows, groups, packed_row, scale_row, zero_row, words_row,
                HALF_GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_GROUPS: tl.constexpr, OUT: tl.constexpr):
        # a tile [BLOCK_ROWS, BLOCK_GROUPS, HALF_GROUP] of packed bytes (rows in int64: fused experts exceed 2^31)
        row = (tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS))[:, None, None]
        group = (tl.program_id(1) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS))[None, :, None]
        byte = group * HALF_GROUP + tl.arange(0, HALF_GROUP)[None, None, :]  # a row's packed byte = output word
        keep = (row < rows) & (group < groups)  # [R, G, 1]: whole groups, so the loads and stores stay vectors
        code = tl.load(packed + row * packed_row + byte, mask=keep, other=0).to(tl.int32)  # zero-extended
        s = tl.load(scale + row * scale_row + group, mask=keep, other=0).to(tl.float32)  # [R, G, 1]
        z = tl.load(zero + row * zero_row + group, mask=keep, other=0).to(tl.float32)
        shift = z - 8.0 * s
        even = shift + (code >> 4).to(tl.float32) * s  # the even column: the high nibble
        odd = shift + (code & 15).to(tl.float32) * s
        if OUT == 0:  # bf16: round to nearest even on the bits
            e = even.to(tl.uint32, bitcast=True)
            o = odd.to(tl.uint32, bitcast=True)
            e = (e + 0x7FFF + ((e >> 16) & 1)) >> 16
            o = (o + 0x7FFF + ((o >> 16) & 1)) >> 16
            word = (e | (o << 16)).to(tl.int32, bitcast=True)
        elif OUT == 1:  # fp16
            e = even.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
            o = odd.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
            word = (e | (o << 16)).to(tl.int32, bitcast=True)
        else:  # float32
            e = even.to(tl.uint32, bitcast=True).to(tl.uint64)
            o = odd.to(tl.uint32, bitcast=True).to(tl.uint64)
            word = (e | (o << 32)).to(tl.int64, bitcast=True)
        tl.store(words + row * words_row + byte, word, mask=keep)

    return _expand


def launch(kernel, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dst: torch.Tensor) -> bool:
    """Run `kernel` (from `build`) once to write `dst` [rows, cols] from `packed` [rows, cols // 2] and
    `scale`, `zero` [rows, groups(, 1)] on the current stream. False, writing nothing, where the kernel
    does not take these tensors: another dtype (of `dst`; or scales and zeros not bf16, the only ones
    checked on a GPU), a group that is not a power of two, columns not contiguous, or `dst` not aligned
    to the word its byte pairs fill."""
    import triton

    rows, cols = dst.shape
    groups = scale.shape[1]
    half = cols // 2
    if (dst.dtype not in WORDS or packed.dtype != torch.uint8 or cols % 2 or half % groups or scale.dtype not in STORES
            or zero.dtype != scale.dtype):
        return False  # e.g. a pre-quantized checkpoint's float32 scales and zeros, or signed codes: the torch path
    half_group = half // groups
    if half_group & (half_group - 1) or packed.stride(-1) != 1 or scale.stride(1) != 1 or zero.stride(1) != 1:
        return False
    word, out = WORDS[dst.dtype]
    try:
        words = dst.view(word)  # [rows, cols // 2]
    except RuntimeError:
        return False
    if rows == 0 or cols == 0:
        return True
    block_groups = max(1, min(BLOCK_BYTES // half_group, triton.next_power_of_2(groups)))
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(groups, block_groups))
    args = (packed, scale, zero, words, rows, groups, packed.stride(0), scale.stride(0), zero.stride(0), words.stride(0))
    meta = dict(HALF_GROUP=half_group, BLOCK_ROWS=BLOCK_ROWS, BLOCK_GROUPS=block_groups, OUT=out, num_warps=NUM_WARPS)
    if dst.is_cuda and dst.device.index != torch.cuda.current_device():
        with torch.cuda.device(dst.device):  # Triton launches on the current device
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)
    return True


def expand_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dst: torch.Tensor) -> bool:
    """Write `dst` with the Triton kernel, built on the first call (the decision kept): True when it did;
    False when Triton is missing or failed here (said once in the log) or the kernel does not take these
    tensors, and the caller's torch path must."""
    global _kernel
    if _kernel is False:
        return False
    try:
        if _kernel is None:
            _kernel = build()
        return launch(_kernel, packed, scale, zero, dst)
    except Exception as e:  # no Triton, no compiler for this GPU, ...: the torch path from now on
        _kernel = False
        log.warning("int4 expansion falls back to torch (%s: %s)", type(e).__name__, e)
        return False
