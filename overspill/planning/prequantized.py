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
| compressed-tensors, pack-quantized int 4-bit, symmetric | weight_packed int32 [out, in/8] (q + 8, low nibble first), weight_scale [out, groups] | int4, signed | float32 scale per group |
| compressed-tensors, pack-quantized int 4-bit, asymmetric | as symmetric, and weight_zero_point int32 [out/8, groups] (z + 8, packed along the outputs) | int4 | float32 scale and shift per group |
| compressed-tensors, pack-quantized int 8-bit | weight_packed int32 [out, in/4] (q + 128), weight_scale, weight_zero_point (asymmetric) | int8 | float32 scale (and shift) per group |
| gguf (a converted GGUF's Q8_0 decoder weights, `runtime.gguf_blocks`) | q8_0_codes int8 [out, in], q8_0_scales fp16 [out, in/32] | int8 | float32 per group of 32 |
| gguf, Q6_K | q6_k_codes int8 [out, in] (q - 32), q6_k_scales float32 [out, in/16] (d * scale) | int8 | float32 per group of 16 |
| gguf, Q4_K | q4_k_codes uint8 [out, in/2] (int4's packing), q4_k_scales and q4_k_shifts float32 [out, in/32] | int4 | float32 scale and shift per group of 32 |
| gguf, Q4_1 | q4_1_codes as Q4_K's, q4_1_scales d and q4_1_shifts m float32 [out, in/32] | int4 | float32 scale and shift per group of 32 |
| gguf, Q4_0 | q4_0_codes int8 [out, in/2] (q - 8 as two's-complement nibbles), q4_0_scales float32 [out, in/32] (d) | int4, signed | float32 scale per group of 32 |
| gguf, Q5_0 | q5_0_codes int8 [out, in] (q - 16), q5_0_scales fp16 [out, in/32] (d) | int8 | float32 per group of 32 |
| gguf, Q5_1 / Q5_K | q5_1_codes int8 [out, in] (q, 0..31), scales and shifts float32 [out, in/32] (d, m; d * sc_j, -dmin * m_j) | int8 | float32 scale and shift per group of 32 |
| gguf, Q3_K | q3_k_codes int8 [out, in/2] (q in -4..3 as two's-complement nibbles), q3_k_scales float32 [out, in/16] (d * (sc_j - 32)) | int4, signed | float32 scale per group of 16 |
| gguf, Q2_K | q2_k_codes uint8 [out, in/2] (q, 0..3), q2_k_scales and q2_k_shifts float32 [out, in/16] (d * sc_j, -dmin * m_j) | int4 | float32 scale and shift per group of 16 |

int4 keeps a float32 scale and a float32 shift per group (8 bytes a group against the 4 of the format's own
bf16 scale and zero): the expansion computes `q * scale + shift` in float32 (`quant.part_shapes`: float32
stores hold the shift itself), with shift = -z * scale for GPTQ / AWQ (exact: an fp16 scale times an
integer up to 16, 15 significant bits), so `scale * (q - z)` exactly, and shift = -dmin * m for GGUF Q4_K
(`q * d * sc - dmin * m`, products exact, one float32 rounding of the sum: llama.cpp's and gguf's own
arithmetic); Q4_1's shift is m (`d * q + m`, gguf's own sum). Q4_0's codes are signed, q - 8 (int4 codes
stored as int8 are two's-complement nibbles), with a float32 scale d and no shift (4 bytes a group), so the
expansion is gguf's `d * (q - 8)` bit for bit: unsigned codes with shift -8d give the same values but +0.0
where gguf has -0.0 (q = 8 under d < 0). The 2- and 3-bit K-quants take int4 with groups of 16 (their
sub-blocks): Q3_K's signed codes q in -4..3 with a float32 scale d * (sc_j - 32) (exact), gguf's `dl * q`
exact too (0.75 bytes a weight); Q2_K's codes 0..3 with d * sc_j and -dmin * m_j as Q4_K's (1.0 bytes a weight).
compressed-tensors' pack-quantized weights (llm-compressor's W4A16 / W8A16; `pack_to_int32` in its
`compressors/pack_quantized/helpers.py`, formerly `compressors/quantized_compressors/pack_quantized.py`) store
signed codes q as q + 2^(bits-1), 32 / bits an int32 along the inputs, low bits first; asymmetric zero points z
the same way along the outputs (before 0.9.4: signed int8 [out, groups]); they dequantize as `(q - z) * scale` in
the scale's dtype (bf16 or fp16: every product exact in float32, so float32 arithmetic and one rounding give the
same bits; asymmetric weights with float32 scales are refused at load). Symmetric 4-bit (no zero points stored)
streams as Q4_0 does, signed codes and a float32 scale (4 bytes a group), `q * scale`; asymmetric 4-bit as GPTQ
does, the stored codes q + 8 with shift -(z + 8) * scale; 8-bit as int8, the codes q with a float32 shift
-z * scale where zero points are stored. Strategies group and channel (one group a row); act-order "group" (a
g_idx that reorders the inputs) is refused, "weight" keeps the inputs in order.
int8 streams codes times scales, with a third part, a float32 shift per group, where a type has one (Q5_1: m,
Q5_K: -dmin * m_j; `q * scale + shift`, the product exact, the sum rounded once as gguf does). A GGUF's types
stream per matrix: Q2_K, Q3_K, Q4_0, Q4_1 and Q4_K as int4, the rest as int8 (a scale per group of 16 or 32), in
one layer.
fp8's per-tensor, per-channel and block scales repeat into its groups of inputs (a block's scale once per row
of the block).

Activation scales (static FP8 `input_scale`) are not used: activations stay in the compute dtype.
Not supported (a one-line error says what is): act-order GPTQ (desc_act), GPTQ/AWQ of other bit widths,
AWQ's GEMV / Marlin / exllama layouts, compressed-tensors int formats other than pack-quantized 4- and 8-bit
weights by group (of 32 inputs or more) or channel, in one scheme for every config group.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .formats import NATIVE, encoded_bytes

INT4_STORE_BYTES = 4  # each float32 store of a group: a scale, and a shift where zero points are kept
FP8_SCALE_BYTES = 4  # float32, as the fp8 format's own
SUPPORTED = ("GPTQ and AWQ (gemm) int4 with desc_act false, FP8 (quant_method fp8, or compressed-tensors "
             "float-quantized 8-bit), compressed-tensors pack-quantized int 4- or 8-bit weights by group or channel "
             "without act-order groups, GGUF Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, Q3_K and Q2_K")
# GGUF block types kept as codes: (stream format, weights per float32 scale, float32 stores per group: a scale,
# or a scale and a shift). Q4_K / Q5_K: d * sc_j and -dmin * m_j per sub-block of 32; Q6_K: d * scale_j per
# sub-block of 16; Q4_1 / Q5_1: d and m per block of 32; Q4_0 (signed codes q - 8), Q5_0 and Q8_0: d; Q2_K:
# d * sc_j and -dmin * m_j per sub-block of 16; Q3_K (signed codes q in -4..3): d * (sc_j - 32) per sub-block of 16
GGUF_TYPES = {"q2_k": ("int4", 16, 2), "q3_k": ("int4", 16, 1), "q4_0": ("int4", 32, 1), "q4_1": ("int4", 32, 2),
              "q4_k": ("int4", 32, 2), "q5_0": ("int8", 32, 1), "q5_1": ("int8", 32, 2), "q5_k": ("int8", 32, 2),
              "q6_k": ("int8", 16, 1), "q8_0": ("int8", 32, 1)}


def gguf_bytes_per_weight(kind: str) -> float:
    """Bytes a weight of GGUF type `kind` sends in its stream format: codes and float32 scales (and shifts)."""
    fmt, group, stores = GGUF_TYPES[kind]
    return (1 if fmt == "int8" else 0.5) + 4 * stores / group


@dataclass(frozen=True)
class Prequantized:
    """How a checkpoint arrives quantized (from its config.json alone)."""

    method: str  # "gptq", "awq", "fp8", "compressed-tensors", "gguf"
    stream_format: str  # the stream format its codes keep: "int4", "fp8" or "int8"
    group: int  # inputs per scale (int4: and zero), -1 one per row; fp8 and gguf: 0 (per weight: its scales' shape)
    zero_offset: int = 0  # added to stored zeros: 1 for auto-gptq's v1 format (zero - 1 stored)
    block: tuple[int, int] | None = None  # fp8: [rows, inputs] a stored scale covers, when the config says
    # int4 / int8 codes: whether zero points are stored (a float32 shift per group then streams beside the
    # scale); False only for compressed-tensors' symmetric weights, whose signed codes need none
    zero_points: bool = True
    # gguf: (block type, share of the decoder layers' parameters kept in it) per type kept as codes
    gguf: tuple[tuple[str, float], ...] = ()
    # gguf: (block type, share of the fused routed experts' parameters kept in it), where experts keep codes
    experts: tuple[tuple[str, float], ...] = ()

    @property
    def label(self) -> str:
        if self.method == "gguf":
            return "GGUF " + "+".join(kind.upper() for kind, _ in self.gguf)
        per = "per row" if self.group == -1 else f"groups of {self.group}"
        if self.method == "compressed-tensors" and self.stream_format != "fp8":
            return f"{self.method} {self.stream_format} {'asymmetric' if self.zero_points else 'symmetric'} ({per})"
        if self.stream_format == "int4":
            return f"{self.method.upper()} int4 ({per})"
        return f"{self.method} e4m3"

    @property
    def codes_as(self) -> str:
        """What its codes stream as: the format, or per GGUF type where they differ ("Q4_K as int4, Q6_K as int8")."""
        formats = {GGUF_TYPES[kind][0] for kind, _ in self.gguf}
        if len(formats) <= 1:
            return self.stream_format
        return ", ".join(f"{kind.upper()} as {GGUF_TYPES[kind][0]}" for kind, _ in self.gguf)

    def stream_bytes(self, layer_bytes: int, dtype_bytes: int) -> int:
        """Bytes a layer of `layer_bytes` (compute dtype) sends per trip in its own format, as `overspill plan`
        estimates it from the config (every parameter counted as quantized, a GGUF's by its types' shares,
        the rest in the compute dtype; the load counts exactly)."""
        if self.method == "gguf":
            params = layer_bytes // dtype_bytes
            quantized = sum(share for _, share in self.gguf)
            return int(params * sum(share * gguf_bytes_per_weight(kind) for kind, share in self.gguf)
                       + layer_bytes * max(0.0, 1 - quantized))
        if self.stream_format in ("int4", "int8"):  # codes, then a float32 scale (and shift) per group
            params = layer_bytes // dtype_bytes
            groups = 0 if self.group == -1 else params // self.group  # one a row: left out, as `encoded_bytes` does
            codes = params // 2 if self.stream_format == "int4" else params
            return codes + INT4_STORE_BYTES * (2 if self.zero_points else 1) * groups
        return encoded_bytes(self.stream_format, layer_bytes, dtype_bytes, group=self.group)

    def expert_link_bytes(self, expert_bytes: int, dtype_bytes: int) -> int:
        """Bytes one routed expert of `expert_bytes` (compute dtype) sends under expert streaming, as `overspill
        plan` estimates it from the mark's `experts` shares (its codes and float32 stores; the rest, if any, in
        the compute dtype; the load counts exactly). `expert_bytes` where no expert keeps codes."""
        coded = sum(share for _, share in self.experts)
        params = expert_bytes // dtype_bytes
        return int(params * sum(share * gguf_bytes_per_weight(kind) for kind, share in self.experts)
                   + expert_bytes * max(0.0, 1 - coded))


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
    if method == "gguf":
        return _gguf(q)
    raise ValueError(f"quant_method {method or '(none)'!r} is not supported: overspill streams {SUPPORTED}")


def _gguf(q: Mapping[str, Any]) -> Prequantized:
    """A converted GGUF's mark (`runtime.gguf_blocks.mark`): the block types kept as codes and their shares."""
    types = [str(t).lower() for t in q.get("types") or ()]
    unknown = [t for t in types if t not in GGUF_TYPES]
    if not types or unknown:
        raise ValueError(f"GGUF types {unknown or '(none)'} are not supported: overspill streams {SUPPORTED}")
    shares = q.get("shares") if isinstance(q.get("shares"), Mapping) else {}
    kept = tuple((t, float(shares.get(t, 1 / len(types)))) for t in sorted(types, key=list(GGUF_TYPES).index))
    fmt = "int4" if any(GGUF_TYPES[t][0] == "int4" for t in types) else "int8"  # int4's scratch is planned then
    experts = q.get("expert_shares") if isinstance(q.get("expert_shares"), Mapping) else {}
    coded = tuple((t, float(experts[t])) for t in GGUF_TYPES if t in experts)
    return Prequantized("gguf", fmt, 0, gguf=kept, experts=coded)


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
    if fmt == "pack-quantized":
        return _pack_quantized(weights)
    fp8 = weights and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights)
    if fmt not in ("float-quantized", "naive-quantized") or not fp8:
        raise ValueError(f"compressed-tensors format {fmt or '(none)'!r} with weights "
                         f"{sorted({(w.get('type'), w.get('num_bits')) for w in weights}, key=str)} is not supported: "
                         f"overspill streams {SUPPORTED}")
    blocks = {tuple(w["block_structure"]) for w in weights if w.get("block_structure")}
    return Prequantized("compressed-tensors", "fp8", 0, block=blocks.pop() if len(blocks) == 1 else None)


def _pack_quantized(weights: list[Mapping[str, Any]]) -> Prequantized:
    """compressed-tensors' pack-quantized int weights (see above), read as its `QuantizationArgs` reads them
    (defaults int, 8 bits, symmetric; a missing strategy inferred from group_size); one scheme for every group."""
    def refuse(what: str) -> ValueError:
        return ValueError(f"compressed-tensors pack-quantized {what} is not supported: overspill streams {SUPPORTED}")

    kinds = {(str(w.get("type", "int")).lower(), w.get("num_bits", 8), w.get("symmetric", True) is not False,
              _strategy(w), w.get("group_size"), _actorder(w.get("actorder"))) for w in weights}
    if len(kinds) != 1:
        raise refuse(f"with {len(kinds)} weight schemes in its config groups")
    kind, bits, symmetric, strategy, group, actorder = kinds.pop()
    if kind != "int" or bits not in (4, 8):
        raise refuse(f"{kind} {bits}-bit weights")
    if strategy not in ("group", "channel"):
        raise refuse(f"strategy {strategy!r}")
    if actorder == "group":
        raise refuse("act-order 'group' (a g_idx that reorders the inputs)")
    group = -1 if strategy == "channel" else int(group)
    if group != -1 and group < 32:
        raise ValueError(f"compressed-tensors group_size {group} is not supported: overspill streams groups of 32 "
                         f"inputs or more, or strategy 'channel'")
    return Prequantized("compressed-tensors", "int4" if bits == 4 else "int8", group, zero_points=not symmetric)


def _strategy(weights: Mapping[str, Any]) -> str:
    """A weights entry's strategy: as written, else compressed-tensors' inference from group_size."""
    if weights.get("strategy"):
        return str(weights["strategy"]).lower()
    group = weights.get("group_size")
    return "tensor" if group is None else "channel" if group == -1 else "group"


def _actorder(value: Any) -> str | None:
    """compressed-tensors' activation ordering, aliases resolved: True and "dynamic" are "group", "static" "weight"."""
    if isinstance(value, bool):
        return "group" if value else None
    value = str(value).lower() if value is not None else None
    return {"dynamic": "group", "static": "weight"}.get(value, value)


def stream_format_for(scheme: Prequantized, requested: str, blocker: str | None = None) -> tuple[str, str]:
    """(format, note) for a pre-quantized checkpoint: "auto" and its own format keep its codes; any other
    format dequantizes the streamed layers at load (then re-encodes them in that format, bf16 aside).
    `blocker` names what the load asked for that streams only uncompressed layers (`formats.format_blocker`):
    "auto" then streams the dequantized weights."""
    own = scheme.stream_format
    if requested in ("auto", own) and not (requested == "auto" and blocker):
        return own, f"{scheme.label} checkpoint: streamed layers keep its codes ({scheme.codes_as})"
    why = f" ({blocker} streams uncompressed layers)" if requested == "auto" else ""
    fmt = NATIVE if requested == "auto" else requested
    then = "" if fmt == NATIVE else f", then encoded as {fmt}"
    return fmt, f"{scheme.label} checkpoint: streamed layers dequantized to the compute dtype{then}{why}"


def settle_format(fmt: str, note: str | None, requested: str, scheme: Prequantized | None, blocker: str | None,
                  expert_streaming: bool) -> tuple[str, str | None]:
    """The stream format `load` and `overspill plan` use once the checkpoint's own codes (`stream_format_for`)
    and expert streaming have their say: with `requested` "auto", routed experts cross per expert in the
    compute dtype, so an expert-streamed MoE model streams bf16 (a pre-quantized one saying why); a converted
    GGUF whose fused experts keep their codes sends those codes per expert (`runtime.expert_codes`), and its
    ring part dequantized."""
    if scheme is not None:
        fmt, note = stream_format_for(scheme, requested, blocker)
    if requested == "auto" and expert_streaming:
        fmt, note = NATIVE, None
        if scheme is not None and scheme.experts:
            note = (f"{scheme.label} checkpoint: routed experts cross as its codes and expand in their cache slot; "
                    f"the rest of each streamed layer dequantized to the compute dtype (expert streaming)")
        elif scheme is not None:
            note = stream_format_for(scheme, "auto", "expert streaming")[1]
    return fmt, note
