"""GGUF blocks kept as codes when a GGUF is converted (`sources.convert_gguf`): Q8_0, Q6_K, Q5_K, Q5_1, Q5_0,
Q4_K, Q4_1, Q4_0, Q3_K and Q2_K.

transformers dequantizes every tensor of a GGUF (into bf16 here). The decoder layers' matrices stored in one
of these types keep their codes instead, laid out as the stream format they map onto exactly
(`planning.prequantized.GGUF_TYPES`), in place of `X.weight`:
- Q8_0 (blocks of 32 weights of a row: fp16 d, int8 q; w = d * q): `X.q8_0_codes` int8 [out, in] and
  `X.q8_0_scales` fp16 [out, in / 32]; int8 with groups of 32.
- Q6_K (super-blocks of 256: 6-bit q as 4 low bits `ql` and 2 high bits `qh`, 16 int8 sub-scales, fp16 d;
  w = d * scale_j * (q - 32) over sub-blocks of 16): `X.q6_k_codes` int8 [out, in] (q - 32, in -32..31) and
  `X.q6_k_scales` float32 [out, in / 16] (d * scale_j, exact: 11 x 8 significant bits); int8 with groups of
  16, whose expansion `code * scale` is exact in float32 (at most 24 significant bits), one rounding.
- Q4_K (super-blocks of 256: fp16 d and dmin, 6-bit sc_j and m_j packed in 12 bytes, 4-bit q; w = d * sc_j * q
  - dmin * m_j over sub-blocks of 32): `X.q4_k_codes` uint8 [out, in / 2] (the int4 format's packing: the even
  column in the high nibble), `X.q4_k_scales` float32 (d * sc_j) and `X.q4_k_shifts` float32 (-dmin * m_j)
  [out, in / 32], both exact; int4 with float32 stores, expanded as q * scale + shift: the product exact,
  one float32 rounding of the sum (gguf's and llama.cpp's own arithmetic), then one into the compute dtype.
- Q5_K (Q4_K's layout with a fifth bit of each q in 32 bytes `qh`: bit j of qh[r] for weight 32j + r): as
  Q4_K but `X.q5_k_codes` int8 [out, in] (q, 0..31), int8 with a float32 shift per group of 32.
- Q4_0 / Q4_1 (blocks of 32: fp16 d (Q4_1: and m), 16 bytes of q, weight r < 16 in the low nibble of byte r
  and weight 16 + r in its high nibble; w = d * (q - 8), w = d * q + m): Q4_1 as Q4_K (float32 scales d,
  shifts m: gguf's own sum); Q4_0's codes q - 8 as two's-complement nibbles (`X.q4_0_codes` int8, int4's
  packing) and float32 scales d, no shifts: (q - 8) * d is gguf's product to the sign of each zero (q * d - 8d,
  unsigned codes, gives +0.0 where gguf gives -0.0: q = 8 with d < 0); signed int4.
- Q5_0 / Q5_1 (Q4_0 / Q4_1 with a fifth bit of each q in a little-endian uint32 `qh` after d (and m), bit r
  for weight r; w = d * (q - 16), w = d * q + m): Q5_0 as Q8_0 (`X.q5_0_codes` int8 q - 16, fp16 d), Q5_1 as
  Q5_K (int8 q, float32 d and m); int8.
- Q3_K (super-blocks of 256: 32 bytes hmask, 64 bytes of 2-bit ql, 16 6-bit sc_j packed in 12 bytes, fp16 d;
  q = ql - 4 where the hmask bit is clear, in -4..3; w = d * (sc_j - 32) * q over sub-blocks of 16): as Q4_0,
  `X.q3_k_codes` int8 [out, in / 2] (q as two's-complement nibbles) and `X.q3_k_scales` float32 [out, in / 16]
  (d * (sc_j - 32), exact as gguf computes it: 11 x 6 significant bits), whose product with q is exact; signed
  int4 with groups of 16 (unsigned q + 4 with a shift would cost a store a group and turn gguf's -0.0, q = 0
  under a negative scale, into +0.0).
- Q2_K (super-blocks of 256: 16 bytes of 4-bit sc_j (low) and m_j (high), 64 bytes of 2-bit q, fp16 d and dmin;
  w = d * sc_j * q - dmin * m_j over sub-blocks of 16): as Q4_K with groups of 16, `X.q2_k_codes` uint8
  [out, in / 2] (q, 0..3), `X.q2_k_scales` (d * sc_j) and `X.q2_k_shifts` (-dmin * m_j) float32 [out, in / 16].
The config gets `quantization_config` {"quant_method": "gguf", "types": [...], "shares": {type: share of the
decoder layers' parameters}} (`mark`, read by `planning.prequantized`). Each kept weight is checked against
transformers' conversion (its dequantization rounded to the model's dtype equals what transformers wrote): a
weight whose GGUF-to-HF name map or row permutation did not reproduce it stays as transformers wrote it.

Routed experts that transformers fuses into 3-D parameters (Qwen2-MoE, Qwen3-MoE: `mlp.experts.gate_up_proj`
[experts, 2 * ffn, hidden] and `mlp.experts.down_proj` [experts, hidden, ffn]) keep their codes too, as
`X.<type>_codes` etc. with the expert dimension leading ([experts, rows, ...]). GGUF stores them as
`blk.N.ffn_{gate,up,down}_exps` [experts, rows, blocks]; transformers' `Qwen2MoeTensorProcessor` writes gate's
rows then up's into each expert of gate_up_proj and down as it is, with no transpose or row permutation, so an
expert's codes are gate's codes then up's (`_fused_experts`): kept where gate and up share one type, else left
dequantized. Mixtral GGUFs (`gguf_mixtral`) fuse the same way. The mark adds `expert_shares`, each type's share
of the routed experts' parameters (what `overspill plan` counts an expert's bytes over the link by under expert
streaming).

IQ* and the rest (TQ*, MXFP4, ...) stay dequantized: not supported yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..planning.prequantized import GGUF_TYPES
from .quant import int4_codes

QK_K = 256  # weights per K-quant super-block
PARTS = {kind: ("codes", "scales", "shifts")[: 1 + stores] for kind, (_, _, stores) in GGUF_TYPES.items()}
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}  # blocks of 32 weights
EXPERTS = re.compile(r"blk\.\d+\.ffn_(gate|up|down)_exps\.weight")  # a GGUF's routed experts, [experts, rows, ..]
FUSED_ORDER = ("gate", "up", "down")  # transformers' gate_up_proj: gate's rows, then up's, in each expert


def keys(kind: str) -> tuple[str, ...]:
    """The suffixes, after the weight's name without ".weight", of a kept weight's tensors (codes first)."""
    return tuple(f".{kind}_{part}" for part in PARTS[kind])


@dataclass(frozen=True)
class Kept:
    """One weight kept as codes: its GGUF type and tensors (`keys(kind)` order), rows as the model's."""

    kind: str
    tensors: tuple[torch.Tensor, ...]

    @property
    def numel(self) -> int:
        return self.tensors[0].numel() * (2 if GGUF_TYPES[self.kind][0] == "int4" else 1)

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape ([out, in], or [experts, out, in] for fused experts)."""
        codes = self.tensors[0]
        return (*codes.shape[:-1], self.numel // (codes.numel() // codes.shape[-1]))


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of each block of `b` [out, n, block bytes], as float32 [out, n, 1]."""
    return np.ascontiguousarray(b[..., at : at + 2]).view(np.float16).astype(np.float32)


def _int4(q: np.ndarray) -> np.ndarray:
    """Codes 0..15 [out, in] in the int4 format's packing [out, in / 2]: the even column in the high nibble."""
    return (q[:, ::2] << 4 | q[:, 1::2]).astype(np.uint8)


def unpack(kind: str, raw: np.ndarray) -> tuple[np.ndarray, ...]:
    """A GGUF matrix's raw blocks (uint8 [out, blocks * block bytes]) as `keys(kind)`'s arrays."""
    out = raw.shape[0]
    if kind == "q8_0":
        b = raw.reshape(out, -1, BLOCK_BYTES[kind])  # [out, in / 32, d q..]
        return (np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(out, -1),
                np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0])
    if kind in BLOCK_BYTES:  # q4_0 d qs[16]; q4_1 d m qs; q5_0 d qh[4] qs; q5_1 d m qh qs
        b = raw.reshape(out, -1, BLOCK_BYTES[kind])  # [out, in / 32, block]
        qs = b[..., -16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1)  # [out, n, 32]: weight r < 16 low, 16 + r high
        d = _f16(b, 0)
        if kind.startswith("q5"):  # bit r of the little-endian uint32 before qs: weight r's fifth bit
            qh = np.unpackbits(b[..., -20:-16], axis=-1, bitorder="little")
            q = q | qh << 4
        if kind == "q5_0":
            return (q.astype(np.int8) - np.int8(16)).reshape(out, -1), d[..., 0].astype(np.float16)
        q = q.reshape(out, -1)
        if kind == "q4_0":  # (q - 8) & 15 = q ^ 8: the nibble of q - 8
            return _int4(q ^ 8).view(np.int8), d[..., 0]
        codes = _int4(q) if kind == "q4_1" else q.astype(np.int8)
        return codes, d[..., 0], _f16(b, 2)[..., 0]
    b = raw.reshape(out, -1, {"q6_k": 210, "q5_k": 176, "q4_k": 144, "q3_k": 110, "q2_k": 84}[kind])  # [out, n, ..]
    if kind in ("q2_k", "q3_k"):  # q2_k: sc|m[16] qs[64] d dmin; q3_k: hmask[32] qs[64] scales[12] d. Weight
        # 128h + 32s + l has 2 bits qs[32h + l] >> 2s, in sub-block (128h + 32s + l) // 16
        qs = b[..., 16:80] if kind == "q2_k" else b[..., 32:96]
        q = (qs.reshape(out, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None] & 3).reshape(out, -1)
        if kind == "q2_k":
            s = b[..., :16]
            scales = _f16(b, 80) * (s & 15).astype(np.float32)  # d * sc_j, exact: 11 x 4 significant bits
            shifts = -(_f16(b, 82) * (s >> 4).astype(np.float32))  # -dmin * m_j, exact
            return _int4(q), scales.reshape(out, -1), shifts.reshape(out, -1)
        # the hmask bit (weight 32k + l: bit k of hmask[l]) clear: q = ql - 4, the nibble ql + 12 (mod 16)
        high = (b[..., :32].reshape(out, -1, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None] & 1).reshape(out, -1)
        q |= (high ^ 1) * np.uint8(12)
        # sc_j: the low (j < 8) or high nibble of byte j % 8, its top 2 bits the (j // 4)-th pair of byte 8 + j % 4
        low = b[..., 96:104].reshape(out, -1, 1, 8) >> np.array([0, 4], np.uint8)[:, None] & 15
        top = b[..., 104:108].reshape(out, -1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8)[:, None] & 3
        sc = (low.reshape(out, -1, 16) | top.reshape(out, -1, 16) << 4).astype(np.int8) - np.int8(32)
        return _int4(q).view(np.int8), (_f16(b, 108) * sc.astype(np.float32)).reshape(out, -1)  # exact
    if kind == "q6_k":  # ql[128] qh[64] scales[16] d: weight 128h + 64s + l has low bits ql[64h + l] >> 4s,
        ql, qh = b[..., :128].reshape(out, -1, 2, 1, 64), b[..., 128:192].reshape(out, -1, 2, 1, 32)
        low = (ql >> np.array([0, 4], np.uint8)[:, None]) & 15  # [out, n, 2, 2, 64]
        high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # weight 128h + 32k + l: qh[32h + l] >> 2k
        q = (low.reshape(out, -1, QK_K) | high.reshape(out, -1, QK_K) << 4).astype(np.int8) - np.int8(32)
        scales = _f16(b, 208) * np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)  # exact
        return q.reshape(out, -1), scales.reshape(out, -1)
    # q4_k: d dmin scales[12] qs[128]; q5_k: d dmin scales[12] qh[32] qs[128]. Sub-block 2i holds the low
    # nibbles of qs[32i:32i + 32], 2i + 1 the high; Q5_K's sub-block j takes bit j of qh[r] as weight r's fifth
    d, dmin = _f16(b, 0), _f16(b, 2)  # [out, n, 1]
    s = b[..., 4:16]
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]  # sc_j, m_j: 6 bits of bytes j, j + 4 (j < 4); else
    sc = np.concatenate([lo & 63, (hi & 15) | (lo >> 6) << 4], axis=-1)  # 4 bits of byte j + 4 and the top 2
    m = np.concatenate([mid & 63, (hi >> 4) | (mid >> 6) << 4], axis=-1)  # of bytes j - 4 (sc) and j (m)
    qs = b[..., -128:].reshape(out, -1, 4, 1, 32)
    q = ((qs >> np.array([0, 4], np.uint8)[:, None]) & 15).reshape(out, -1)  # [out, in], 0..15
    scales = (d * sc.astype(np.float32)).reshape(out, -1)  # exact: 11 x 6 significant bits
    shifts = -(dmin * m.astype(np.float32)).reshape(out, -1)
    if kind == "q4_k":
        return _int4(q), scales, shifts
    qh = b[..., 16:48].reshape(out, -1, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None] & 1  # [out, n, 8, 32]
    return (q | qh.reshape(out, -1) << 4).astype(np.int8), scales, shifts


def dequantize(kind: str, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The reference dequantization in float32, [out, in], of `keys(kind)`'s tensors (any rows of them, on any
    device; fused experts: [experts, out, in]): code * scale (exact) for Q8_0, Q6_K, Q5_0, Q4_0 (its signed
    codes q - 8) and Q3_K (signed q); code * scale + shift for the rest (the product exact, the sum rounded
    once, as gguf computes d * sc * q - dmin * m and d * q + m).
    `Kept` checks conversions against it, and `runtime.prequantized` fills resident weights with it."""
    lead = tuple(tensors[0].shape[:-1])  # fused experts: [experts, out], rows of one matrix each
    flat = [t.reshape(-1, t.shape[-1]) for t in tensors]
    codes, scales = flat[0], flat[1].float()
    out = codes.shape[0]
    if GGUF_TYPES[kind][0] == "int4":
        codes = int4_codes(codes)
    w = codes.view(out, scales.shape[1], -1).float() * scales[..., None]
    return (w + flat[2][..., None] if len(flat) > 2 else w).view(*lead, -1)


def kept_weights(gguf: Path, model: torch.nn.Module, layers_path: str) -> dict[str, Kept]:
    """{parameter name: its codes} of the decoder-layer matrices (under `layers_path`) and fused routed experts
    that `gguf` stores in a type of `GGUF_TYPES` and transformers placed in `model` (dequantized) as exactly
    `dequantize` of them."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    reader = GGUFReader(gguf)
    blocks = [t for t in reader.tensors if t.tensor_type.name.lower() in GGUF_TYPES
              and (len(t.shape) == 2 or EXPERTS.fullmatch(t.name) and len(t.shape) == 3)]
    if not blocks:
        return {}
    architecture = read_field(reader, "general.architecture")[0]
    config = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    if model.config.model_type == "mixtral":  # a llama GGUF with experts (`gguf_mixtral`)
        from .gguf_mixtral import MixtralTensorProcessor, weights_map

        processor, names = MixtralTensorProcessor(config=config), weights_map(model)
    else:
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
        names = get_gguf_hf_weights_map(model, processor)
    params = dict(model.named_parameters())
    found: dict[str, list[tuple[str, Kept]]] = {}  # parameter name -> (GGUF part: gate / up / down / "", codes)
    for tensor in blocks:
        unpacked = _unpacked(tensor, processor, names)
        if unpacked is not None and unpacked[0].startswith(f"{layers_path}."):
            found.setdefault(unpacked[0], []).append(unpacked[1:])
    kept = {}
    for name, parts in found.items():
        weight, param = _fused_experts(parts), params.get(name)
        if weight is not None and param is not None and _matches(weight, param):
            kept[name] = weight
    return kept


def _unpacked(tensor, processor, names: dict[str, str]) -> tuple[str, str, Kept] | None:
    """(parameter name, GGUF expert part or "", codes) of one GGUF tensor, rows as transformers writes them:
    a matrix through the tensor processor's row permutation (llama's q and k), to every array alike; a
    fused-experts tensor as it is (transformers copies its rows unchanged). None where neither applies."""
    kind = tensor.tensor_type.name.lower()
    raw = np.asarray(tensor.data)
    experts = EXPERTS.fullmatch(tensor.name)
    try:
        arrays = unpack(kind, raw.reshape(-1, raw.shape[-1]))
        if experts:  # [experts, rows, ..]: the map names them without ".weight"
            done = [a.reshape(*raw.shape[:-1], -1) for a in arrays]
            name = names.get(tensor.name[: -len(".weight")])
        else:
            processed = [processor.process(weights=a, name=tensor.name) for a in arrays]
            done, name = [d.weights for d in processed], names.get(processed[0].name)
    except Exception:  # noqa: BLE001 - a processor that needs more than a row permutation: left dequantized
        return None
    if name is None:
        return None
    return name, experts[1] if experts else "", Kept(kind, tuple(torch.from_numpy(np.ascontiguousarray(d))
                                                                 for d in done))


def _fused_experts(parts: list[tuple[str, Kept]]) -> Kept | None:
    """One parameter's codes from its GGUF tensors: a matrix's own, or fused experts' gate then up along the
    rows of each expert (transformers' gate_up_proj), where they share a type; None otherwise."""
    if len(parts) == 1:
        return parts[0][1]
    parts = sorted(parts, key=lambda p: FUSED_ORDER.index(p[0]) if p[0] in FUSED_ORDER else len(FUSED_ORDER))
    kinds = {weight.kind for _, weight in parts}
    if len(kinds) != 1 or [tag for tag, _ in parts] != ["gate", "up"]:
        return None
    tensors = zip(*(weight.tensors for _, weight in parts))
    return Kept(kinds.pop(), tuple(torch.cat(pieces, dim=-2) for pieces in tensors))


def _matches(weight: Kept, param: torch.Tensor) -> bool:
    """Whether `weight` dequantizes (rounded to the parameter's dtype) to exactly what transformers wrote; a
    fused-experts parameter is checked an expert at a time, so float32 temporaries stay one expert's size."""
    if param.dim() not in (2, 3) or weight.shape != tuple(param.shape):
        return False
    if param.dim() == 2:
        return torch.equal(dequantize(weight.kind, weight.tensors).to(param.dtype), param)
    return all(torch.equal(dequantize(weight.kind, tuple(t[e] for t in weight.tensors)).to(param.dtype), param[e])
               for e in range(param.shape[0]))


def mark(model: torch.nn.Module, kept: dict[str, Kept], layers_path: str) -> dict:
    """The converted config's `quantization_config`: the types kept and each one's share of the decoder
    layers' parameters (what `overspill plan` counts their streamed bytes by) and, where fused routed experts
    keep codes, each type's share of those experts' parameters (`expert_shares`: their bytes per expert)."""
    decoder = {n: p for n, p in model.named_parameters() if n.startswith(f"{layers_path}.")}
    total = sum(p.numel() for p in decoder.values())
    experts = sum(p.numel() for p in decoder.values() if p.dim() == 3)
    counts: dict[str, int] = {}
    expert_counts: dict[str, int] = {}
    for name, weight in kept.items():
        counts[weight.kind] = counts.get(weight.kind, 0) + weight.numel
        if decoder[name].dim() == 3:
            expert_counts[weight.kind] = expert_counts.get(weight.kind, 0) + weight.numel
    types = [kind for kind in GGUF_TYPES if kind in counts]
    out = {"quant_method": "gguf", "types": types, "shares": {k: round(counts[k] / total, 6) for k in types}}
    if expert_counts:
        out["expert_shares"] = {k: round(expert_counts[k] / experts, 6) for k in GGUF_TYPES if k in expert_counts}
    return out


def save(model: torch.nn.Module, kept: dict[str, Kept], path: Path) -> None:
    """The model's tensors into one safetensors file, each kept weight as its codes and scales instead
    (tensors sharing storage, tied embeddings, written once: the reader maps tied names onto each other)."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        where = (t.data_ptr(), tuple(t.shape), t.dtype)
        if name in kept or where in seen:
            continue
        seen.add(where)
        tensors[name] = t.contiguous()
    for name, weight in kept.items():
        base = name.removesuffix(".weight")  # fused experts' parameters have no ".weight"
        tensors.update({base + key: t for key, t in zip(keys(weight.kind), weight.tensors)})
    save_file(tensors, str(path), metadata={"format": "pt"})
