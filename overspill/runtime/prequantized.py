"""Reading checkpoints that arrive quantized (`planning.prequantized`): dequantized for resident tensors,
repacked into a stream format's parts for streamed ones.

`QuantizedReader` is a `CheckpointReader` whose model weights may be stored as a quantized group of
tensors (GPTQ's qweight / qzeros / scales / g_idx, AWQ's, compressed-tensors' weight_packed / weight_scale /
weight_zero_point, or an e4m3 weight and its scale). `fill` writes
the reference dequantization (float32 arithmetic on the stored integers and scales, one rounding into the
destination dtype), on the destination's device; `parts_of` and `fill_parts` give a streamed layer's
quantized weights as the stream format's parts (`quant.part_shapes`), repacked once from the checkpoint's
layout, so the link carries the checkpoint's codes and the slot expands them to the same bits as `fill`:
- int4 (GPTQ, AWQ): codes [out, in] two a byte, the even column in the high nibble; per group a float32
  scale and shift = -z * scale (float32 stores hold the shift: `quant.part_shapes`), so the expansion's
  q * scale + shift is scale * (q - z) exactly in float32 (every product has at most 15 significant bits).
- compressed-tensors pack-quantized (`planning.prequantized`): its int32s unpacked (q + 2^(bits-1), low bits first)
  and, 4-bit symmetric, repacked as signed int4 (q two's-complement nibbles, a float32 scale: `q * scale`, exact);
  4-bit asymmetric as GPTQ's (codes q + 8, shift -(z + 8) * scale); 8-bit as int8 codes q with a float32 scale
  and, asymmetric, shift -z * scale. Asymmetric weights need bf16 or fp16 scales, so that `q * scale + shift` is
  `(q - z) * scale` exactly (every product exact in float32).
- fp8: the e4m3 codes as they are; the stored per-tensor, per-channel, per-group or block scales repeated
  into the format's float32 scale per group of inputs (each group lies in one stored block).
- a converted GGUF's weights (`gguf_blocks`), each in its type's format within one layer: Q8_0, Q6_K and
  Q5_0 as int8, the codes as they are with the fp16 d of each block of 32 (Q8_0, Q5_0) or the float32
  d * scale_j of each sub-block of 16 (Q6_K) as the format's float32 scale of a group; Q5_1 and Q5_K as int8
  with a float32 shift per group beside the scale, Q4_1 and Q4_K as int4, their codes, float32 scales and
  shifts as they are (q * scale + shift, the product exact, the sum rounded once in float32), Q2_K likewise
  with groups of 16, and Q4_0 and Q3_K as signed int4, their codes (q - 8; q in -4..3) and float32 scales (d;
  d * (sc_j - 32) per group of 16) (q * scale, exact). Resident weights take
  `gguf_blocks.dequantize`, the one reference of every GGUF type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OverspillError
from ..planning.prequantized import GGUF_TYPES, Prequantized
from . import gguf_blocks
from .checkpoint import CheckpointReader
from .layout import TensorEntry
from .quant import ENCODE_ELEMENTS, part_shapes, rows_cols, scaled_group

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output column each nibble of an AWQ int32 holds, low nibble first
AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)  # the nibble that holds each output column of its eight
FP8_DTYPES = {"F8_E4M3"}  # safetensors' name for float8_e4m3fn
Parts = list[tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class Quantized:
    """One model weight stored quantized: its checkpoint keys and logical [out, in] shape."""

    weight: str  # GPTQ / AWQ: qweight; compressed-tensors int: weight_packed; fp8: the e4m3 weight
    scale: str  # scales, weight_scale_inv or weight_scale
    shape: tuple[int, ...]  # [out, in], as the model's parameter (a GGUF's fused experts: [experts, out, in])
    # GPTQ / AWQ: qzeros; compressed-tensors: weight_zero_point (asymmetric only); GGUF: the float32 shifts (Q2_K,
    # Q4_1, Q4_K, Q5_1, Q5_K). None for a non-GGUF int weight: signed codes without zero points
    zeros: str | None = None
    g_idx: str | None = None  # GPTQ: g_idx, compressed-tensors: weight_g_idx, the group of each input (in order)
    gguf: str | None = None  # a converted GGUF's block type ("q4_k", "q6_k", "q8_0", ...: `GGUF_TYPES`)

    @property
    def group(self) -> int:
        """A GGUF weight's inputs per scale (GPTQ / AWQ: `QuantizedReader._group`)."""
        return GGUF_TYPES[self.gguf][1]


class QuantizedReader(CheckpointReader):
    """A `CheckpointReader` for a checkpoint quantized as `scheme` says (see the module docstring)."""

    def __init__(self, directory: Path, scheme: Prequantized):
        super().__init__(directory)
        self.scheme = scheme
        self._bound_to = None
        self._groups: dict[str, int] = {}  # qweight key -> inputs per group, checked once
        try:
            self.quantized = self._find()
        except BaseException:
            self.close()
            raise

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.key_to_file[key]).get_slice(key).get_shape())

    def _dtype(self, key: str) -> str:
        return self._handle(self.key_to_file[key]).get_slice(key).get_dtype()

    def _find(self) -> dict[str, Quantized]:
        """{the weight's name as the checkpoint would call it unquantized: its quantized tensors}."""
        found = {}
        keys = self.key_to_file
        for key in keys:
            if self.scheme.method == "compressed-tensors" and key.endswith(".weight_packed"):
                base = key[: -len(".weight_packed")]
                found[base + ".weight"] = self._packed_entry(key, base)
            elif self.scheme.stream_format == "int4" and key.endswith(".qweight"):
                base = key[: -len(".qweight")]
                missing = [k for k in (".qzeros", ".scales") if base + k not in keys]
                if missing:
                    raise OverspillError(f"{self.scheme.label} checkpoint in {self.directory} has {key} without "
                                         f"{', '.join(base + k for k in missing)}: download it again")
                packed = self._shape(key)
                shape = (packed[1], packed[0] * 8) if self.scheme.method == "gptq" else (packed[1] * 8, packed[0])
                g_idx = base + ".g_idx" if base + ".g_idx" in keys else None
                found[base + ".weight"] = Quantized(key, base + ".scales", shape, base + ".qzeros", g_idx)
            elif self.scheme.method == "gguf" and key.endswith("_codes"):
                kind = next((k for k, _ in self.scheme.gguf if key.endswith(gguf_blocks.keys(k)[0])), None)
                if kind is None:
                    continue
                base = key[: -len(gguf_blocks.keys(kind)[0])]
                parts = [base + k for k in gguf_blocks.keys(kind)]
                missing = [k for k in parts[1:] if k not in keys]
                if missing:
                    raise OverspillError(f"{key} in {self.directory} has no {', '.join(missing)}: delete this "
                                         f"converted copy so that the GGUF is converted again")
                *rows, cols = self._shape(key)  # fused experts: [experts, out, ..], named without ".weight"
                shape = (*rows, cols * 2 if GGUF_TYPES[kind][0] == "int4" else cols)
                found[base if len(rows) == 2 else base + ".weight"] = Quantized(
                    key, parts[1], shape, parts[2] if len(parts) > 2 else None, gguf=kind)
            elif self.scheme.stream_format == "fp8" and key.endswith(".weight"):
                scale = next((key + s for s in ("_scale_inv", "_scale") if key + s in keys), None)
                if scale is None:
                    continue
                if self._dtype(key) not in FP8_DTYPES:
                    raise OverspillError(f"{key} in {self.directory} is {self._dtype(key)}, not float8 e4m3: "
                                         f"overspill streams e4m3 FP8 checkpoints")
                shape = self._shape(key)
                if len(shape) != 2:
                    raise OverspillError(f"{key} in {self.directory} has shape {shape}: overspill streams FP8 "
                                         f"matrices stored one per weight")
                found[key] = Quantized(key, scale, (shape[0], shape[1]))
        if not found:
            raise OverspillError(f"config.json in {self.directory} says {self.scheme.label} but no weight is "
                                 f"stored quantized: check the checkpoint")
        return found

    def _packed_entry(self, key: str, base: str) -> Quantized:
        """A compressed-tensors pack-quantized weight's tensors, checked. Its zero points are used wherever stored,
        as compressed-tensors' own decompression does (before 0.9.4 it stored them unpacked, int8, and dropped
        an all-zero one)."""
        keys, scale, zeros = self.key_to_file, base + ".weight_scale", base + ".weight_zero_point"
        if scale not in keys:
            raise OverspillError(f"{self.scheme.label} checkpoint in {self.directory} has {key} without {scale}: "
                                 f"download it again")
        packed = self._shape(key)
        if self._dtype(key) != "I32" or len(packed) != 2:
            raise OverspillError(f"{key} in {self.directory} is {self._dtype(key)} {packed}, not the int32 matrix "
                                 f"of compressed-tensors' pack-quantized format")
        shape = (packed[0], packed[1] * (32 // self._bits))
        if base + ".weight_shape" in keys and tuple(self.raw(base + ".weight_shape").tolist()) != shape:
            raise OverspillError(f"{key} in {self.directory} pads its inputs to {shape[1]}: overspill streams "
                                 f"pack-quantized weights whose inputs fill their int32s")
        if zeros in keys and self._dtype(scale) not in ("BF16", "F16"):
            raise OverspillError(f"{scale} in {self.directory} is {self._dtype(scale)}: overspill streams "
                                 f"asymmetric compressed-tensors weights with bf16 or fp16 scales")
        g_idx = base + ".weight_g_idx" if base + ".weight_g_idx" in keys else None
        return Quantized(key, scale, shape, zeros if zeros in keys else None, g_idx)

    @property
    def _bits(self) -> int:
        """Bits of a compressed-tensors pack-quantized code: its stream format's."""
        return 4 if self.scheme.stream_format == "int4" else 8

    # -- CheckpointReader: the model's names, and dequantized tensors where it reads one ----------------

    def _bind_keys(self):
        return [*self.key_to_file, *(k for k in self.quantized if k not in self.key_to_file)]

    def bind(self, model: torch.nn.Module) -> None:
        if self._bound_to is not model:  # `load` binds before planning the pass-through bytes, then materializes
            super().bind(model)
            self._bound_to = model

    def _key(self, name: str) -> str | None:
        return next((c for c in self._candidates(name) if c in self.quantized), None)

    def has(self, name: str) -> bool:
        return self._key(name) is not None or super().has(name)

    def fill(self, name: str, out: torch.Tensor) -> None:
        key = self._key(name)
        if key is None:
            super().fill(name, out)
            return
        q = self.quantized[key]
        if tuple(out.shape) != q.shape:
            raise self._mismatch(key, q.shape, tuple(out.shape))
        self._dequantize(key, out)

    def _get(self, key: str) -> torch.Tensor:
        """The stored tensor, or a quantized weight dequantized in float32 (per-expert weights that
        transformers fuses are read this way, then stacked)."""
        if key not in self.quantized:
            return super()._get(key)
        out = torch.empty(self.quantized[key].shape, dtype=torch.float32)
        self._dequantize(key, out)
        return out

    # -- dequantization and repacking ------------------------------------------------------------------

    def kind(self, q: Quantized) -> str:
        """The stream format weight `q`'s parts take: the scheme's, or its GGUF type's."""
        return GGUF_TYPES[q.gguf][0] if q.gguf else self.scheme.stream_format

    def _dequantize(self, key: str, out: torch.Tensor) -> None:
        """The reference dequantization of weight `key` into `out` ([out, in], any dtype and device): float32
        arithmetic, one rounding; computed on `out`'s device a slice of output rows at a time."""
        q = self.quantized[key]
        rows, cols = rows_cols(q.shape)
        step = max(8, ENCODE_ELEMENTS // cols // 8 * 8)
        if q.gguf:  # every GGUF type: `gguf_blocks.dequantize`, on a slice of rows of its stored tensors
            stored = [self.raw(k) for k in (q.weight, q.scale, q.zeros) if k is not None]
            stored = [t.reshape(rows, -1) for t in stored]  # fused experts' rows, expert after expert
            flat = out.view(rows, cols)
            for r0 in range(0, rows, step):
                chunk = tuple(t[r0 : r0 + step].to(out.device) for t in stored)
                flat[r0 : r0 + step].copy_(gguf_blocks.dequantize(q.gguf, chunk))
            return
        if self.kind(q) == "fp8":
            codes, scale = self.raw(q.weight), self._fp8_scales(key)  # scale [out, groups]
            for r0 in range(0, rows, step):
                c = codes[r0 : r0 + step].to(out.device).float()
                s = scale[r0 : r0 + step].to(out.device)
                out[r0 : r0 + step].copy_(c.view(c.shape[0], s.shape[1], -1).mul_(s[..., None]).view(c.shape))
            return
        for r0 in range(0, rows, step):
            codes, scale, zero = self._int4(q, r0, min(rows, r0 + step), out.device)  # [n, in], [n, groups] x2
            w = codes.float().view(codes.shape[0], scale.shape[1], -1)
            out[r0 : r0 + step].copy_(w.sub_(zero[..., None]).mul_(scale[..., None]).view(codes.shape))

    def raw(self, key: str) -> torch.Tensor:
        """A stored tensor as it is."""
        return super()._get(key)

    def _int4(self, q: Quantized, r0: int, r1: int, device: torch.device):
        """Output rows r0:r1 of a GPTQ / AWQ weight: (codes uint8 [n, in], float32 scales [n, groups],
        integer zeros as float32 [n, groups]), computed on `device`; a compressed-tensors one's `_unpacked`."""
        if self.scheme.method == "compressed-tensors":
            return self._unpacked(q, r0, r1, device)
        rows, cols = q.shape
        group = self._group(q)
        if self.scheme.method == "gptq":
            packed = self.raw(q.weight)[:, r0:r1].to(device)  # [in / 8, n]: input 8k + j in nibble j of row k
            shifts = torch.arange(0, 32, 4, device=device, dtype=torch.int32)
            codes = (packed[:, None, :] >> shifts[None, :, None]).bitwise_and_(15).view(cols, -1).t()
            zeros = self._unpack_zeros(self.raw(q.zeros)[:, r0 // 8 : -(-r1 // 8)].to(device), awq=False)
            zeros = zeros[:, r0 % 8 : r0 % 8 + (r1 - r0)]
        else:
            packed = self.raw(q.weight)[:, r0 // 8 : -(-r1 // 8)].to(device)  # [in, n / 8], AWQ's nibble order
            codes = self._unpack_columns(packed)[:, r0 % 8 : r0 % 8 + (r1 - r0)].t()
            zeros = self._unpack_zeros(self.raw(q.zeros)[:, r0 // 8 : -(-r1 // 8)].to(device), awq=True)
            zeros = zeros[:, r0 % 8 : r0 % 8 + (r1 - r0)]
        scale = self.raw(q.scale)[:, r0:r1].to(device).float()  # [groups, n]
        if scale.shape[0] != cols // group or zeros.shape[0] != scale.shape[0]:
            raise OverspillError(f"{q.scale} in {self.directory} has {scale.shape[0]} groups, not the "
                                 f"{cols // group} of {cols} inputs in groups of {group}: check the checkpoint")
        return codes.to(torch.uint8).contiguous(), scale.t(), (zeros + self.scheme.zero_offset).float().t()

    def _unpacked(self, q: Quantized, r0: int, r1: int, device: torch.device):
        """Output rows r0:r1 of a compressed-tensors pack-quantized weight, in its stream format's terms:
        (codes [n, in], float32 scales [n, groups], integer zeros as float32 [n, groups]) with int4's codes and
        zeros as stored, q + 8 and z + 8 (8 without zero points), int8's signed, q and z (0 without)."""
        bits, n, cols = self._bits, r1 - r0, q.shape[1]
        per, mask, offset = 32 // bits, (1 << bits) - 1, 1 << (bits - 1)
        shifts = torch.arange(0, 32, bits, device=device, dtype=torch.int32)
        packed = self.raw(q.weight)[r0:r1].to(device)  # [n, in / per]: input per * k + j in bits j * bits.. of k
        codes = (packed[..., None] >> shifts).bitwise_and_(mask).view(n, cols)
        scale = self.raw(q.scale)[r0:r1].to(device).float()  # [n, groups]; channel: [n, 1]
        if q.zeros is None:
            zeros = torch.full_like(scale, offset)
        elif self._dtype(q.zeros) == "I32":  # packed along the outputs: [ceil(out / per), groups]
            z = self.raw(q.zeros)[r0 // per : -(-r1 // per)].to(device)
            z = (z[:, None, :] >> shifts[:, None]).bitwise_and_(mask).view(-1, z.shape[1])
            zeros = z[r0 % per : r0 % per + n].float()
        else:  # as compressed-tensors stored them before 0.9.4: signed int8 [out, groups]
            zeros = self.raw(q.zeros)[r0:r1].to(device).float() + offset
        if scale.dim() != 2 or scale.shape[1] != cols // self._group(q) or zeros.shape != scale.shape:
            raise OverspillError(f"{q.scale} in {self.directory} has shape {tuple(scale.shape)} for rows {r0}:{r1}, "
                                 f"not one scale a group of {self._group(q)} of {cols} inputs: check the checkpoint")
        if bits == 8:
            return (codes - offset).to(torch.int8), scale, zeros.sub_(offset)
        return codes.to(torch.uint8), scale, zeros

    @staticmethod
    def _unpack_columns(packed: torch.Tensor) -> torch.Tensor:
        """AWQ's [rows, cols / 8] int32 with columns in `AWQ_ORDER` as [rows, cols] integers."""
        shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
        nibbles = (packed[..., None] >> shifts).bitwise_and_(15)  # [rows, cols / 8, nibble]
        order = torch.tensor(AWQ_NIBBLE, device=packed.device)
        return nibbles.index_select(-1, order).view(packed.shape[0], -1)

    def _unpack_zeros(self, packed: torch.Tensor, awq: bool) -> torch.Tensor:
        """qzeros [groups, out / 8] int32 as [groups, out] integers (GPTQ's nibbles in order, AWQ's in its own)."""
        if awq:
            return self._unpack_columns(packed)
        shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
        return (packed[..., None] >> shifts).bitwise_and_(15).view(packed.shape[0], -1)

    def _group(self, q: Quantized) -> int:
        """Inputs per scale of an int4 weight; the GPTQ g_idx checked to be in order (no act-order)."""
        if q.gguf:
            return q.group
        if q.weight not in self._groups:
            self._groups[q.weight] = self._checked_group(q)
        return self._groups[q.weight]

    def _checked_group(self, q: Quantized) -> int:
        cols = q.shape[1]
        group = cols if self.scheme.group == -1 else self.scheme.group
        if cols % group or group < 32 and group != cols:
            raise OverspillError(f"{q.weight} in {self.directory}: {cols} inputs in groups of {group} is not "
                                 f"supported (overspill needs whole groups of at least 32 inputs)")
        if q.g_idx is not None:
            g_idx = self.raw(q.g_idx)
            if not torch.equal(g_idx.long(), torch.arange(cols) // group):
                raise OverspillError(f"{q.g_idx} in {self.directory} reorders the inputs (act-order): overspill "
                                     f"streams weights whose groups keep the inputs in order")
        return group

    def _fp8_scales(self, key: str) -> torch.Tensor:
        """The float32 scale of each group of `quant.scaled_group` inputs of an fp8 weight, [out, groups]:
        the stored per-tensor, per-channel, per-group or block scale it lies in."""
        q = self.quantized[key]
        rows, cols = q.shape
        stored = self.raw(q.scale).float()
        group = scaled_group(q.shape)
        if stored.numel() == 1:
            block = (rows, cols)
        elif stored.dim() <= 2 and stored.shape[0] == rows and stored.numel() == rows:
            block = (1, cols)  # per channel: [out, 1] or [out]
        elif stored.dim() == 2:
            r, c = stored.shape
            want = self.scheme.block
            block = want if want and (r, c) == (-(-rows // want[0]), -(-cols // want[1])) else (-(-rows // r), -(-cols // c))
            if (r, c) != (-(-rows // block[0]), -(-cols // block[1])):
                raise self._fp8_refusal(key, stored.shape)
        else:
            raise self._fp8_refusal(key, stored.shape)
        if block[1] < cols and block[1] % group:
            raise OverspillError(f"{q.scale} in {self.directory}: scale blocks of {block[1]} inputs do not hold "
                                 f"whole groups of {group} (the fp8 stream format's); not supported")
        stored = stored.reshape(-(-rows // block[0]), -(-cols // block[1]))
        row_block = torch.arange(rows) // block[0]
        group_block = torch.arange(0, cols, group) // block[1]
        return stored[row_block][:, group_block].contiguous()

    def _fp8_refusal(self, key: str, shape) -> OverspillError:
        return OverspillError(f"{self.quantized[key].scale} in {self.directory} has shape {tuple(shape)}, not a "
                              f"per-tensor, per-channel, per-group or block scale of {key} {self.quantized[key].shape}")

    def parts_of(self, prefix: str):
        """`formats.PartsOf` of the layer at `prefix` (e.g. "model.layers.3."): its quantized weights as the
        scheme's stream format's parts, everything else raw."""
        def parts(kind: str, entry: TensorEntry) -> tuple[str, Parts]:
            key = self._key(prefix + entry.name)
            if kind != self.scheme.stream_format or key is None:
                return "raw", [(entry.shape, entry.dtype)]
            q = self.quantized[key]
            fmt = self.kind(q)  # a GGUF layer may mix int4 (Q4_K) and int8 (Q6_K, Q8_0) weights
            if tuple(entry.shape) != q.shape:
                raise self._mismatch(key, q.shape, tuple(entry.shape))
            if fmt == "int4":  # without zeros or shifts (GGUF Q4_0 / Q3_K, compressed-tensors symmetric): signed codes
                signed = q.zeros is None
                return fmt, part_shapes("int4", q.shape, group=self._group(q), store=torch.float32, signed=signed)
            if fmt == "int8":
                return fmt, part_shapes("int8", q.shape, group=self._group(q), shifts=q.zeros is not None)
            self._fp8_scales(key)  # refuses stored blocks the format's groups do not fit
            return fmt, part_shapes("fp8", q.shape)

        return parts

    def expert_parts(self, name: str) -> tuple[str, Parts] | None:
        """(stream format, parts) of one expert of fused-experts parameter `name` where the checkpoint keeps its
        codes (a converted GGUF's), as `parts_of` gives a matrix's: its codes, float32 scales (and shifts) for one
        expert's [out, in]; None where the parameter is stored in the compute dtype."""
        key = self._key(name)
        q = self.quantized.get(key) if key is not None else None
        if q is None or not q.gguf or len(q.shape) != 3:
            return None
        fmt = self.kind(q)
        one = q.shape[1:]
        if fmt == "int4":
            return fmt, part_shapes("int4", one, group=q.group, store=torch.float32, signed=q.zeros is None)
        return fmt, part_shapes("int8", one, group=q.group, shifts=q.zeros is not None)

    def fill_expert_parts(self, name: str, expert: int, parts: list[torch.Tensor]) -> None:
        """Write expert `expert`'s parts (host views shaped as `expert_parts` says) of fused-experts parameter
        `name`: its stored codes, scales (and shifts) as they are (Q8_0 / Q5_0's fp16 d cast to float32: exact)."""
        q = self.quantized[self._key(name)]
        for part, stored in zip(parts, (q.weight, q.scale, q.zeros)):  # a slice read: one expert's bytes
            part.copy_(self._handle(self.key_to_file[stored]).get_slice(stored)[expert].view(part.shape))

    def fill_layer(self, prefix: str, encoded, host: torch.Tensor) -> None:
        """Write a streamed layer's host buffer `host` in the layout `encoded` (a `formats.LossyLayer` of
        `parts_of(prefix)`): quantized weights as their parts, the rest raw."""
        for t in encoded.tensors:
            parts = [p.view(host) for p in t.parts]
            if t.kind == "raw":
                self.fill(prefix + t.entry.name, parts[0])
            else:
                self.fill_parts(prefix + t.entry.name, parts)

    def fill_parts(self, name: str, parts: list[torch.Tensor]) -> None:
        """Write model weight `name`'s parts (host views shaped as `parts_of` says) from the checkpoint."""
        key = self._key(name)
        q = self.quantized[key]
        rows, cols = rows_cols(q.shape)
        if q.gguf:  # stored as its format's parts already (Q8_0 / Q5_0's fp16 d cast to float32: exact)
            for part, stored in zip(parts, (q.weight, q.scale, q.zeros)):
                part.copy_(self.raw(stored).view(part.shape))
            return
        if self.kind(q) == "fp8":
            parts[0].copy_(self.raw(q.weight))
            parts[1].copy_(self._fp8_scales(key)[..., None])
            return
        step = max(8, ENCODE_ELEMENTS // cols // 8 * 8)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            codes, scale, zero = self._int4(q, r0, r1, torch.device("cpu"))
            if self.kind(q) == "int8":  # compressed-tensors 8-bit: the signed codes as they are
                parts[0][r0:r1].copy_(codes)
            elif q.zeros is None:  # compressed-tensors 4-bit symmetric: q = (q + 8) ^ 8 as two's-complement nibbles
                signed = codes ^ 8
                parts[0][r0:r1].copy_((signed[:, ::2] << 4 | signed[:, 1::2]).view(torch.int8))
            else:
                parts[0][r0:r1].copy_(codes[:, ::2] << 4 | codes[:, 1::2])
            parts[1][r0:r1].copy_(scale[..., None])
            if q.zeros is not None:
                parts[2][r0:r1].copy_(zero.neg_().mul_(scale)[..., None])  # the shift -z * scale, exact
