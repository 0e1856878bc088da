"""GGUF Q3_K and Q2_K decoder weights stream as their own codes (`runtime.gguf_blocks`), int4 with groups of 16
(their sub-blocks): Q3_K signed (codes q in -4..3 as two's-complement nibbles, float32 scales d * (sc_j - 32),
no shifts: 0.75 bytes a weight), Q2_K unsigned (codes 0..3, float32 scales d * sc_j and shifts -dmin * m_j:
1.0 bytes a weight), mixed in one layer with the other K-quants as a Q3_K_M or Q2_K file mixes them.

The reference is gguf's own dequantization (`gguf.quants.dequantize`, float32), compared as bits: Q3_K's
`dl * q` (dl = d * (sc_j - 32)) is exact in float32, -0.0 wherever q = 0 under a negative dl, which the
signed codes' single multiply keeps; Q2_K's `dl * q - ml` has exact products and one rounding of the sum, as
Q4_K's. `test_gguf_kquants.exact` spells out llama.cpp's dequantize_row_q2_K / _q3_K in float64 besides. The
blocks are random bytes with chosen fp16 d (and dmin): the gguf package (0.19) cannot quantize K-quants. The
tiny GGUF keeps SmolLM2's tokenizer and llama metadata with a hidden size of 256.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf_kquants import (FFN, HF, HIDDEN, LAYER_BYTES, LAYERS, SHAPES, assert_expands_to_the_reference,
                               assert_link_carries_the_codes, assert_same_generation, assert_sums_round_only_above_1,
                               bits, encode_layer, exact, gguf_reference, load_streamed, planned, random_blocks,
                               reader_for, resident_weights, write_tiny_gguf)

from overspill.planning.prequantized import scheme_of, stream_format_for
from overspill.runtime import gguf_blocks
from overspill.runtime.quant import int4_codes

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --- (a) the blocks: unpacked as gguf decodes them, the parts expand to that bit for bit -------------------

@pytest.mark.parametrize("kind", ["q3_k", "q2_k"])
def test_unpacked_blocks_are_ggufs_dequantization_bit_for_bit(kind: str) -> None:
    # d (and dmin) from fp16 subnormals (2^-24) to 2^6, a few negative: Q2_K's sums round past 1
    raw = random_blocks(kind, 64, 1024, np.random.default_rng(0), exponents=(-24, 6))
    tensors = tuple(torch.from_numpy(a) for a in gguf_blocks.unpack(kind, raw))
    got = gguf_blocks.dequantize(kind, tensors)
    want = gguf_reference(kind, raw)
    assert got.dtype == torch.float32 and torch.equal(bits(got), bits(want))
    truth = exact(kind, raw)
    assert torch.equal(got, truth.float())  # gguf's float32 arithmetic: exact, or one rounding of Q2_K's sum
    codes = int4_codes(tensors[0])
    assert tensors[0].shape == (64, 512)  # two codes a byte; a scale (and shift) per 16
    assert all(t.shape == (64, 64) and t.dtype == torch.float32 for t in tensors[1:])
    if kind == "q3_k":
        assert torch.equal(got.double(), truth)  # d * (sc - 32) * q exact in float32
        assert tensors[0].dtype == torch.int8 and len(tensors) == 2  # signed codes, scales, no shifts
        assert int(codes.min()) == -4 and int(codes.max()) == 3
        assert (bits(want) == bits(torch.tensor(-0.0))).any()  # q = 0 under a negative dl: kept as -0.0
    else:
        assert_sums_round_only_above_1(got, truth)
        assert tensors[0].dtype == torch.uint8 and len(tensors) == 3
        assert int(codes.min()) == 0 and int(codes.max()) == 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_streamed_parts_expand_to_the_reference_bit_for_bit(dtype: torch.dtype, tmp_path) -> None:
    check_layer(dtype, torch.device("cpu"), tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_streamed_parts_expand_to_the_reference_bit_for_bit(dtype: torch.dtype, tmp_path) -> None:
    check_layer(dtype, torch.device("cuda"), tmp_path)  # CUDA's signed unpacking, addcmul, groups of 16


def check_layer(dtype: torch.dtype, device: torch.device, tmp_path: Path) -> None:
    """One layer of Q3_K, Q2_K, Q4_K and Q6_K (int4 signed and with shifts in groups of 16 and 32, int8) filled
    from a converted-GGUF-like checkpoint and expanded on `device`: gguf's reference, bit for bit."""
    rng = np.random.default_rng(1)
    layer = {"self_attn.q_proj.weight": ("q3_k", random_blocks("q3_k", 48, 512, rng, (-24, 6))),
             "self_attn.k_proj.weight": ("q2_k", random_blocks("q2_k", 40, 768, rng, (-24, 6))),
             "self_attn.v_proj.weight": ("q4_k", random_blocks("q4_k", 24, 512, rng, (-24, 6))),
             "mlp.down_proj.weight": ("q6_k", random_blocks("q6_k", 32, 256, rng, (-24, 6)))}
    reader = reader_for(tmp_path, layer)
    try:
        assert reader.scheme.stream_format == "int4" and reader.scheme.label == "GGUF Q2_K+Q3_K+Q4_K+Q6_K"
        layout, encoded = encode_layer(reader, layer, dtype)
        assert [t.kind for t in encoded.tensors] == ["int4", "int4", "int4", "int8", "raw"]
        f32 = torch.float32
        assert [(tuple(p.shape), p.dtype) for p in encoded.tensors[0].parts] == [
            ((48, 256), torch.int8), ((48, 32, 1), f32)]  # Q3_K: two's-complement nibbles, a scale per 16
        assert [(tuple(p.shape), p.dtype) for p in encoded.tensors[1].parts] == [
            ((40, 384), torch.uint8), ((40, 48, 1), f32), ((40, 48, 1), f32)]  # Q2_K: a scale and shift per 16
        assert [tuple(p.shape) for p in encoded.tensors[2].parts] == [(24, 256), (24, 16, 1), (24, 16, 1)]
        assert_expands_to_the_reference(reader, layer, layout, encoded, dtype, device)
    finally:
        reader.close()


# --- the scheme: types, formats, bytes -------------------------------------------------------------------

def test_gguf_marks_name_the_low_k_quants_formats_and_bytes() -> None:
    q3 = scheme_of({"quantization_config": {"quant_method": "gguf", "types": ["q3_k"], "shares": {"q3_k": 1.0}}})
    assert q3.stream_format == "int4" and stream_format_for(q3, "auto")[1].endswith("keep its codes (int4)")
    assert q3.stream_bytes(2 * 1024, 2) == 768  # 0.5 + 4 / 16 bytes a weight: a scale, no shift (bf16: 2)
    q2 = scheme_of({"quantization_config": {"quant_method": "gguf", "types": ["q2_k"], "shares": {"q2_k": 1.0}}})
    assert q2.stream_bytes(2 * 1024, 2) == 1024  # 0.5 + 8 / 16: a scale and a shift
    mixed = scheme_of({"quantization_config": {"quant_method": "gguf", "types": ["q6_k", "q4_k", "q3_k"],
                                               "shares": {"q3_k": 0.5, "q4_k": 0.25, "q6_k": 0.25}}})
    assert mixed.label == "GGUF Q3_K+Q4_K+Q6_K" and mixed.stream_format == "int4"
    assert stream_format_for(mixed, "auto")[1].endswith("keep its codes (Q3_K as int4, Q4_K as int4, Q6_K as int8)")
    assert mixed.stream_bytes(2 * 1024, 2) == int(1024 * (0.5 * 0.75 + 0.25 * 0.75 + 0.25 * 1.25))


# --- (b), (c) a tiny Q3_K_M / Q2_K-like GGUF converted, loaded and streamed ------------------------------

# layers 0-1 as llama.cpp's Q3_K_M (Q3_K; attn_v Q5_K, attn_output and ffn_down Q4_K), 2-3 as its Q2_K
# (Q2_K; attn_v Q3_K, ffn_down Q4_K, then Q6_K)
MIXES = {0: {"attn_v": "q5_k", "attn_output": "q4_k", "ffn_down": "q4_k"}, 2: {"attn_v": "q3_k", "ffn_down": "q4_k"}}
MIXES[1], MIXES[3] = MIXES[0], {**MIXES[2], "ffn_down": "q6_k"}
PER_WEIGHT = {"q2_k": 1.0, "q3_k": 0.75, "q4_k": 0.75, "q5_k": 1.25, "q6_k": 1.25}  # streamed bytes
EXPONENTS = {"q2_k": (-11, -10), "q3_k": (-12, -11), "q4_k": (-16, -15), "q5_k": (-17, -16), "q6_k": (-18, -17)}


def tensor_type(name: str, layer: int) -> str:
    return MIXES[layer].get(name, "q3_k" if layer < 2 else "q2_k")


@pytest.fixture(scope="module")
def low_gguf(tmp_path_factory, overspill_cache) -> Path:
    """SmolLM2's GGUF metadata (tokenizer, llama) with hidden 256, 4 heads (2 KV), 4 layers; decoder matrices
    random K-quant blocks as `tensor_type` says (weights of a few hundredths), a Q3_K embedding, F32 norms."""

    def embedding(rng: np.random.Generator, vocab: int):
        return random_blocks("q3_k", vocab, HIDDEN, rng, (-10, -9)), "q3_k"

    def matrices(i: int, rng: np.random.Generator):
        for name, (rows, cols) in SHAPES.items():
            kind = tensor_type(name, i)
            yield name, kind, random_blocks(kind, rows, cols, rng, EXPONENTS[kind])

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-low-kquants.gguf", embedding, matrices)


def test_converted_gguf_keeps_the_low_k_quant_codes(low_gguf) -> None:
    from safetensors import safe_open

    from overspill.runtime.sources import convert_gguf

    converted = convert_gguf(low_gguf)
    mark = json.loads((converted / "config.json").read_text())["quantization_config"]
    assert mark["types"] == ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
    params = sum(r * c for r, c in SHAPES.values())
    assert sum(mark["shares"].values()) == pytest.approx(params / (params + 2 * HIDDEN), abs=1e-5)  # all but norms
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for i in range(LAYERS):  # every decoder matrix kept (each checked against transformers' conversion)
            for name in SHAPES:
                base = f"model.layers.{i}.{HF[name]}"
                assert {base + k for k in gguf_blocks.keys(tensor_type(name, i))} <= keys
                assert base + ".weight" not in keys
        assert f.get_tensor("model.layers.0.mlp.up_proj.q3_k_codes").dtype == torch.int8
        assert f.get_tensor("model.layers.0.mlp.up_proj.q3_k_scales").shape == (FFN, HIDDEN // 16)
        assert f.get_tensor("model.layers.2.mlp.up_proj.q2_k_codes").shape == (FFN, HIDDEN // 2)
        assert f.get_tensor("model.layers.2.mlp.up_proj.q2_k_shifts").dtype == torch.float32
        assert "model.embed_tokens.weight" in keys  # the Q3_K embedding, outside the decoder: dequantized


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_low_k_quants_decode_as_the_dequantized_model_resident(dtype: str, low_gguf) -> None:
    from overspill.runtime.sources import convert_gguf

    want, model, tok, placement = load_streamed(low_gguf, dtype, 3)  # layers 0-2 stream: Q3_K, Q2_K and more
    assert any("GGUF Q2_K+Q3_K+Q4_K+Q5_K+Q6_K checkpoint: streamed layers keep its codes (Q2_K as int4, Q3_K as "
               "int4, Q4_K as int4, Q5_K as int8, Q6_K as int8)" in n for n in placement.plan.notes)
    if dtype == "float32":  # resident weights are gguf's own dequantization, bit for bit (zeros' signs too)
        for got, reference in resident_weights(want, low_gguf, ((0, "ffn_up"), (3, "attn_v"), (3, "ffn_gate"),
                                                                (3, "ffn_down"))):
            assert torch.equal(bits(got), bits(reference))
    else:  # the link carries each layer's codes, as many bytes as the types say
        for layer in placement.ring.layers:
            kinds = {t.entry.name: t.kind for t in layer.encoded.tensors}
            assert kinds["mlp.up_proj.weight"] == "int4" and kinds["input_layernorm.weight"] == "raw"
            assert layer.host.numel() < 0.55 * layer.layout.nbytes  # bf16 would be 1.0
        # up_proj: the GGUF's 3- and 2-bit codes, in nibbles
        assert_link_carries_the_codes(convert_gguf(low_gguf), placement,
                                      lambda i: {name: tensor_type(name, i) for name in SHAPES}, PER_WEIGHT)
    assert_same_generation(want, model, tok)


def test_plan_counts_the_low_k_quant_bytes(low_gguf, capsys) -> None:
    scheme, table = planned(low_gguf, capsys)
    # by the mark's shares: a layer's average of its matrices' bytes (Q3_K 0.75, Q2_K 1.0 a weight), bf16 norms
    matrices = sum(r * c * PER_WEIGHT[tensor_type(n, i)] for i in range(LAYERS) for n, (r, c) in SHAPES.items())
    assert scheme.stream_bytes(LAYER_BYTES, 2) == pytest.approx(matrices / LAYERS + 2 * HIDDEN * 2, rel=1e-4)
    assert "streamed layers keep its codes (Q2_K as int4, Q3_K as int4, Q4_K as int4, Q5_K as int8, Q6_K as int8)" in (
        table)
