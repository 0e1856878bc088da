"""Mixtral GGUFs (general.architecture "llama" with `llama.expert_count`) convert to a `MixtralForCausalLM`
(`runtime.gguf_mixtral`): transformers' GGUF loader would build a Llama without the experts.

A tiny random Mixtral (SmolLM2's tokenizer; hidden 256, 4 heads (2 KV), 4 layers, 4 experts, 2 a token, expert
ffn 512, untied lm_head) is written as llama.cpp's convert_hf_to_gguf.py writes Mixtral: q and k rows permuted,
`mlp.experts.gate_up_proj` split into `ffn_gate_exps` and `ffn_up_exps`, the router as `ffn_gate_inp`. Once in
F32 (the conversion must give back the original weights and tokens) and once quantized: attention Q8_0 of the
original weights, experts Q8_0 (layer 0), Q4_0 with a Q4_1 down (1), random Q4_K with a Q6_K down (2) and a Q8_0
gate with a Q4_0 up (3: two types, gate_up stays dequantized), whose codes the conversion keeps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_gguf_kquants import (FFN, HEADS, HIDDEN, KV_HEADS, LAYERS, finish_gguf, gguf_reference, metadata_gguf,
                               tiny_gguf_writer)
from test_gguf_moe_experts import CONTEXT, EXPERTS, assert_expert_mark, blocks, experts_plan, generate, prompts

import overspill
from overspill.errors import OverspillError
from overspill.runtime import gguf_blocks, gguf_mixtral
from overspill.runtime.experts import RoutedExperts
from overspill.runtime.sources import convert_gguf

ACTIVE = 2
EXPERT_TYPES = [("q8_0", "q8_0", "q8_0"), ("q4_0", "q4_0", "q4_1"), ("q4_k", "q4_k", "q6_k"), ("q8_0", "q4_0", "q8_0")]
ATTENTION = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj"}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q / k row order (convert_hf_to_gguf.py `LlamaModel.permute`): each head's rotary halves
    interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def original():
    """The tiny Mixtral, float32, with SmolLM2's GGUF rope base, norm epsilon and context; norms off 1."""
    from gguf import GGUFReader
    from transformers import MixtralConfig, MixtralForCausalLM

    fields = GGUFReader(metadata_gguf()).fields
    config = MixtralConfig(vocab_size=len(fields["tokenizer.ggml.tokens"].data), hidden_size=HIDDEN,
                           intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS, num_local_experts=EXPERTS,
                           num_experts_per_tok=ACTIVE,
                           max_position_embeddings=fields["llama.context_length"].contents(),
                           rope_theta=fields["llama.rope.freq_base"].contents(), initializer_range=0.05,
                           rms_norm_eps=fields["llama.attention.layer_norm_rms_epsilon"].contents(),
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def llama_cpp_tensors(model) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names and layout, float32."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(LAYERS):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        gate_up = sd[p + "mlp.experts.gate_up_proj"]  # [experts, gate's rows then up's, hidden]
        out.update({b + "attn_norm.weight": sd[p + "input_layernorm.weight"],
                    b + "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
                    b + "attn_q.weight": permute(sd[p + "self_attn.q_proj.weight"], HEADS),
                    b + "attn_k.weight": permute(sd[p + "self_attn.k_proj.weight"], KV_HEADS),
                    b + "attn_v.weight": sd[p + "self_attn.v_proj.weight"],
                    b + "attn_output.weight": sd[p + "self_attn.o_proj.weight"],
                    b + "ffn_gate_inp.weight": sd[p + "mlp.gate.weight"],
                    b + "ffn_gate_exps.weight": gate_up[:, :FFN], b + "ffn_up_exps.weight": gate_up[:, FFN:],
                    b + "ffn_down_exps.weight": sd[p + "mlp.experts.down_proj"]})
    return out


def write_mixtral_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, str | None]],
                       expert_ffn: bool = False) -> Path:
    """A llama-arch GGUF with Mixtral's expert keys (and `llama.expert_feed_forward_length`, which newer files
    carry, where `expert_ffn`) and `tensors` ({name: (data, GGML type's name, or None for an F32 array)})."""
    from gguf import GGMLQuantizationType, GGUFValueType

    writer, _ = tiny_gguf_writer(path)
    writer.add_key_value("llama.expert_count", EXPERTS, GGUFValueType.UINT32)
    writer.add_key_value("llama.expert_used_count", ACTIVE, GGUFValueType.UINT32)
    if expert_ffn:
        writer.add_key_value("llama.expert_feed_forward_length", FFN, GGUFValueType.UINT32)
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=None if kind is None else GGMLQuantizationType[kind.upper()])
    finish_gguf(writer)
    return path


def quantized(data: np.ndarray, kind: str) -> np.ndarray:
    """gguf's quantization of `data` ([.., rows, cols]) as raw blocks [.., rows, bytes]."""
    from gguf import GGMLQuantizationType, quants

    raw = quants.quantize(np.ascontiguousarray(data.reshape(-1, data.shape[-1])), GGMLQuantizationType[kind.upper()])
    return raw.reshape(*data.shape[:-1], -1)


@pytest.fixture(scope="module")
def f32_gguf(original, tmp_path_factory, overspill_cache) -> Path:
    tensors = {name: (data, None) for name, data in llama_cpp_tensors(original).items()}
    return write_mixtral_gguf(tmp_path_factory.mktemp("gguf-mixtral") / "tiny-mixtral-f32.gguf", tensors)


@pytest.fixture(scope="module")
def q_gguf(original, tmp_path_factory, overspill_cache) -> Path:
    rng = np.random.default_rng(0)
    tensors: dict[str, tuple[np.ndarray, str | None]] = {}
    for name, data in llama_cpp_tensors(original).items():
        layer, _, short = name.removeprefix("blk.").partition(".")
        part = short.removeprefix("ffn_").removesuffix("_exps.weight")
        if short.removesuffix(".weight") in ATTENTION:
            tensors[name] = quantized(data, "q8_0"), "q8_0"
        elif short.endswith("_exps.weight"):
            kind = EXPERT_TYPES[int(layer)][("gate", "up", "down").index(part)]
            raw = blocks(kind, data.shape, rng) if kind.endswith("_k") else quantized(data, kind)
            tensors[name] = raw, kind  # K-quants: random valid blocks (gguf cannot quantize them)
        else:
            tensors[name] = data, None
    return write_mixtral_gguf(tmp_path_factory.mktemp("gguf-mixtral") / "tiny-mixtral-q.gguf", tensors, True)


def gguf_values(gguf: Path) -> dict[str, torch.Tensor]:
    """gguf's own float32 dequantization of every tensor of `gguf`, [.., rows, cols]."""
    from gguf import GGUFReader

    out = {}
    for t in GGUFReader(gguf).tensors:
        raw = np.asarray(t.data)
        kind = t.tensor_type.name.lower()
        if kind == "f32":
            out[t.name] = torch.from_numpy(raw.copy())
        else:
            out[t.name] = gguf_reference(kind, raw.reshape(-1, raw.shape[-1])).view(*raw.shape[:-1], -1)
    return out


def as_llama_cpp(model) -> dict[str, torch.Tensor]:
    """A loaded model's tensors in llama.cpp's layout, to compare with the file's."""
    return {name: torch.from_numpy(np.ascontiguousarray(data)) for name, data in llama_cpp_tensors(model).items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


# --- F32: the original weights and tokens back -------------------------------------------------------------

def test_f32_gguf_loads_as_the_original_mixtral(original, f32_gguf) -> None:
    from transformers import MixtralForCausalLM

    model = gguf_mixtral.load(f32_gguf, torch.float32)
    assert isinstance(model, MixtralForCausalLM) and not model.config.tie_word_embeddings
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "num_local_experts", "num_experts_per_tok", "vocab_size", "max_position_embeddings", "rms_norm_eps"):
        assert getattr(model.config, key) == getattr(original.config, key), key
    assert model.config.rope_parameters["rope_theta"] == original.config.rope_parameters["rope_theta"]
    want = original.state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    single, batch, mask = prompts()
    for ids, m in ((single, None), (batch, mask)):
        want_ids, want_logits = generate(original, ids, m)
        got_ids, got_logits = generate(model, ids, m)
        assert torch.equal(got_ids, want_ids) and torch.equal(got_logits, want_logits)
        assert not torch.equal(want_logits[0], want_logits[-1])  # a random model: some signal


def test_f32_conversion_is_the_original_in_bf16(original, f32_gguf) -> None:
    path = convert_gguf(f32_gguf)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == EXPERTS and "quantization_config" not in config  # F32: nothing kept
    model, tok = overspill.load(f32_gguf, dtype="bfloat16", gpu_memory=None, progress=False)
    want = copy.deepcopy(original).to(torch.bfloat16)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(generate(model, ids)[0], generate(want, ids)[0])


# --- quantized: the codes kept, the experts streamed as codes ------------------------------------------------

def test_quantized_gguf_loads_ggufs_dequantization(q_gguf) -> None:
    model = gguf_mixtral.load(q_gguf, torch.float32)
    got, want = as_llama_cpp(model), gguf_values(q_gguf)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(bits(got[name]), bits(value)), name


def test_quantized_conversion_keeps_attention_and_expert_codes(q_gguf) -> None:
    from safetensors import safe_open

    path = convert_gguf(q_gguf)
    assert_expert_mark(path)
    want = gguf_values(q_gguf)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())

        def stored(base: str, kind: str) -> torch.Tensor:
            assert base not in keys and base + ".weight" not in keys
            return gguf_blocks.dequantize(kind, tuple(f.get_tensor(base + k) for k in gguf_blocks.keys(kind)))

        for i, (gate, _, down) in enumerate(EXPERT_TYPES):
            base = f"model.layers.{i}."
            for name, hf in ATTENTION.items():  # q and k: codes in transformers' row order
                value = stored(base + hf, "q8_0")
                heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(name)
                got = torch.from_numpy(permute(value.numpy(), heads)) if heads else value
                assert torch.equal(bits(got), bits(want[f"blk.{i}.{name}.weight"])), (i, name)
            got = stored(base + "mlp.experts.down_proj", down)
            assert torch.equal(bits(got), bits(want[f"blk.{i}.ffn_down_exps.weight"]))
            if i == 3:  # two types cannot share one parameter's codes: as converted (bf16)
                assert base + "mlp.experts.gate_up_proj" in keys
                continue
            got = stored(base + "mlp.experts.gate_up_proj", gate)
            reference = torch.cat([want[f"blk.{i}.ffn_gate_exps.weight"], want[f"blk.{i}.ffn_up_exps.weight"]], dim=1)
            assert got.shape == (EXPERTS, 2 * FFN, HIDDEN) and torch.equal(bits(got), bits(reference))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_expert_codes_generate_the_resident_tokens(dtype: str, q_gguf) -> None:
    path = convert_gguf(q_gguf)
    want, _ = overspill.load(q_gguf, dtype=dtype, gpu_memory=None, progress=False)  # resident, dequantized
    model, _ = overspill.load(q_gguf, dtype=dtype, plan=experts_plan(path, getattr(torch, dtype), False, LAYERS),
                              context=CONTEXT, batch=2, progress=False)
    placed = model.overspill
    assert placed.plan.moe_streaming == "experts" and placed.plan.expert_codes
    wrapped = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    assert len(wrapped) == LAYERS and all(m.codes is not None for m in wrapped)
    single, batch, mask = prompts()
    for ids, m in ((single, None), (batch, mask)):
        want_ids, want_logits = generate(want, ids, m)
        got_ids, got_logits = generate(model, ids, m)
        assert torch.equal(got_ids, want_ids), dtype
        assert not torch.equal(want_logits[0], want_logits[-1])
    assert placed.experts.misses > 0


# --- llama.cpp's older layout: one tensor per expert -------------------------------------------------------

def test_per_expert_tensors_are_refused_in_one_line(original, tmp_path) -> None:
    tensors = {}
    for name, data in llama_cpp_tensors(original).items():
        part = name.partition("ffn_")[2].removesuffix("_exps.weight")
        if name.endswith("_exps.weight"):  # blk.N.ffn_gate.E.weight: [rows, cols] each
            layer = name.split(".")[1]
            tensors.update({f"blk.{layer}.ffn_{part}.{e}.weight": (data[e], None) for e in range(EXPERTS)})
        else:
            tensors[name] = data, None
    gguf = write_mixtral_gguf(tmp_path / "tiny-mixtral-old.gguf", tensors)
    with pytest.raises(OverspillError, match="one tensor each") as err:
        overspill.load(gguf, dtype="float32", gpu_memory=None, progress=False)
    assert "convert_hf_to_gguf.py" in str(err.value) and "\n" not in str(err.value)
