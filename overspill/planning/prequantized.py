"""Checkpoints that arrive quantized: which stream format their streamed layers keep, and its bytes. Pure Python.

A checkpoint whose config.json carries a `quantization_config` named here streams its quantized matrices
as they are: the loader repacks each one once into a stream format's parts (`runtime.prequantized`), so
the link carries the checkpoint's codes and the GPU expands them in the slot; resident layers get the
dequantized weights in the compute dtype. The expanded weight equals the reference dequantization
(float32 arithmetic, one rounding into the compute dtype) bit for bit:

| quant_method | the checkpoint's tensors | stream format | scales kept as |
|---|---|---|---|
| gptq (bits 4, desc_act false) | qweight int32 [in/8, out], qzeros int32 [groups, out/8], scales fp16 [groups, out] | int4 | float32 scale and zero per group |
| awq (gemm, bits 4, zero_point) | qweight int32 [in, out/8] (nibbles in order 0 2 4 6 1 3 5 7), qzeros, scales | int4 | float32 scale and zero per group |
| fp8 (transformers' FineGrainedFP8) | weight e4m3 [out, in], weight_scale_inv float32 per tensor or per block | fp8 | float32 per group of inputs |
| compressed-tensors, float-quantized 8-bit | weight e4m3, weight_scale per tensor, channel, group or block | fp8 | float32 per group of inputs |
| gguf (a converted GGUF's Q8_0 decoder weights, `runtime.gguf_blocks`) | q8_0_codes int8 [out, in], q8_0_scales fp16 [out, in/32] | int8 | float32 per group of 32 |

int4 keeps float32 scales and zeros (8 bytes a group against bf16's 4 of the format's own encoder): the
expansion computes `q * scale + (zero - 8 * scale)` in float32 with `zero = scale * (8 - z)`, which is
`scale * (q - z)` exactly only where scale and zero are stored exactly; an fp16 scale times (8 - z) needs
up to 15 significant bits, more than bf16's 8 or fp16's 11. fp8's per-tensor, per-channel and block scales
repeat into its groups of inputs (a block's scale once per row of the block).

Activation scales (static FP8 `input_scale`) are not used: activations stay in the compute dtype.
Not supported (a one-line error says what is): act-order GPTQ (desc_act), GPTQ/AWQ of other bit widths,
AWQ's GEMV / Marlin / exllama layouts, compressed-tensors int formats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .formats import NATIVE, encoded_bytes

INT4_STORE_BYTES = 4  # float32 scale and float32 zero per group (see above)
FP8_SCALE_BYTES = 4  # float32, as the fp8 format's own
SUPPORTED = ("GPTQ and AWQ (gemm) int4 with desc_act false, FP8 (quant_method fp8, or compressed-tensors "
             "float-quantized 8-bit), GGUF Q8_0")
GGUF_Q8_0_GROUP = 32  # weights per Q8_0 block (and fp16 scale)


@dataclass(frozen=True)
class Prequantized:
    """How a checkpoint arrives quantized (from its config.json alone)."""

    method: str  # "gptq", "awq", "fp8", "compressed-tensors", "gguf"
    stream_format: str  # the stream format its codes keep: "int4", "fp8" or "int8"
    group: int  # inputs per scale (int4: and zero), -1 one per row; fp8: 0 (the scales' shape says)
    zero_offset: int = 0  # added to stored zeros: 1 for auto-gptq's v1 format (zero - 1 stored)
    block: tuple[int, int] | None = None  # fp8: [rows, inputs] a stored scale covers, when the config says

    @property
    def label(self) -> str:
        if self.stream_format == "int4":
            per = "per row" if self.group == -1 else f"groups of {self.group}"
            return f"{self.method.upper()} int4 ({per})"
        return "GGUF Q8_0" if self.method == "gguf" else f"{self.method} e4m3"

    def stream_bytes(self, layer_bytes: int, dtype_bytes: int) -> int:
        """Bytes a layer of `layer_bytes` (compute dtype) sends per trip in its own format, as `overspill plan`
        estimates it from the config (every parameter counted as quantized; the load counts exactly)."""
        if self.stream_format == "int4":
            return encoded_bytes("int4", layer_bytes, dtype_bytes, group=self.group, store_bytes=INT4_STORE_BYTES)
        return encoded_bytes(self.stream_format, layer_bytes, dtype_bytes, group=self.group)


def scheme_of(config: Mapping[str, Any]) -> Prequantized | None:
    """The pre-quantization a config.json declares (None without `quantization_config`).

    Raises:
        ValueError: a quantization overspill does not stream, in one line saying what it supports.
    """
    q = config.get("quantization_config") if isinstance(config, Mapping) else None
    if not q:
        text = config.get("text_config") if isinstance(config, Mapping) else None
        q = text.get("quantization_config") if isinstance(text, Mapping) else None
    if not q:
        return None
    if not isinstance(q, Mapping):
        raise ValueError(f"quantization_config is a JSON {type(q).__name__}, not an object")
    method = str(q.get("quant_method", "")).lower()
    if method in ("gptq", "awq"):
        return _int4(method, q)
    if method == "fp8":
        block = q.get("weight_block_size")
        return Prequantized("fp8", "fp8", 0, block=tuple(block) if block else None)
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    if method == "gguf" and list(q.get("types") or ()) == ["q8_0"]:
        return Prequantized("gguf", "int8", GGUF_Q8_0_GROUP)
    raise ValueError(f"quant_method {method or '(none)'!r} is not supported: overspill streams {SUPPORTED}")


def _int4(method: str, q: Mapping[str, Any]) -> Prequantized:
    bits = q.get("bits", q.get("w_bit"))
    group = int(q.get("group_size", q.get("q_group_size", 128)))
    if bits != 4:
        raise ValueError(f"{method.upper()} with {bits} bits is not supported: overspill streams {SUPPORTED}")
    if method == "gptq":
        if q.get("desc_act"):
            raise ValueError(f"GPTQ with desc_act (act-order) is not supported: overspill streams {SUPPORTED}")
        fmt = str(q.get("checkpoint_format", q.get("format", "gptq")) or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint format {fmt!r} is not supported: overspill streams {SUPPORTED}")
        offset = 1 if fmt == "gptq" else 0  # auto-gptq (v1) stores zero - 1; gptq_v2 the zero itself
    else:
        version = str(q.get("version", q.get("format", "gemm")) or "gemm").lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported: overspill streams {SUPPORTED}")
        if q.get("zero_point", True) is False:
            raise ValueError(f"AWQ without zero points is not supported: overspill streams {SUPPORTED}")
        offset = 0
    if group != -1 and group < 32:
        raise ValueError(f"{method.upper()} group_size {group} is not supported: overspill streams groups of 32 "
                         f"inputs or more, or -1 (one a row)")
    return Prequantized(method, "int4", group, zero_offset=offset)


def _compressed_tensors(q: Mapping[str, Any]) -> Prequantized:
    fmt = str(q.get("format", "")).lower()
    groups = q.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, Mapping)]
    fp8 = weights and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights)
    if fmt not in ("float-quantized", "naive-quantized") or not fp8:
        raise ValueError(f"compressed-tensors format {fmt or '(none)'!r} with weights "
                         f"{sorted({(w.get('type'), w.get('num_bits')) for w in weights}, key=str)} is not supported: "
                         f"overspill streams {SUPPORTED}")
    blocks = {tuple(w["block_structure"]) for w in weights if w.get("block_structure")}
    return Prequantized("compressed-tensors", "fp8", 0, block=blocks.pop() if len(blocks) == 1 else None)


def stream_format_for(scheme: Prequantized, requested: str, blocker: str | None = None) -> tuple[str, str]:
    """(format, note) for a pre-quantized checkpoint: "auto" and its own format keep its codes; any other
    format dequantizes the streamed layers at load (then re-encodes them in that format, bf16 aside).
    `blocker` names what the load asked for that streams only uncompressed layers (`formats.format_blocker`):
    "auto" then streams the dequantized weights."""
    own = scheme.stream_format
    if requested in ("auto", own) and not (requested == "auto" and blocker):
        return own, f"{scheme.label} checkpoint: streamed layers keep its codes ({own})"
    why = f" ({blocker} streams uncompressed layers)" if requested == "auto" else ""
    fmt = NATIVE if requested == "auto" else requested
    then = "" if fmt == NATIVE else f", then encoded as {fmt}"
    return fmt, f"{scheme.label} checkpoint: streamed layers dequantized to the compute dtype{then}{why}"
