"""GGUF Q4_0, Q4_1, Q5_0 and Q5_1 decoder weights stream as their own codes (`runtime.gguf_blocks`): Q4_1 as
int4 with float32 scales d and shifts m per group of 32 (d * q + m: the product exact, one rounding of the sum,
gguf's own arithmetic), Q4_0 as signed int4 (codes q - 8, scales d, no shifts), Q5_0 as int8 (codes
q - 16, scales d), Q5_1 as int8 (codes q) with float32 scales d and shifts m.

The reference is gguf's own dequantization (`gguf.quants.dequantize`, float32), compared as bits: Q4_0's
(q - 8) * d gives -0.0 wherever q = 8 and d < 0, which `q * d - 8d` (unsigned codes, shift -8d) would turn
into +0.0. The blocks are gguf's own quantization (`gguf.quants.quantize`, llama.cpp's reference rounding) of
random weights whose blocks span fp16 subnormal to near-overflow scales, with blocks of all zeros, of one
value and of one weight. The tiny GGUF (SmolLM2's tokenizer and llama metadata, hidden 256) mixes the four
types with Q5_K, Q6_K and Q8_0, an IQ4_NL matrix (not kept: dequantized) and a Q6_K embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf_kquants import (FFN, HF, HIDDEN, LAYERS, SHAPES, assert_expands_to_the_reference,
                              assert_link_carries_the_codes, assert_same_generation, bits, encode_layer,
                              gguf_reference, load_streamed, random_blocks, reader_for, resident_weights,
                              write_tiny_gguf)

from overspill.planning.prequantized import scheme_of, stream_format_for
from overspill.runtime import gguf_blocks

LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1"]


def weights(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [rows, cols], N(0, 1) per block of 32 times 10^e, e in -8..4 (fp16 d from subnormal or zero
    to thousands); the first row's blocks: all zeros, one value, one nonzero weight, then +-60000 (fp16 near
    overflow)."""
    w = rng.standard_normal((rows, cols // 32, 32)) * 10.0 ** rng.integers(-8, 5, (rows, cols // 32, 1))
    w[0, 0], w[0, 1], w[0, 2] = 0, 0.37, 0
    w[0, 2, 5] = -3e-3
    w[0, 3] = np.where(rng.random(32) < 0.5, 6e4, -6e4)
    return w.reshape(rows, cols).astype(np.float32)


def quantized(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(weights(rows, cols, rng), GGMLQuantizationType[kind.upper()])


# --- (a) the blocks: unpacked as gguf decodes them, the parts expand to that bit for bit -------------------

@pytest.mark.parametrize("kind", LEGACY)
def test_unpacked_blocks_are_ggufs_dequantization_bit_for_bit(kind: str) -> None:
    raw = quantized(kind, 64, 1024, np.random.default_rng(0))
    tensors = tuple(torch.from_numpy(a) for a in gguf_blocks.unpack(kind, raw))
    want = gguf_reference(kind, raw)
    got = gguf_blocks.dequantize(kind, tensors)
    assert got.dtype == torch.float32 and torch.equal(bits(got), bits(want))
    assert torch.equal(want[0, :32], torch.zeros(32)) and want[0, 96:128].abs().min() > 5e4  # the first row's blocks
    scales = tensors[1].float()
    assert (scales == 0).any() and ((scales != 0) & (scales.abs() < 2**-14)).any()  # fp16 d of zero, subnormal
    codes = {"q4_0": (torch.int8, 512), "q4_1": (torch.uint8, 512), "q5_0": (torch.int8, 1024),
             "q5_1": (torch.int8, 1024)}[kind]
    assert (tensors[0].dtype, tensors[0].shape[1]) == codes and len(tensors) == (2 if kind in ("q4_0", "q5_0") else 3)
    if kind == "q5_0":
        assert int(tensors[0].min()) == -16 and int(tensors[0].max()) == 15  # q - 16
    if kind == "q5_1":
        assert int(tensors[0].min()) == 0 and int(tensors[0].max()) == 31
    if kind == "q4_0":  # why its codes are signed: d * (q - 8) is -0.0 at q = 8 under a negative d
        negative_zero = bits(want) == bits(torch.tensor(-0.0))
        assert negative_zero.any() and tensors[1].dtype == torch.float32  # d, no shift: (q - 8) * d alone
        unsigned = torch.stack([tensors[0] >> 4, tensors[0] << 4 >> 4], -1).view(64, 32, 32).float() + 8
        d = tensors[1][..., None]
        naive = (unsigned * d + -8 * d).view(64, -1)  # q * d - 8d: the same values, +0.0 for those -0.0s
        assert torch.equal(naive, want) and torch.equal(bits(naive) != bits(want), negative_zero)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_streamed_parts_expand_to_the_reference_bit_for_bit(dtype: torch.dtype, tmp_path) -> None:
    check_layer(dtype, torch.device("cpu"), tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_streamed_parts_expand_to_the_reference_bit_for_bit(dtype: torch.dtype, tmp_path) -> None:
    check_layer(dtype, torch.device("cuda"), tmp_path)  # CUDA's shifts, addcmul and signed unpacking


def check_layer(dtype: torch.dtype, device: torch.device, tmp_path: Path) -> None:
    """One layer of the four types (int4 with int8 (signed) and uint8 codes, int8 with and without shifts)
    filled from a converted-GGUF-like checkpoint and expanded on `device`: gguf's reference, bit for bit."""
    rng = np.random.default_rng(1)
    layer = {"self_attn.q_proj.weight": ("q4_0", quantized("q4_0", 48, 512, rng)),
             "self_attn.k_proj.weight": ("q4_1", quantized("q4_1", 40, 768, rng)),
             "self_attn.v_proj.weight": ("q5_0", quantized("q5_0", 24, 512, rng)),
             "mlp.down_proj.weight": ("q5_1", quantized("q5_1", 32, 256, rng))}
    reader = reader_for(tmp_path, layer)
    try:
        assert reader.scheme.stream_format == "int4" and reader.scheme.label == "GGUF Q4_0+Q4_1+Q5_0+Q5_1"
        layout, encoded = encode_layer(reader, layer, dtype)
        assert [t.kind for t in encoded.tensors] == ["int4", "int4", "int8", "int8", "raw"]
        f32 = torch.float32
        assert [(tuple(p.shape), p.dtype) for p in encoded.tensors[0].parts] == [
            ((48, 256), torch.int8), ((48, 16, 1), f32)]  # Q4_0: two's-complement nibbles and scales, no shifts
        assert encoded.tensors[1].parts[0].dtype == torch.uint8
        assert [(tuple(p.shape), p.dtype) for p in encoded.tensors[2].parts] == [((24, 512), torch.int8), ((24, 16, 1), f32)]
        assert [(tuple(p.shape), p.dtype) for p in encoded.tensors[3].parts] == [
            ((32, 256), torch.int8), ((32, 8, 1), f32), ((32, 8, 1), f32)]  # Q5_1: a shift per group
        assert_expands_to_the_reference(reader, layer, layout, encoded, dtype, device)
    finally:
        reader.close()


def test_gguf_marks_name_the_new_types_formats_and_bytes() -> None:
    q4_0 = scheme_of({"quantization_config": {"quant_method": "gguf", "types": ["q4_0"], "shares": {"q4_0": 1.0}}})
    assert q4_0.stream_format == "int4" and stream_format_for(q4_0, "auto")[1].endswith("keep its codes (int4)")
    assert q4_0.stream_bytes(2 * 1024, 2) == 640  # 0.5 + 4 / 32 bytes a weight: a scale, no shift
    q5 = scheme_of({"quantization_config": {"quant_method": "gguf", "types": ["q5_1", "q5_0"],
                                            "shares": {"q5_0": 0.5, "q5_1": 0.5}}})
    assert q5.stream_format == "int8" and q5.label == "GGUF Q5_0+Q5_1"
    assert q5.stream_bytes(2 * 1024, 2) == 512 * (1 + 4 / 32) + 512 * (1 + 8 / 32)  # Q5_1: a scale and a shift
    mixed = scheme_of({"quantization_config": {"quant_method": "gguf", "types": ["q6_k", "q4_0"]}})
    assert stream_format_for(mixed, "auto")[1].endswith("keep its codes (Q4_0 as int4, Q6_K as int8)")


# --- (b) a tiny GGUF of the four types (with Q5_K, Q6_K, Q8_0 and an IQ4_NL left dequantized) ---------

# layers 0-1 a Q4_0 model, 2-3 a Q4_1 one; attn_v and ffn_down in the other types; one IQ4_NL matrix
OTHERS = {0: ("q5_0", "q5_k"), 1: ("q5_1", "q5_1"), 2: ("q5_k", "q5_0"), 3: ("q6_k", "q8_0")}
PER_WEIGHT = {"q4_0": 0.625, "q4_1": 0.75, "q5_0": 1.125, "q5_1": 1.25, "q5_k": 1.25, "iq4_nl": 2}  # iq4_nl: bf16


def tensor_type(name: str, layer: int) -> str:
    if name == "attn_output" and layer == 1:
        return "iq4_nl"
    if name in ("attn_v", "ffn_down"):
        return OTHERS[layer][name == "ffn_down"]
    return "q4_0" if layer < 2 else "q4_1"


@pytest.fixture(scope="module")
def legacy_gguf(tmp_path_factory, overspill_cache) -> Path:
    """SmolLM2's GGUF metadata (tokenizer, llama) with hidden 256, 4 heads (2 KV), 4 layers; decoder matrices
    as `tensor_type` says (Q4_0 / Q4_1 / Q5_0 / Q5_1 quantized by gguf from weights of a few hundredths, the
    K-quants random blocks of that size), a Q6_K embedding, F32 norms."""
    from gguf import GGMLQuantizationType, quants

    def embedding(rng: np.random.Generator, vocab: int):
        return random_blocks("q6_k", vocab, HIDDEN, rng, (-14, -13)), "q6_k"

    def matrices(i: int, rng: np.random.Generator):
        for name, (rows, cols) in SHAPES.items():
            kind = tensor_type(name, i)
            if kind in LEGACY:
                data = quants.quantize((0.05 * rng.standard_normal((rows, cols))).astype(np.float32),
                                       GGMLQuantizationType[kind.upper()])
            elif kind == "iq4_nl":  # d qs[16] (blocks of 32): |w| up to 127 d (gguf cannot quantize IQ types)
                data = rng.integers(0, 256, (rows, cols // 32, 18), dtype=np.uint8)
                data[..., :2] = np.full(data.shape[:2], 2.0**-12, np.float16)[..., None].view(np.uint8)
                data = data.reshape(rows, -1)
            else:  # |w| up to about 2000 d (Q5_K), 4096 d (Q6_K), 128 d (Q8_0)
                e = {"q5_k": (-17, -16), "q6_k": (-18, -17), "q8_0": (-13, -12)}[kind]
                data = random_blocks(kind, rows, cols, rng, e)
            yield name, kind, data

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-legacy.gguf", embedding, matrices)


def test_converted_gguf_keeps_the_codes_of_every_kept_type(legacy_gguf) -> None:
    from safetensors import safe_open

    from overspill.runtime.sources import convert_gguf

    converted = convert_gguf(legacy_gguf)
    mark = json.loads((converted / "config.json").read_text())["quantization_config"]
    assert mark["types"] == ["q4_0", "q4_1", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0"]  # not iq4_nl
    params = sum(r * c for r, c in SHAPES.values())
    kept = (LAYERS * params - HIDDEN * HIDDEN) / (LAYERS * (params + 2 * HIDDEN))  # all but the IQ4_NL and the norms
    assert sum(mark["shares"].values()) == pytest.approx(kept, abs=1e-5)
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for i in range(LAYERS):
            for name in SHAPES:
                base, kind = f"model.layers.{i}.{HF[name]}", tensor_type(name, i)
                if kind == "iq4_nl":  # not kept: transformers' dequantization
                    assert base + ".weight" in keys and f.get_tensor(base + ".weight").dtype == torch.bfloat16
                else:
                    assert {base + k for k in gguf_blocks.keys(kind)} <= keys and base + ".weight" not in keys
        assert f.get_tensor("model.layers.0.mlp.up_proj.q4_0_codes").dtype == torch.int8
        assert f.get_tensor("model.layers.1.mlp.down_proj.q5_1_shifts").shape == (HIDDEN, FFN // 32)
        assert "model.embed_tokens.weight" in keys  # the Q6_K embedding, outside the decoder: dequantized


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_legacy_quants_decode_as_the_dequantized_model_resident(dtype: str, legacy_gguf) -> None:
    from overspill.runtime.sources import convert_gguf

    want, model, tok, placement = load_streamed(legacy_gguf, dtype, 3)  # layers 0-2 stream: every new type
    assert any("streamed layers keep its codes (Q4_0 as int4, Q4_1 as int4, Q5_0 as int8, Q5_1 as int8, Q5_K as "
               "int8, Q6_K as int8, Q8_0 as int8)" in n for n in placement.plan.notes)
    if dtype == "float32":  # resident weights are gguf's own dequantization, bit for bit (zeros' signs too)
        for got, reference in resident_weights(want, legacy_gguf, ((0, "ffn_up"), (2, "attn_output"), (0, "attn_v"),
                                                                   (1, "ffn_down"), (0, "ffn_down"))):
            assert torch.equal(bits(got), bits(reference))
    else:  # the link carries each layer's codes, as many bytes as the types say
        assert_link_carries_the_codes(convert_gguf(legacy_gguf), placement,
                                      lambda i: {name: tensor_type(name, i) for name in SHAPES}, PER_WEIGHT)
    assert_same_generation(want, model, tok)
