"""A GGUF MoE's routed experts cross the link as their GGUF codes under expert streaming (`runtime.expert_codes`) and
expand in the expert cache's slot to gguf's own dequantization, bit for bit.

transformers (5.25 here) loads Qwen2-MoE and Qwen3-MoE GGUFs (not Mixtral's, general.architecture "llama" with
experts, which `gguf_mixtral` loads: test_gguf_mixtral.py; nor Llama 4's): `blk.N.ffn_{gate,up}_exps` [experts, ffn,
hidden] become the rows of `mlp.experts.gate_up_proj` [experts, 2 * ffn, hidden], gate's then up's, and
`ffn_down_exps` [experts, hidden, ffn] is `mlp.experts.down_proj` as it is (`Qwen2MoeTensorProcessor`, no transpose
or row permutation). The tiny GGUF here is a Qwen3-MoE (SmolLM2's tokenizer; hidden 256, 4 experts, 2 a token,
expert ffn 768: transformers reads no expert ffn size from a GGUF and takes its default 768) whose layers' experts
are Q8_0, Q4_0 with a Q4_1 down (gguf's own quantizer), Q4_K with a Q6_K down (random valid blocks), and Q4_0 gate
with a Q4_1 up (different types: gate_up stays dequantized, down keeps Q8_0 codes); attention is Q8_0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf_kquants import gguf_reference, metadata_gguf, random_blocks

import overspill
from overspill import cli
from overspill.errors import OverspillError
from overspill.planning import moe
from overspill.planning.prequantized import scheme_of
from overspill.runtime import gguf_blocks
from overspill.runtime.expert_codes import ExpertCodes, expert_block_layout, fill_codes
from overspill.runtime.expert_loader import _split
from overspill.runtime.experts import ExpertCache, RoutedExperts
from overspill.runtime.layout import ALIGN
from overspill.runtime.loader import build_skeleton, decoder_layers, measured_spec
from overspill.runtime.prequantized import QuantizedReader

HIDDEN, FFN, EXPERTS, ACTIVE, HEADS, KV_HEADS, HEAD_DIM = 256, 768, 4, 2, 4, 2, 64
# per layer: (gate, up, down) types
TYPES = [("q8_0", "q8_0", "q8_0"), ("q4_0", "q4_0", "q4_1"), ("q4_k", "q4_k", "q6_k"), ("q4_0", "q4_1", "q8_0")]
LAYERS = len(TYPES)
CONTEXT = 64
GEN = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2)
PER_WEIGHT = {"q8_0": 1 + 4 / 32, "q4_0": 0.5 + 4 / 32, "q4_1": 0.5 + 8 / 32, "q4_k": 0.5 + 8 / 32,
              "q6_k": 1 + 4 / 16}  # codes + float32 scales (and shifts) a weight


def blocks(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF blocks [*shape[:-1], bytes] of weights of a few hundredths: gguf's quantizer for the legacy
    types and Q8_0, random valid blocks for the K-quants (gguf cannot quantize them)."""
    from gguf import GGMLQuantizationType, quants

    rows = int(np.prod(shape[:-1]))
    if kind in ("q4_k", "q6_k"):
        raw = random_blocks(kind, rows, shape[-1], rng, {"q4_k": (-16, -15), "q6_k": (-18, -17)}[kind])
    else:
        raw = quants.quantize((rng.standard_normal((rows, shape[-1])) * 0.05).astype(np.float32),
                              GGMLQuantizationType[kind.upper()])
    return raw.reshape(*shape[:-1], -1)


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory, overspill_cache) -> Path:
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    path = tmp_path_factory.mktemp("gguf-moe") / "tiny-qwen3moe.gguf"
    source = GGUFReader(metadata_gguf())
    writer = GGUFWriter(str(path), "qwen3moe")
    for field in source.fields.values():  # SmolLM2's tokenizer and general fields, not its llama sizes
        if field.name.startswith(("GGUF.", "llama.")) or field.name == "general.architecture":
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    sizes = {"block_count": LAYERS, "embedding_length": HIDDEN, "feed_forward_length": FFN, "context_length": 256,
             "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS, "attention.key_length": HEAD_DIM,
             "attention.value_length": HEAD_DIM, "expert_count": EXPERTS, "expert_used_count": ACTIVE,
             "expert_feed_forward_length": FFN}
    for key, value in sizes.items():
        writer.add_key_value(f"qwen3moe.{key}", value, GGUFValueType.UINT32)
    writer.add_key_value("qwen3moe.attention.layer_norm_rms_epsilon", 1e-6, GGUFValueType.FLOAT32)
    writer.add_key_value("qwen3moe.rope.freq_base", 10000.0, GGUFValueType.FLOAT32)
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", (rng.standard_normal((vocab, HIDDEN)) * 0.5).astype(np.float16))
    writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    for i, types in enumerate(TYPES):
        norms = (("attn_norm", HIDDEN), ("ffn_norm", HIDDEN), ("attn_q_norm", HEAD_DIM), ("attn_k_norm", HEAD_DIM))
        for norm, n in norms:
            writer.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))
        for name, shape in (("attn_q", (HEADS * HEAD_DIM, HIDDEN)), ("attn_k", (KV_HEADS * HEAD_DIM, HIDDEN)),
                            ("attn_v", (KV_HEADS * HEAD_DIM, HIDDEN)), ("attn_output", (HIDDEN, HEADS * HEAD_DIM))):
            writer.add_tensor(f"blk.{i}.{name}.weight", blocks("q8_0", shape, rng), raw_dtype=GGMLQuantizationType.Q8_0)
        writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", rng.standard_normal((EXPERTS, HIDDEN)).astype(np.float32))
        for part, kind, shape in zip(("gate", "up", "down"), types,
                                     ((EXPERTS, FFN, HIDDEN), (EXPERTS, FFN, HIDDEN), (EXPERTS, HIDDEN, FFN))):
            writer.add_tensor(f"blk.{i}.ffn_{part}_exps.weight", blocks(kind, shape, rng),
                              raw_dtype=GGMLQuantizationType[kind.upper()])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def references(gguf: Path) -> dict[str, torch.Tensor]:
    """gguf's own float32 dequantization of each layer's fused experts, laid out as transformers fuses them."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(gguf).tensors}

    def ref(name: str) -> torch.Tensor:
        t = tensors[name]
        raw = np.asarray(t.data)
        rows = gguf_reference(t.tensor_type.name.lower(), raw.reshape(-1, raw.shape[-1]))
        return rows.view(*raw.shape[:-1], -1)

    out = {}
    for i in range(LAYERS):
        out[f"{i}.mlp.experts.gate_up_proj"] = torch.cat([ref(f"blk.{i}.ffn_gate_exps.weight"),
                                                          ref(f"blk.{i}.ffn_up_exps.weight")], dim=1)
        out[f"{i}.mlp.experts.down_proj"] = ref(f"blk.{i}.ffn_down_exps.weight")
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def converted(gguf: Path) -> Path:
    from overspill.runtime.sources import convert_gguf

    return convert_gguf(gguf)


# --- conversion: the experts keep their codes where transformers' fusion maps them exactly -----------------

def assert_expert_mark(path: Path) -> None:
    """The converted checkpoint's mark: the five types, each one's share of the routed experts' weights (the
    four layers' types as here and in test_gguf_mixtral: layer 3's gate and up, of two types, stay dequantized)."""
    mark = json.loads((path / "config.json").read_text())["quantization_config"]
    assert mark["types"] == ["q4_0", "q4_1", "q4_k", "q6_k", "q8_0"]
    expert = EXPERTS * 3 * FFN * HIDDEN  # a layer's routed-expert weights
    kept = {"q8_0": expert + expert // 3, "q4_0": 2 * expert // 3, "q4_1": expert // 3, "q4_k": 2 * expert // 3,
            "q6_k": expert // 3}
    assert mark["expert_shares"] == {k: pytest.approx(kept[k] / (LAYERS * expert), abs=1e-6) for k in kept}


def test_conversion_keeps_fused_expert_codes(moe_gguf) -> None:
    from safetensors import safe_open

    path = converted(moe_gguf)
    assert_expert_mark(path)
    want = references(moe_gguf)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for i, (gate, _, down) in enumerate(TYPES):
            base = f"model.layers.{i}.mlp.experts."
            assert {base + "down_proj" + k for k in gguf_blocks.keys(down)} <= keys and base + "down_proj" not in keys
            if i == 3:  # two types cannot share one parameter's codes: as transformers wrote it (bf16)
                assert base + "gate_up_proj" in keys and not any(k.startswith(base + "gate_up_proj.") for k in keys)
                continue
            stored = tuple(f.get_tensor(base + "gate_up_proj" + k) for k in gguf_blocks.keys(gate))
            assert stored[0].shape[:2] == (EXPERTS, 2 * FFN)  # [experts, gate's rows then up's, ..]
            got = gguf_blocks.dequantize(gate, stored)
            reference = want[f"{i}.mlp.experts.gate_up_proj"]
            assert got.shape == (EXPERTS, 2 * FFN, HIDDEN) and torch.equal(bits(got), bits(reference))


def test_scheme_counts_expert_bytes_from_the_mark() -> None:
    scheme = scheme_of({"quantization_config": {"quant_method": "gguf", "types": ["q4_k", "q6_k"],
                                                "shares": {"q4_k": 0.6, "q6_k": 0.3},
                                                "expert_shares": {"q4_k": 2 / 3, "q6_k": 1 / 3}}})
    assert scheme.experts == (("q4_k", 2 / 3), ("q6_k", 1 / 3))
    assert scheme.expert_link_bytes(2 * 3000, 2) == int(3000 * (2 / 3 * 0.75 + 1 / 3 * 1.25))  # Q4_K_M-like
    plain = scheme_of({"quantization_config": {"quant_method": "gguf", "types": ["q4_k"]}})
    assert plain.experts == () and plain.expert_link_bytes(6000, 2) == 6000
    layers = moe.MoeLayers((10, 10), (1000, 1000), (4, 4), (2, 2))
    coded = moe.with_codes(layers, (300, 300), 2)
    assert coded.coded and coded.sent(0) == 300 and not layers.coded and layers.sent(0) == 1000
    step = moe.expert_bytes_per_step(layers, (0, 1), 4, 1)
    assert moe.expert_bytes_per_step(coded, (0, 1), 4, 1) == round(step * 0.3)
    assert coded.code_staging_bytes >= 300  # the block a miss lands in, and the expansion's scratch


# --- the blocks: one contiguous slice per expert, expanded to gguf's values ---------------------------------

def reader_and_layers(gguf: Path, dtype: torch.dtype):
    from transformers import AutoConfig

    path = converted(gguf)
    reader = QuantizedReader(path, scheme_of(json.loads((path / "config.json").read_text())))
    skeleton = build_skeleton(AutoConfig.from_pretrained(str(path)), dtype)
    reader.bind(skeleton)
    return reader, decoder_layers(skeleton)[1], path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_expert_blocks_expand_to_ggufs_dequantization_bit_for_bit(dtype: torch.dtype, moe_gguf) -> None:
    check_blocks(dtype, torch.device("cpu"), moe_gguf)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_expert_blocks_expand_to_ggufs_dequantization_bit_for_bit(dtype: torch.dtype, moe_gguf) -> None:
    check_blocks(dtype, torch.device("cuda"), moe_gguf)  # through the cache's copy stream and CUDA's expansion


def check_blocks(dtype: torch.dtype, device: torch.device, gguf: Path) -> None:
    """Every layer's experts packed as blocks, fetched into an `ExpertCache` on `device` (block copied into the
    staging buffer, expanded into the slot) and compared with gguf's dequantization rounded once into `dtype`."""
    from safetensors import safe_open

    reader, layers, path = reader_and_layers(gguf, dtype)
    want = references(gguf)
    try:
        for i, layer in enumerate(layers):
            prefix = f"model.layers.{i}."
            ring, full = _split(layer)
            entries = list(full.entries[len(ring.entries):])
            assert [e.name for e in entries] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
            encoded = expert_block_layout(reader, prefix, entries)
            rows = torch.full((EXPERTS, encoded.nbytes), 0xAB, dtype=torch.uint8)
            fill_codes(reader, prefix, entries, encoded, rows)
            codes = ExpertCodes(rows.pin_memory() if device.type == "cuda" else rows, encoded)
            gate, _, down = TYPES[i]
            assert block_bytes(i, dtype) <= codes.stride <= block_bytes(i, dtype) + 3 * 2 * ALIGN  # parts, aligned
            assert [t.kind for t in encoded.tensors] == ["raw" if i == 3 else gguf_kind(gate), gguf_kind(down)]
            cache = ExpertCache([(e.shape[1:], dtype) for e in entries], EXPERTS, device)
            cache.reserve_codes(codes.stride, 2**20)
            slots = cache.fetch(i, list(range(EXPERTS)), [1] * EXPERTS, codes)
            assert cache.bytes_copied == EXPERTS * codes.stride and cache.misses == EXPERTS
            for entry, tensor in zip(entries, cache.tensors):
                if i == 3 and entry.name.endswith("gate_up_proj"):
                    with safe_open(str(path / "model.safetensors"), "pt") as f:  # transformers' bf16, as stored
                        reference = f.get_tensor(prefix + entry.name).to(dtype)
                else:
                    reference = want[f"{i}.{entry.name}"].to(dtype)  # gguf's float32, rounded once
                got = tensor[slots].cpu()
                assert torch.equal(bits(got), bits(reference)), (i, entry.name, dtype)
    finally:
        reader.close()


def block_bytes(layer: int, dtype: torch.dtype) -> float:
    """One expert's bytes over the link, alignment aside: its codes and float32 stores (layer 3's gate_up, kept
    dequantized, in the compute dtype)."""
    gate, _, down = TYPES[layer]
    gate_up = 2 * FFN * HIDDEN * (dtype.itemsize if layer == 3 else PER_WEIGHT[gate])
    return gate_up + PER_WEIGHT[down] * HIDDEN * FFN


def gguf_kind(kind: str) -> str:
    return "int4" if kind in ("q4_0", "q4_1", "q4_k") else "int8"


# --- loads: expert streaming sends the codes and generates the dequantized model's tokens ------------------

def experts_plan(path: Path, dtype: torch.dtype, warm: bool, streamed: int = LAYERS):
    from dataclasses import replace

    from transformers import AutoConfig

    from overspill.planning.placement import streaming_plan
    from overspill.planning.plan import Workload, footprint_from_spec

    skeleton = build_skeleton(AutoConfig.from_pretrained(str(path)), dtype)
    spec = measured_spec(skeleton, decoder_layers(skeleton)[1], dtype)
    fp, layers = footprint_from_spec(spec), moe.MoeLayers.from_spec(spec)
    plan = moe.to_experts(streaming_plan(fp, Workload(CONTEXT, 2, activation_floor=0), streamed, depth=2), fp,
                          layers, None)  # no budget: every streamed expert gets a slot (warm)
    return plan if warm else replace(plan, expert_slots=EXPERTS)  # one layer's experts: they churn (cold)


def prompts():
    g = torch.Generator().manual_seed(1234)
    single = torch.randint(3, 2000, (1, 12), generator=g)
    batch = torch.randint(3, 2000, (2, 12), generator=g)
    mask = torch.ones_like(batch)
    batch[0, :3], mask[0, :3] = 2, 0
    return single, batch, mask


def generate(model, ids, mask=None):
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True, **GEN)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_expert_streaming_sends_codes_and_generates_the_dequantized_models_tokens(dtype: str, warm: bool,
                                                                                   moe_gguf) -> None:
    path = converted(moe_gguf)
    torch_dtype = getattr(torch, dtype)
    want, _ = overspill.load(moe_gguf, dtype=dtype, gpu_memory=None, progress=False)  # resident, dequantized
    model, _ = overspill.load(moe_gguf, dtype=dtype, plan=experts_plan(path, torch_dtype, warm), context=CONTEXT,
                              batch=2, progress=False)
    placed = model.overspill
    assert placed.plan.moe_streaming == "experts" and placed.plan.expert_codes
    assert any("routed experts cross as its codes" in n for n in placed.plan.notes)
    wrapped = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    assert len(wrapped) == LAYERS and all(m.codes is not None for m in wrapped)
    for m in wrapped:  # the host holds blocks of codes, no compute-dtype copy of the experts
        assert all(h.untyped_storage().nbytes() <= h.element_size() for h in m.host)
        assert block_bytes(m.layer, torch_dtype) <= m.codes.stride <= block_bytes(m.layer, torch_dtype) + 6 * ALIGN
        assert m.codes.stride < placed.experts.expert_nbytes  # less than the slot's compute-dtype bytes
    single, batch, mask = prompts()
    placed.experts.reset_stats()
    for ids, m in ((single, None), (batch, mask)):
        want_ids, want_logits = generate(want, ids, m)
        got_ids, got_logits = generate(model, ids, m)
        assert torch.equal(got_ids, want_ids), (dtype, warm)
        assert torch.isfinite(want_logits).all() and not torch.equal(want_logits[0], want_logits[-1])
        # one sequence: bit for bit; a batch: grouped_mm may meet an expert's rows in another order (test_moe.py)
        tol = 0 if m is None else 1e-5 if dtype == "float32" else 2e-2
        torch.testing.assert_close(got_logits, want_logits, rtol=tol, atol=tol)
    cache = placed.experts
    assert cache.misses > 0
    strides = {m.layer: m.codes.stride for m in wrapped}
    assert cache.bytes_copied <= cache.misses * max(strides.values()) < cache.misses * cache.expert_nbytes
    cache.reset_stats()
    generate(model, single)
    if warm:  # every expert has a slot and was fetched: nothing crosses again
        assert cache.misses == 0 and cache.hits > 0
    else:
        assert cache.misses > 0


def test_dense_streaming_passes_expert_codes_through(moe_gguf) -> None:
    """moe_streaming='dense' streams whole layers in the checkpoint's own format: the fused experts' codes too."""
    from test_stream_formats import tiny_plan

    want, _ = overspill.load(moe_gguf, dtype="float32", gpu_memory=None, progress=False)
    plan = tiny_plan(converted(moe_gguf), torch.float32, streamed=LAYERS)
    model, _ = overspill.load(moe_gguf, dtype="float32", plan=plan, moe_streaming="dense", progress=False)
    placed = model.overspill
    assert placed.plan.stream_format == "int4" and placed.experts is None
    kinds = {t.entry.name: t.kind for t in placed.ring.layers[1].encoded.tensors}
    assert kinds["mlp.experts.gate_up_proj"] == "int4" and kinds["mlp.experts.down_proj"] == "int4"
    single, _, _ = prompts()
    want_ids, want_logits = generate(want, single)
    got_ids, got_logits = generate(model, single)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_logits, want_logits)


def test_cpu_experts_on_is_refused_for_coded_experts(moe_gguf) -> None:
    path = converted(moe_gguf)
    with pytest.raises(OverspillError, match="no host copy to compute on") as err:
        overspill.load(moe_gguf, dtype="float32", plan=experts_plan(path, torch.float32, warm=False),
                       context=CONTEXT, progress=False, cpu_experts="on")
    assert "\n" not in str(err.value)


def test_plan_counts_an_experts_codes(moe_gguf, capsys) -> None:
    path = converted(moe_gguf)
    capsys.readouterr()
    scheme = scheme_of(json.loads((path / "config.json").read_text()))
    assert cli.main(["plan", str(moe_gguf), "--gpu-memory", "200MiB", "--context", str(CONTEXT),
                     "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "routed experts cross as the checkpoint's codes" in out
    # the estimate from the mark's expert shares is within alignment of what the load packs
    model, _ = overspill.load(moe_gguf, dtype="bfloat16", plan=experts_plan(path, torch.bfloat16, warm=False),
                              context=CONTEXT, progress=False)
    strides = [m.codes.stride for m in model.modules() if isinstance(m, RoutedExperts)]
    expert_bytes = 3 * FFN * HIDDEN * 2
    estimate = scheme.expert_link_bytes(expert_bytes, 2)
    assert abs(LAYERS * estimate - sum(strides)) < 0.01 * sum(strides)
