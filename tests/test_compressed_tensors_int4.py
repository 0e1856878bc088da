"""compressed-tensors pack-quantized int checkpoints (llm-compressor's W4A16 / W8A16, e.g.
RedHatAI/Meta-Llama-3.1-70B-Instruct-quantized.w4a16) stream as they are: the streamed layers keep the
checkpoint's codes and expand to the reference dequantization bit for bit; the model decodes as a plain
transformers model holding the dequantized weights; the link and the plan count the codes' bytes;
what is not supported is a one-line error.

The checkpoints are built here from test_prequantized's tiny random llama: its decoder matrices quantized by a
min/max quantizer like compressed-tensors' own and packed as its `pack_to_int32` lays them out
(vllm-project/compressed-tensors, src/compressed_tensors/compressors/pack_quantized/helpers.py; in older releases
src/compressed_tensors/compressors/quantized_compressors/pack_quantized.py, the same bits for 4 and 8 bits):
a signed code q is stored as q + 2^(bits-1), 32 / bits of them an int32 along the inputs, element j of each int32
in bits j * bits onwards; asymmetric zero points packed the same way along the outputs, [out / (32 / bits),
groups] (since 0.9.4; before it, signed int8 [out, groups]); `weight_shape` the [out, in]. Its dequantization is
`(q - z) * scale` in the scale's dtype (`quantization/lifecycle/forward.py::_dequantize`). Beside each, a plain
checkpoint holding that dequantization in float32 (exact there).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from overspill.planning.prequantized import scheme_of
from overspill.runtime.layout import TensorEntry

from test_prequantized import (GEN, assert_same_decoding, build_pair, check_round_trip, load_streamed, plan_json,
                               plan_table, prompt, reader_of, refusal, streamed_placement)

# name -> (the config group's weights, the scales' (and the model's) dtype, how zero points are stored)
SCHEMES = {
    "w4-sym-group": ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128},
                     torch.bfloat16, None),
    "w4-sym-channel": ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}, torch.float16, None),
    "w4-asym-group": ({"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32},
                      torch.bfloat16, "packed"),
    "w4-asym-channel-int8-zp": ({"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"},
                                torch.float16, "int8"),  # compressed-tensors before 0.9.4 kept zero points unpacked
    "w8-sym-channel": ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, torch.bfloat16, None),
    "w8-asym-group": ({"num_bits": 8, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64},
                      torch.bfloat16, "packed"),
}


def quantization_config(weights: dict) -> dict:
    """A config.json's quantization_config as llm-compressor writes it for one weight-only scheme."""
    args = {"group_size": None, "actorder": None, "block_structure": None, "dynamic": False, "observer": "minmax",
            "observer_kwargs": {}, **weights}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "kv_cache_scheme": None, "config_groups": {"group_0": {
                "targets": ["Linear"], "weights": args, "input_activations": None, "output_activations": None}}}


# --- compressed-tensors' quantization and packing, written from its source -----------------------------------

def pack_to_int32(value: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """compressed-tensors' `pack_to_int32` for 4 and 8 bits: signed `value` + 2^(bits-1), 32 / bits an int32
    along `dim`, element j of each int32 in bits j * bits onwards (int64 sums, then the int32 of those bits)."""
    per = 32 // bits
    u = value.to(torch.int64) + (1 << (bits - 1))
    u = u if dim == 1 else u.t()
    words = (u.reshape(u.shape[0], -1, per) << (torch.arange(per) * bits)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return (words if dim == 1 else words.t()).contiguous()


def unpack_from_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' `unpack_from_int32` along the inputs: the signed codes, int8."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    u = (packed[..., None] >> shifts).bitwise_and_((1 << bits) - 1).view(packed.shape[0], -1)
    return (u - (1 << (bits - 1))).to(torch.int8)


def quantize(w: torch.Tensor, bits: int, group: int, symmetric: bool, scale_dtype: torch.dtype):
    """(codes q int8 [out, in], zero points z int8 [out, groups], scales [out, groups] in `scale_dtype`) of `w`:
    compressed-tensors' min/max qparams (the range widened to hold 0; symmetric: max |w| / (range / 2), z = 0)."""
    q_min, q_max = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    out_f, in_f = w.shape
    g = w.view(out_f, -1, in_f if group == -1 else group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / ((q_max - q_min) / 2)
    else:
        scale = (hi - lo) / (q_max - q_min)
    scale = scale.clamp(min=1e-4).to(scale_dtype)
    zero = torch.zeros_like(lo) if symmetric else (q_min - (lo / scale.float()).round()).clamp(q_min, q_max)
    q = ((g / scale.float()[..., None]).round() + zero[..., None]).clamp(q_min, q_max)
    return q.view(out_f, in_f).to(torch.int8), zero.to(torch.int8), scale


def dequantize(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
    """compressed-tensors' `(q - z) * scale` by groups, computed in `dtype` (float32: exact)."""
    out_f, in_f = q.shape
    w = q.view(out_f, scale.shape[1], -1).to(dtype) - zero[..., None].to(dtype)
    return (w * scale[..., None].to(dtype)).view(out_f, in_f)


def build(root: Path, name: str) -> tuple[Path, Path]:
    """(the pack-quantized checkpoint, the plain one holding its reference dequantization) for scheme `name`."""
    weights, storage, zero_points = SCHEMES[name]
    bits, group = weights["num_bits"], weights.get("group_size") or -1

    def quantize_matrix(base: str, t: torch.Tensor):
        q, zero, scale = quantize(t, bits, group, weights["symmetric"], storage)
        tensors = {f"{base}.weight_packed": pack_to_int32(q, bits), f"{base}.weight_scale": scale,
                   f"{base}.weight_shape": torch.tensor(t.shape)}
        if zero_points == "packed":
            tensors[f"{base}.weight_zero_point"] = pack_to_int32(zero, bits, dim=0)
        elif zero_points == "int8":
            tensors[f"{base}.weight_zero_point"] = zero
        return tensors, dequantize(q, zero, scale)

    return build_pair(root, name, storage, quantization_config(weights), quantize_matrix)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`checkpoints(name)`: `build`'s pair for scheme `name`, built once."""
    return functools.cache(functools.partial(build, tmp_path_factory.mktemp("compressed-tensors")))


# --- (1) repacking: the expanded weight is the reference dequantization, bit for bit ---------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_streamed_parts_expand_to_the_reference_bit_for_bit(name: str, dtype: torch.dtype, checkpoints) -> None:
    """Streamed parts expanded as the ring does, and the resident fill: the float32 reference rounded once."""
    check_round_trip(*checkpoints(name), dtype, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_gpu_streamed_parts_expand_to_the_reference_bit_for_bit(name: str, dtype: torch.dtype, checkpoints) -> None:
    """The same on CUDA: its unpacking shifts, signed int4 expansion and int8 shifts."""
    check_round_trip(*checkpoints(name), dtype, torch.device("cuda"))


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_the_reference_is_compressed_tensors_own_arithmetic(name: str, checkpoints) -> None:
    """compressed-tensors dequantizes in the scale's dtype: `(q - z) * scale` there is the float32 reference
    rounded once (bf16 / fp16 products of small integers are exact in float32), so overspill's bits are its bits."""
    qdir, ref = checkpoints(name)
    weights, storage, _ = SCHEMES[name]
    stored, plain = load_file(str(qdir / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    base = "model.layers.1.mlp.down_proj"
    q = unpack_from_int32(stored[f"{base}.weight_packed"], weights["num_bits"])
    scale = stored[f"{base}.weight_scale"]
    zero = stored.get(f"{base}.weight_zero_point")
    if zero is not None and zero.dtype == torch.int32:
        zero = unpack_from_int32(zero.t().contiguous(), weights["num_bits"]).t()
    zero = torch.zeros(scale.shape, dtype=torch.int8) if zero is None else zero
    assert bool((zero != 0).any()) == (not weights["symmetric"])  # asymmetric checkpoints use their zero points
    upstream = dequantize(q, zero, scale, storage)
    assert torch.equal(upstream.view(torch.int16), plain[f"{base}.weight"].to(storage).view(torch.int16))


def test_symmetric_int4_parts_are_signed_codes_and_a_scale(checkpoints) -> None:
    """W4A16's codes repacked as Q4_0's: [out, in] two a byte as two's-complement nibbles (even input high),
    a float32 scale per group, no shift."""
    qdir, _ = checkpoints("w4-sym-group")
    reader = reader_of(qdir)
    try:
        entry = TensorEntry("mlp.down_proj.weight", 0, (128, 256), torch.bfloat16)  # [128, 256], groups of 128
        kind, shapes = reader.parts_of("model.layers.2.")("int4", entry)
        assert kind == "int4" and shapes == [((128, 128), torch.int8), ((128, 2, 1), torch.float32)]
        parts = [torch.empty(s, dtype=d) for s, d in shapes]
        reader.fill_parts("model.layers.2.mlp.down_proj.weight", parts)
        packed, scale = (reader.raw(f"model.layers.2.mlp.down_proj.{k}") for k in ("weight_packed", "weight_scale"))
        o, i = 5, 77  # input 77: nibble 5 of int32 9; odd, so the low nibble of byte 38
        q = ((int(packed[o, i // 8]) >> (4 * (i % 8))) & 15) - 8
        low = int(parts[0][o, 38]) & 15
        assert low - 16 * (low >= 8) == q  # the low nibble, two's complement
        assert parts[1][o, i // 128, 0] == scale[o, i // 128].float()
    finally:
        reader.close()


@pytest.mark.parametrize("name,want", [
    ("w4-asym-group", [((128, 128), torch.uint8), ((128, 8, 1), torch.float32), ((128, 8, 1), torch.float32)]),
    ("w8-sym-channel", [((128, 256), torch.int8), ((128, 1, 1), torch.float32)]),
    ("w8-asym-group", [((128, 256), torch.int8), ((128, 4, 1), torch.float32), ((128, 4, 1), torch.float32)]),
])
def test_other_parts_keep_codes_scales_and_shifts(name: str, want: list, checkpoints) -> None:
    """Asymmetric 4-bit as GPTQ's (codes q + 8, shift -(z + 8) * scale); 8-bit as int8 (codes q, shift -z * scale)."""
    qdir, _ = checkpoints(name)
    bits = SCHEMES[name][0]["num_bits"]
    reader = reader_of(qdir)
    try:
        entry = TensorEntry("mlp.down_proj.weight", 0, (128, 256), torch.bfloat16)
        kind, shapes = reader.parts_of("model.layers.2.")(f"int{bits}", entry)
        assert kind == f"int{bits}" and shapes == want
        parts = [torch.empty(s, dtype=d) for s, d in shapes]
        reader.fill_parts("model.layers.2.mlp.down_proj.weight", parts)
        base = "model.layers.2.mlp.down_proj"
        q = unpack_from_int32(reader.raw(f"{base}.weight_packed"), bits)
        scale = reader.raw(f"{base}.weight_scale").float()
        o, i = 5, 77
        g = i // (256 // scale.shape[1])
        if bits == 4:
            assert int(parts[0][o, 38]) & 15 == q[o, i] + 8
        else:
            assert parts[0][o, i] == q[o, i]
        assert parts[1][o, g, 0] == scale[o, g]
        if len(parts) > 2:
            z = unpack_from_int32(reader.raw(f"{base}.weight_zero_point").t().contiguous(), bits).t()[o, g]
            assert parts[2][o, g, 0] == -(int(z) + (8 if bits == 4 else 0)) * scale[o, g]
    finally:
        reader.close()


# --- (2) loading: the streamed model decodes as transformers' model of the dequantized weights ----------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_streamed_checkpoint_decodes_as_the_dequantized_model(name: str, dtype: str, checkpoints) -> None:
    from transformers import AutoModelForCausalLM

    qdir, ref = checkpoints(name)
    plain = AutoModelForCausalLM.from_pretrained(ref, dtype=getattr(torch, dtype)).eval()
    resident, model, plan = load_streamed(qdir, ref, dtype)  # one or two of the six layers stay resident
    assert plan.stream_format == f"int{SCHEMES[name][0]['num_bits']}"
    assert any("compressed-tensors int" in n and "streamed layers keep its codes" in n for n in plan.notes)
    with torch.no_grad():
        a = plain.generate(prompt(), **GEN)
    assert torch.equal(a, assert_same_decoding(resident, model))  # and the resident's tokens and logits


# --- (3) what is not supported says so in one line -------------------------------------------------------------

@pytest.mark.parametrize("change,words", [
    ({"num_bits": 2}, "int 2-bit weights"),
    ({"type": "float"}, "float 4-bit weights"),
    ({"strategy": "tensor", "group_size": None}, "strategy 'tensor'"),
    ({"strategy": "block", "block_structure": [128, 128]}, "strategy 'block'"),
    ({"actorder": "group"}, "act-order 'group'"),
    ({"actorder": "dynamic"}, "act-order 'group'"),
    ({"actorder": True}, "act-order 'group'"),
    ({"group_size": 16}, "group_size 16"),
    ({"format": "int-quantized"}, "'int-quantized'"),
    ({"second group": {"num_bits": 8}}, "2 weight schemes"),
])
def test_unsupported_variants_are_one_line_errors(change: dict, words: str, checkpoints, tmp_path) -> None:
    qdir, _ = checkpoints("w4-sym-group")
    config = json.loads((qdir / "config.json").read_text())
    q = config["quantization_config"]
    weights = q["config_groups"]["group_0"]["weights"]
    if "format" in change:
        q["format"] = change["format"]
    elif "second group" in change:
        second = {**weights, **change["second group"]}
        q["config_groups"]["group_1"] = {"targets": ["re:.*down_proj"], "weights": second}
    else:
        weights.update(change)
    error = refusal(qdir, tmp_path, "not supported", config=config)
    assert words in error and "\n" not in error
    assert "compressed-tensors pack-quantized int 4- or 8-bit" in error or "groups of 32" in error


@pytest.mark.parametrize("damage,words", [
    ("g_idx", "reorders the inputs (act-order)"),
    ("float32 scales", "with bf16 or fp16 scales"),
    ("padded", "pads its inputs"),
])
def test_unsupported_tensors_are_refused_at_load(damage: str, words: str, checkpoints, tmp_path) -> None:
    """What only the tensors show: a g_idx out of order, asymmetric float32 scales, inputs padded to fill int32s."""
    qdir, _ = checkpoints("w4-asym-group")
    tensors = load_file(str(qdir / "model.safetensors"))
    base = "model.layers.0.mlp.down_proj"  # 256 inputs in groups of 32
    if damage == "g_idx":
        tensors[f"{base}.weight_g_idx"] = (torch.arange(256, dtype=torch.int32) // 32).flip(0).contiguous()
    elif damage == "float32 scales":
        tensors[f"{base}.weight_scale"] = tensors[f"{base}.weight_scale"].float()
    else:
        tensors[f"{base}.weight_shape"] = torch.tensor([128, 250])
    error = refusal(qdir, tmp_path, "not supported|overspill streams", tensors=tensors, gpu_memory=None)
    assert words in error and "\n" not in error


# --- (4) bytes: the plan and the link count the codes and their float32 stores --------------------------------

LAYER_PARAMS = sum(128 * n for n in (128, 64, 64, 128, 256, 256)) + 256 * 128  # one layer's seven matrices
NORM_BYTES = 2 * 128 * 2  # two bf16 norms, raw


def codes_bytes(name: str) -> int:
    """A layer's matrices in the stream format: codes, then float32 stores (a scale; a shift too where zero
    points are kept) per group, one group a row for channel (each matrix's rows)."""
    weights, _, zero_points = SCHEMES[name]
    bits, group, stores = weights["num_bits"], weights.get("group_size"), 2 if zero_points else 1
    rows = 128 + 64 + 64 + 128 + 256 + 256 + 128  # q k v o gate up down
    groups = LAYER_PARAMS // group if group else rows
    return LAYER_PARAMS * bits // 8 + 4 * stores * groups


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_planned_bytes_per_weight(name: str, checkpoints) -> None:
    """`Prequantized.stream_bytes` from the config alone: bits / 8 a weight, 4 or 8 bytes a group (channel:
    the per-row scales left out, as for GPTQ's group_size -1)."""
    qdir, _ = checkpoints(name)
    scheme = scheme_of(json.loads((qdir / "config.json").read_text()))
    weights, _, zero_points = SCHEMES[name]
    assert scheme.zero_points == (not weights["symmetric"]) and scheme.stream_format == f"int{weights['num_bits']}"
    layer = 2 * LAYER_PARAMS
    group = weights.get("group_size")
    stores = 4 * (2 if zero_points else 1) * (LAYER_PARAMS // group if group else 0)
    assert scheme.stream_bytes(layer, 2) == LAYER_PARAMS * weights["num_bits"] // 8 + stores
    per_weight = scheme.stream_bytes(layer, 2) / LAYER_PARAMS
    grouped = {"w4-sym-group": 0.5 + 4 / 128, "w4-asym-group": 0.5 + 8 / 32, "w8-asym-group": 1 + 8 / 64}
    assert per_weight == grouped.get(name, weights["num_bits"] / 8)


@pytest.mark.parametrize("name", ["w4-sym-group", "w4-asym-channel-int8-zp", "w8-asym-group"])
def test_streamed_host_bytes_are_the_codes_bytes(name: str, checkpoints) -> None:
    qdir, _ = checkpoints(name)
    placement = streamed_placement(qdir)  # the plan's bytes a step, the host buffers'
    assert placement.ring.layers
    want = codes_bytes(name) + NORM_BYTES
    for layer in placement.ring.layers:
        assert want <= layer.host.numel() == layer.encoded.nbytes <= want + 256 * 10  # + alignment of each part


def test_plan_shows_the_checkpoints_int4_bytes(checkpoints, capsys) -> None:
    qdir, _ = checkpoints("w4-sym-group")
    got = plan_json(qdir, capsys)
    assert got["plan"]["stream_format"] == "int4"
    streamed = got["plan"]["layer_tiers"].count("pinned")
    params = LAYER_PARAMS + 2 * 128  # the plan counts every parameter as quantized, norms too
    assert streamed and got["plan"]["streamed_bytes_per_step"] == streamed * (params // 2 + 4 * params // 128)
    table = plan_table(qdir, capsys)
    note = "compressed-tensors int4 symmetric (groups of 128) checkpoint: streamed layers keep its codes (int4)"
    assert note in table
