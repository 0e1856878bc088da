"""Lossy tensor codecs for streamed weights: int8, fp8 (e4m3) and int4 groupwise, encode and expand.

Each weight is treated as [rows, cols] (rows = every leading dim, so fused expert tensors work
too) and quantized along its last dim. Encoding runs once at load, on the GPU when there is one;
expansion runs every step, into the compute dtype in a ring slot, with plain torch ops (int4 on CUDA:
one Triton kernel) that write the slot directly (no full-size temporaries):
- int8: symmetric, a float32 scale per group of `SCALED_GROUP` inputs (absmax / 127); one fused
  multiply `q * scale` of [rows, groups, group] codes by [rows, groups, 1] scales into the slot. A GGUF's
  Q5_1 / Q5_K codes (0..31) pass through with a third part, a float32 shift per group: one fused
  `q * scale + shift` (the product exact, the sum rounded once in float32, as gguf computes it).
- fp8: e4m3 codes, a float32 scale per group of `SCALED_GROUP` inputs; a cast into the slot (e4m3 is
  exact in bf16) then a multiply by the groups' scales. e4m3's grid repeats at every power of two, so
  mapping the group's largest magnitude to 448 is only one of many equally valid scales: encoding tries
  `FP8_SCALE_TRIES` of them across one octave above it and keeps, per group, the one with the least
  squared error (a fifth less than the largest-to-448 scale alone on N(0, 0.02) groups of 128).
  An int8 / fp8 weight whose inputs no group size of 32 or more divides gets one scale per row.
- int4: asymmetric groups of `group` inputs with a bf16 scale and zero each, `w ~ (q - 8) * scale + zero`
  with q in 0..15 (the convention of torch's int4 kernels and of `runtime.self_draft`); two codes a
  byte, the even column in the high nibble. Expansion writes `q * scale + (zero - 8 * scale)` into the
  slot (float32 arithmetic, one rounding into the compute dtype). Where a checkpoint's codes pass through
  (GPTQ, AWQ, GGUF Q4_0 / Q4_1 / Q4_K: `runtime.prequantized`) the scale and the third part are float32 and
  that part is the shift itself, `w = q * scale + shift`: its shift (-z * scale, -dmin * m, m) is exact in
  float32 where zero = shift + 8 * scale need not be, and adding it as it is keeps the checkpoint's arithmetic.
  Signed int4 (`part_shapes(signed=True)`: GGUF Q4_0's q - 8) has two parts, codes as two's-complement nibbles
  (int8, -8..7) and a float32 scale, and expands with one multiply `q * scale`, gguf's `(q - 8) * d` bit for bit
  (-0.0s included, which `q * d - 8d` on unsigned codes would turn into +0.0), as int8 without shifts. On CUDA
  bf16 stores take one Triton launch per weight (`runtime.int4_kernel`: each program reads a tile of packed
  bytes once and writes both codes' values), bit for bit the torch path's; the torch path (the nibbles
  unpacked into a byte a code in the expander's scratch, a chunk of rows at a time, then one fused
  multiply-add into the slot, about 100 launches a layer of the 8B shape) stays as the CPU's and as the
  fallback where Triton is missing or fails. The H100 spent 3.6 ms a layer of the 8B shape expanding with
  torch ops beside 2.1 ms of link (int4 at 0.54 of its link floor); the Triton kernel's time is not yet
  measured on a GPU (`bench/int4_expand.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..planning.formats import INT4_CHUNK_CODES, INT4_GROUP, SCALED_GROUP, int4_scratch_bytes
from . import int4_kernel
from .self_draft import QUANT_ROWS, _group_for

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
INT4_STORE = torch.bfloat16  # scales and zeros of int4 groups
ENCODE_ELEMENTS = 2**23  # weights quantized at once: 32 MiB float32 temporaries
FP8_SCALE_TRIES = 16  # fp8 scales tried per group: largest magnitude / 448 x 2^(k / 16), k = 0..15


@dataclass(frozen=True)
class Part:
    """One tensor of an encoded layer, at `offset` bytes in its flat buffer."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    cols = shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows, cols


def int4_group(shape: tuple[int, ...]) -> int | None:
    """The group size an int4 weight of `shape` uses (None: it travels raw)."""
    if len(shape) < 2 or shape[-1] % 2:
        return None
    return _group_for(shape[-1], INT4_GROUP)


def scaled_group(shape: tuple[int, ...]) -> int:
    """Inputs per scale of an int8 / fp8 weight of `shape`: the largest of 256, 128, 64, 32 up to
    `SCALED_GROUP` that divides its inputs, as int4 picks, else the whole row (one scale per row)."""
    return _group_for(shape[-1], SCALED_GROUP) or shape[-1]


def part_shapes(kind: str, shape: tuple[int, ...], group: int | None = None, store: torch.dtype = INT4_STORE,
                shifts: bool = False, signed: bool = False) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) of each part `kind` encodes a weight of `shape` into: groups of `group` inputs
    (None: the format's own choice) and, for int4, packed codes, then scales and zeros in `store`, bf16 (the
    format's own encoder); a pre-quantized checkpoint's codes pass through with float32 `store`, where the
    third part holds the shift (zero - 8 * scale) itself (`runtime.prequantized`). int8 with `shifts`: a
    float32 shift per group after the scales (a GGUF's Q5_1 / Q5_K codes passing through). int4 `signed`:
    two's-complement codes (int8) and scales in `store`, no third part (a GGUF's Q4_0 passing through)."""
    rows, cols = rows_cols(shape)
    if kind in ("int8", "fp8"):
        groups = cols // (group or scaled_group(shape))
        stores = [((rows, groups, 1), torch.float32)] * (2 if shifts and kind == "int8" else 1)
        return [((rows, cols), torch.int8 if kind == "int8" else FP8), *stores]
    if kind == "int4":
        groups = cols // (group or int4_group(shape))
        if signed:
            return [((rows, cols // 2), torch.int8), ((rows, groups, 1), store)]
        return [((rows, cols // 2), torch.uint8), ((rows, groups, 1), store), ((rows, groups, 1), store)]
    raise ValueError(f"unknown lossy kind {kind!r}")


def encodable(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether a tensor is quantized by `kind` (matrices of a floating dtype) or travels raw."""
    if not dtype.is_floating_point or len(shape) < 2:
        return False
    return kind != "int4" or int4_group(shape) is not None


def encode(kind: str, weight: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """Quantize `weight` (any device) into `parts` (views on the same device, shapes from `part_shapes`),
    a bounded slice of rows at a time (float32 temporaries of at most `ENCODE_ELEMENTS` elements, so
    encoding at load fits in the workspace the plan keeps free)."""
    rows, cols = rows_cols(tuple(weight.shape))
    flat = weight.reshape(rows, cols)
    step = max(1, min(QUANT_ROWS, ENCODE_ELEMENTS // cols))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        w = flat[start:stop].to(dtype=torch.float32, copy=True)
        chunk = [p[start:stop] for p in parts]
        if kind == "int8":
            g = w.view(stop - start, chunk[1].shape[1], -1)  # [rows, groups, group]
            scale = g.abs().amax(dim=-1, keepdim=True).div_(INT8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
            chunk[0].view(g.shape).copy_(g.div_(scale).round_().clamp_(-INT8_MAX, INT8_MAX))
            chunk[1].copy_(scale)
        elif kind == "fp8":
            _encode_fp8(w.view(stop - start, chunk[1].shape[1], -1), chunk)
        else:
            _encode_int4(w, cols // chunk[1].shape[1], chunk)


def _encode_fp8(g: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """e4m3 codes of `g` ([rows, groups, group] float32, overwritten) with, per group, the scale of least
    squared error among `FP8_SCALE_TRIES` from largest magnitude / 448 up to twice that (none clips).
    The cast to e4m3 rounds to nearest even; one float32 buffer and one of codes beside `g`."""
    base = g.abs().amax(dim=-1, keepdim=True).div_(FP8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
    trial = torch.empty_like(g)
    codes = torch.empty(g.shape, dtype=FP8, device=g.device)
    best = least = None
    for k in range(FP8_SCALE_TRIES):
        scale = base * 2 ** (k / FP8_SCALE_TRIES)
        codes.copy_(torch.div(g, scale, out=trial).clamp_(-FP8_MAX, FP8_MAX))
        error = trial.copy_(codes).mul_(scale).sub_(g).square_().sum(dim=-1, keepdim=True)
        if best is None:
            best, least = scale, error
        else:
            better = error < least  # ties keep the smaller scale
            best, least = torch.where(better, scale, best), torch.where(better, error, least)
    parts[0].view(g.shape).copy_(g.div_(best).clamp_(-FP8_MAX, FP8_MAX))
    parts[1].copy_(best)


def _encode_int4(w: torch.Tensor, group: int, parts: list[torch.Tensor]) -> None:
    """Groupwise asymmetric codes as `runtime.self_draft.quantize_int4` chooses them: scale and zero are
    rounded to their stored dtype first, so the codes fit the stored values."""
    g = w.reshape(w.shape[0], -1, group)
    low, high = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scale = ((high - low).clamp(min=1e-6) / 15).to(INT4_STORE).float()
    zero = (low + 8 * scale).to(INT4_STORE).float()
    q = g.sub_(zero - 8 * scale).div_(scale).round_().clamp_(0, 15).to(torch.uint8).reshape(w.shape[0], -1)
    parts[0].copy_(q[:, ::2] << 4 | q[:, 1::2])
    parts[1].copy_(scale)
    parts[2].copy_(zero)


def expand(kind: str, parts: list[torch.Tensor], out: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """Write the weight `parts` encode into `out` (its compute dtype and shape), on the current stream.
    int4's torch path (the CPU's, and CUDA's without Triton) unpacks its codes in `scratch` (uint8,
    `planning.formats.expand_scratch_bytes`; None: temporaries)."""
    rows, cols = rows_cols(tuple(out.shape))
    dst = out.view(rows, cols)
    if kind in ("int8", "fp8"):
        codes, scale = parts[:2]
        groups = dst.view(rows, scale.shape[1], -1)  # [rows, groups, group], scale [rows, groups, 1]
        if kind == "int8" and len(parts) > 2:  # a pass-through's shift [rows, groups, 1]: q * scale + shift
            torch.addcmul(parts[2], codes.view(groups.shape), scale, out=groups)
        elif kind == "int8":
            torch.mul(codes.view(groups.shape), scale, out=groups)
        else:
            dst.copy_(codes)  # float8 takes no part in type promotion: cast first, then scale in place
            groups.mul_(scale)
    else:
        _expand_int4(parts[0], parts[1], parts[2] if len(parts) > 2 else None, dst, scratch)


def int4_codes(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The codes [rows, cols] of int4's packing `packed` [rows, cols / 2] (the even column in the high nibble):
    0..15 from uint8, -8..7 from int8 (two's-complement nibbles); written into `out` ([rows, cols] of
    `packed`'s dtype, contiguous) where given, else a new tensor."""
    if out is None:
        out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=packed.dtype, device=packed.device)
    q = out.view(packed.shape[0], -1, 2)
    torch.bitwise_right_shift(packed, 4, out=q[..., 0])  # int8: sign-extending
    if packed.dtype == torch.int8:
        torch.bitwise_left_shift(packed, 4, out=q[..., 1]).bitwise_right_shift_(4)
    else:
        torch.bitwise_and(packed, 15, out=q[..., 1])
    return out


def _expand_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dst: torch.Tensor,
                 scratch: torch.Tensor | None) -> None:
    """`dst` [rows, cols] = q * scale + (zero - 8 * scale) by groups (float32 stores: q * scale + zero, the
    third part being the shift; `zero` None: signed codes, q * scale). On CUDA bf16 stores take one Triton
    launch (`runtime.int4_kernel.expand_int4`, the same bits; it declines float32 stores, whose shifts it does
    not take) and `scratch` goes unused: the plan still keeps the torch path's scratch
    (`planning.formats.expand_scratch_bytes`), conservative, as the fallback needs it. Otherwise (the CPU,
    float32 stores, signed codes, or Triton missing or failing) torch ops, a chunk of rows at a time: the codes
    q unpacked from `packed` [rows, cols // 2] into `scratch` (a byte each), bf16 stores' shifts in float32 after
    them, then one fused multiply(-add) into `dst`."""
    if not (dst.is_cuda and zero is not None and int4_kernel.expand_int4(packed, scale, zero, dst)):
        _expand_int4_torch(packed, scale, zero, dst, scratch)


def _expand_int4_torch(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dst: torch.Tensor,
                       scratch: torch.Tensor | None) -> None:
    """`_expand_int4` in torch ops on any device (the CPU's path, CUDA's fallback, the kernel's reference)."""
    rows, cols = dst.shape
    groups = scale.shape[1]
    step = max(1, min(rows, INT4_CHUNK_CODES // cols))
    if scratch is None or scratch.numel() < int4_scratch_bytes(step * cols):  # unplanned: a temporary
        scratch = torch.empty(int4_scratch_bytes(step * cols), dtype=torch.uint8, device=dst.device)
    shift_at = -(-step * cols // 256) * 256  # the codes first, the shifts after them (aligned)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        q = int4_codes(packed[r0:r1], out=scratch[: n * cols].view(packed.dtype).view(n, cols))
        out = dst[r0:r1].view(n, groups, -1)
        if zero is None:  # signed codes: q * scale, exact in float32, one rounding into the compute dtype
            torch.mul(q.view(n, groups, -1), scale[r0:r1], out=out)
            continue
        if zero.dtype == torch.float32:  # a pass-through's shift, added as it is
            shift = zero[r0:r1]
        else:  # exact: float32 holds zero - 8 * scale of bf16s
            shift = scratch[shift_at : shift_at + 4 * n * groups].view(torch.float32).view(n, groups, 1)
            shift.copy_(zero[r0:r1]).add_(scale[r0:r1], alpha=-8)
        # float32 arithmetic (q * scale is exact there, so one float32 rounding of the sum, none where it is
        # exact), then one rounding into the compute dtype
        torch.addcmul(shift, q.view(n, groups, -1), scale[r0:r1], out=out)
