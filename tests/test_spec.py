"""ModelSpec byte counts checked against models transformers actually builds.

Models are built on the meta device, so nothing is allocated and even the
70B/109B shipped configs are cheap to instantiate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from overspill.planning.configs import SHIPPED, shipped_config, shipped_names  # noqa: E402
from overspill.planning.spec import ModelSpec, spec_from_config  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = {"vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
SMALL = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    **TOKENS,
}

TINY: dict[str, dict] = {
    "llama": {"model_type": "llama", **SMALL},
    "llama-bias-tied": {
        "model_type": "llama",
        **SMALL,
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": True,
    },
    "mistral": {"model_type": "mistral", **SMALL, "sliding_window": 16},
    "qwen2": {"model_type": "qwen2", **SMALL, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
    "qwen3": {"model_type": "qwen3", **SMALL, "head_dim": 32},
    "phi3": {"model_type": "phi3", **SMALL, "sliding_window": 16},
    "gemma2": {"model_type": "gemma2", **SMALL, "num_hidden_layers": 4, "head_dim": 16, "sliding_window": 16},
    "mixtral": {"model_type": "mixtral", **SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "model_type": "qwen2_moe",
        **SMALL,
        "num_hidden_layers": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "mlp_only_layers": [0],
        "use_sliding_window": True,
        "sliding_window": 16,
        "max_window_layers": 3,
    },
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        **SMALL,
        "num_hidden_layers": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 2,
    },
    "llama4_text": {
        "model_type": "llama4_text",
        **SMALL,
        "num_hidden_layers": 4,
        "head_dim": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
        "intermediate_size_mlp": 128,
        "interleave_moe_layer_step": 2,
        "no_rope_layer_interval": 2,
        "attention_chunk_size": 16,
    },
    # MLA attention (query and key-value latents), the first layer dense, shared experts, a float32 router
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        **SMALL,
        "num_key_value_heads": 4,  # transformers' MLA expands keys to every head: grouping would not match
        "num_hidden_layers": 3,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 3,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
        "q_lora_rank": 32,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
    },
}
FP32_ROUTER = {"deepseek_v3"}  # transformers keeps the router weight in float32 (_keep_in_fp32_modules_strict)

# Parameter counts of the shipped configs as built by transformers 5.x
# (AutoModelForCausalLM.from_config on the meta device).
SHIPPED_PARAMS = {
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mixtral-8x7b": 46_702_792_704,
    "qwen2.5-7b": 7_615_616_512,
    "llama-4-scout-109b": 107_769_861_120,
    "qwen3-30b-a3b": 30_532_122_624,
    "deepseek-v3": 671_026_404_352,
}
# Sizes as published by the model authors (Scout: text decoder only).
PUBLISHED_PARAMS = {
    "llama-3-8b": 8.03e9,
    "llama-3-70b": 70.55e9,
    "mixtral-8x7b": 46.70e9,
    "qwen2.5-7b": 7.62e9,
    "llama-4-scout-109b": 108.6e9,
    "qwen3-30b-a3b": 30.5e9,
    "deepseek-v3": 671e9,  # without the multi-token-prediction layer, which transformers does not build
}


def hf_config(d: dict):
    d = dict(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def meta_model(d: dict):
    cfg = hf_config(d)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(cfg)


def categorize(layer) -> dict[str, int]:
    """Sum a decoder layer's parameter counts by the LayerSpec field they belong to."""
    out = dict.fromkeys(("attention", "mlp", "router", "experts", "norm"), 0)
    for name, p in layer.named_parameters():
        if "norm" in name:
            key = "norm"
        elif name.startswith("self_attn."):
            key = "attention"
        elif ".experts." in name:
            key = "experts"
        elif name.endswith(("mlp.gate.weight", "router.weight", "shared_expert_gate.weight")):
            key = "router"
        else:
            key = "mlp"
        out[key] += p.numel()
    return out


def hf_windows(d: dict) -> list[int | None]:
    """KV window per layer as transformers' config defines it."""
    cfg = hf_config(d)
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [getattr(cfg, "sliding_window", None)] * n
    by_type = {
        "sliding_attention": getattr(cfg, "sliding_window", None),
        "chunked_attention": getattr(cfg, "attention_chunk_size", None),
    }
    return [by_type.get(t) for t in types]


@pytest.mark.parametrize("name", sorted(TINY))
def test_bytes_match_transformers(name: str) -> None:
    d = TINY[name]
    spec = spec_from_config(d, dtype="bfloat16")
    model = meta_model(d)
    assert not spec.approximate
    assert spec.embed_bytes == model.model.embed_tokens.weight.numel() * 2
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert spec.tied_embeddings == tied
    assert spec.head_bytes == (0 if tied else model.lm_head.weight.numel() * 2)
    assert spec.final_norm_bytes == model.model.norm.weight.numel() * 2
    assert len(spec.layers) == len(model.model.layers)
    router_size = 4 if d["model_type"] in FP32_ROUTER else 2
    routers = 0
    for layer, hf_layer in zip(spec.layers, model.model.layers):
        got = categorize(hf_layer)
        assert layer.attention_bytes == got["attention"] * 2, layer.index
        assert layer.mlp_bytes == got["mlp"] * 2, layer.index
        assert layer.router_bytes == got["router"] * router_size, layer.index
        assert layer.num_experts * layer.expert_bytes == got["experts"] * 2, layer.index
        assert layer.norm_bytes == got["norm"] * 2, layer.index
        assert layer.total_bytes == sum(got.values()) * 2 + got["router"] * (router_size - 2), layer.index
        routers += got["router"]
    # num_params is bytes over the compute dtype's size: a float32 router counts twice
    assert spec.num_params == sum(p.numel() for p in model.parameters()) + routers * (router_size - 2) // 2


@pytest.mark.parametrize("name", sorted(TINY))
def test_windows_match_transformers(name: str) -> None:
    spec = spec_from_config(TINY[name])
    assert [layer.sliding_window for layer in spec.layers] == hf_windows(TINY[name])


def test_moe_layout() -> None:
    qwen2_moe = spec_from_config(TINY["qwen2_moe"])
    assert [layer.is_moe for layer in qwen2_moe.layers] == [False, True, True, True]
    qwen3_moe = spec_from_config(TINY["qwen3_moe"])
    assert [layer.is_moe for layer in qwen3_moe.layers] == [False, True, False, True]
    llama4 = spec_from_config(TINY["llama4_text"])
    assert [layer.is_moe for layer in llama4.layers] == [False, True, False, True]
    mixtral = spec_from_config(TINY["mixtral"]).layers[0]
    assert mixtral.active_bytes == mixtral.total_bytes - 2 * mixtral.expert_bytes


def test_tied_head_counts_once() -> None:
    tied = spec_from_config(TINY["llama-bias-tied"])
    untied = spec_from_config({**TINY["llama-bias-tied"], "tie_word_embeddings": False})
    assert tied.head_bytes == 0 and untied.head_bytes == untied.embed_bytes
    assert untied.total_bytes - tied.total_bytes == tied.embed_bytes
    assert tied.active_bytes == untied.active_bytes


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_builds_in_transformers(name: str) -> None:
    d = shipped_config(name)
    model = meta_model(d)
    assert sum(p.numel() for p in model.parameters()) == SHIPPED_PARAMS[name]
    # bf16 bytes, but a float32 router (DeepSeek-V3's, kept in float32 by transformers) takes 4 bytes a weight
    fp32 = sum(p.numel() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")) \
        if d["model_type"] in FP32_ROUTER else 0
    assert spec_from_config(shipped_config(name)).total_bytes == 2 * SHIPPED_PARAMS[name] + 2 * fp32


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_params_near_published(name: str) -> None:
    spec = spec_from_config(shipped_config(name))
    assert spec.dtype == "bfloat16"
    assert spec.num_params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)


def test_llama3_kv_cache() -> None:
    assert spec_from_config(shipped_config("llama-3-8b")).kv_bytes_per_token == 32 * 2 * 8 * 128 * 2 == 131072
    big = spec_from_config(shipped_config("llama-3-70b"))
    assert big.kv_bytes_per_token == 327680
    assert big.kv_bytes(128 * 1024) == 327680 * 131072
    assert big.kv_bytes(128 * 1024) / 1e9 == pytest.approx(42.9, abs=0.05)
    assert big.kv_bytes(1000, batch=4) == 4 * big.kv_bytes(1000)


def test_scout_chunked_layers_cap_kv() -> None:
    scout = spec_from_config(shipped_config("llama-4-scout-109b"))
    windows = [layer.sliding_window for layer in scout.layers]
    assert windows.count(None) == 12 and windows.count(8192) == 36
    assert all(layer.is_moe and layer.active_experts == 1 for layer in scout.layers)
    per_layer = 2 * 8 * 128 * 2
    assert scout.kv_bytes(100_000) == per_layer * (12 * 100_000 + 36 * 8192)
    assert scout.kv_bytes(4096) == scout.kv_bytes_per_token * 4096


def test_mixtral_active_params() -> None:
    spec = spec_from_config(shipped_config("mixtral-8x7b"))
    active = (spec.active_bytes + spec.embed_bytes) / spec.dtype_bytes
    assert active == pytest.approx(12.9e9, rel=0.01)


def test_qwen25_full_attention() -> None:
    spec = spec_from_config(shipped_config("qwen2.5-7b"))
    assert all(layer.sliding_window is None for layer in spec.layers)
    assert spec.layers[0].attention_bytes == 2 * (3584 * (3584 + 2 * 512) + 3584 * 3584 + 3584 + 2 * 512)


def test_missing_keys_are_named() -> None:
    with pytest.raises(ValueError) as err:
        spec_from_config({"model_type": "llama", "hidden_size": 64})
    msg = str(err.value)
    assert "llama" in msg
    for key in ("num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        assert key in msg
    assert "hidden_size" not in msg

    moe = {k: v for k, v in TINY["mixtral"].items() if k != "num_local_experts"}
    with pytest.raises(ValueError, match="mixtral.*num_local_experts"):
        spec_from_config(moe)


@pytest.mark.parametrize(("key", "value"), [("num_hidden_layers", -2), ("num_hidden_layers", 0),
                                            ("num_attention_heads", 0), ("vocab_size", 0)])
def test_sizes_below_one_are_refused(key: str, value: int) -> None:
    """A negative layer count planned "-2 layers" of nothing; zero heads divided by zero."""
    with pytest.raises(ValueError, match=f"sizes below 1: {key} {value}$"):
        spec_from_config({**TINY["llama"], key: value})

    dense_llama4 = {**TINY["llama4_text"], "intermediate_size_mlp": None}
    with pytest.raises(ValueError, match="intermediate_size_mlp"):
        spec_from_config(dense_llama4)


def test_unknown_keys_ignored() -> None:
    noisy = {**TINY["qwen3"], "foo": 1, "quantization_config": {"bits": 4}, "rope_scaling": None}
    assert spec_from_config(noisy) == spec_from_config(TINY["qwen3"])


def test_unknown_model_type_is_approximate_llama() -> None:
    spec = spec_from_config({**TINY["llama"], "model_type": "some_new_arch"})
    llama = spec_from_config(TINY["llama"])
    assert spec.approximate and not llama.approximate
    assert spec.layers == llama.layers and spec.total_bytes == llama.total_bytes


def test_dtype_handling() -> None:
    bf16 = spec_from_config(TINY["llama"])
    assert bf16.dtype == "bfloat16"
    fp32 = spec_from_config({**TINY["llama"], "torch_dtype": "float32"})
    assert fp32.total_bytes == 2 * bf16.total_bytes
    assert fp32.kv_bytes_per_token == 2 * bf16.kv_bytes_per_token
    assert spec_from_config(TINY["llama"], dtype="torch.float16").dtype == "float16"
    assert spec_from_config(TINY["llama"], dtype="fp8").total_bytes * 2 == bf16.total_bytes
    with pytest.raises(ValueError, match="unsupported dtype"):
        spec_from_config(TINY["llama"], dtype="int3")


def test_spec_takes_a_config_dict_and_shipped_names_are_unknown_elsewhere() -> None:
    # Finding a config by name or path is `overspill.runtime.sources.resolve`'s (tests/test_sources.py).
    with pytest.raises(TypeError, match="config dict"):
        spec_from_config("llama-3-8b")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="known"):
        shipped_config("no-such-model")
    assert shipped_names() == sorted(SHIPPED)


def test_multimodal_wrapper_uses_text_config() -> None:
    text = shipped_config("llama-4-scout-109b")
    wrapper = {"model_type": "llama4", "text_config": text, "vision_config": {"hidden_size": 1408}}
    assert spec_from_config(wrapper) == spec_from_config(text)


def test_spec_is_frozen() -> None:
    spec: ModelSpec = spec_from_config(shipped_config("llama-3-8b"))
    with pytest.raises(AttributeError):
        spec.num_layers = 1  # type: ignore[misc]


def test_spec_module_imports_no_torch() -> None:
    """Loads spec.py and configs/__init__.py by path so the package __init__ is not involved."""
    code = f"""
import importlib.util, sys
def load(name, path):
    s = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(s)
    sys.modules[name] = m
    s.loader.exec_module(m)
    return m
load("probe_configs", {str(ROOT / "overspill" / "planning" / "configs" / "__init__.py")!r})
spec = load("probe_spec", {str(ROOT / "overspill" / "planning" / "spec.py")!r})
s = spec.spec_from_config({TINY["mixtral"]!r})
assert s.num_layers == 3
bad = [m for m in ("torch", "transformers", "numpy") if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_context_past_the_trained_positions_is_noted_by_plan_and_load(capsys, tiny_checkpoint) -> None:
    """llama-3-8b's config says 8192 positions: a 131072-token plan says so (as load notes it), one within
    them says nothing."""
    import overspill
    from overspill import cli
    from overspill.planning.spec import positions_note

    spec = spec_from_config(shipped_config("llama-3-8b"))
    assert spec.max_positions == 8192 and positions_note(spec, 8192) is None
    note = positions_note(spec, 131072)
    assert note.startswith("a context of 131072 tokens is past the 8192 positions this model was trained for")
    assert cli.main(["plan", "llama-3-8b", "--context", "131072", "--json"]) == 0
    assert note in json.loads(capsys.readouterr().out)["plan"]["notes"]
    tiny = {**TINY["llama"], "max_position_embeddings": 64}
    assert positions_note(spec_from_config(tiny), 65) is not None and positions_note(spec_from_config(tiny), 64) is None
    assert spec_from_config({**TINY["llama"], "max_position_embeddings": None}).max_positions is None
    # rope scaling stretches the trained positions: Qwen2.5's YaRN (32768 x 4), Llama 3.1's (131072 already)
    yarn = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}
    assert spec_from_config({**TINY["llama"], "max_position_embeddings": 32768, "rope_scaling": yarn}).max_positions \
        == 131072
    llama31 = {"factor": 8.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    assert spec_from_config({**TINY["llama"], "max_position_embeddings": 131072, "rope_scaling": llama31}) \
        .max_positions == 131072
    for context, noted in ((256, False), (512, True)):  # the tiny checkpoints' config says 256
        model, _ = overspill.load(tiny_checkpoint("llama"), context=context, dtype="float32", progress=False)
        notes = overspill.api.placement_of(model).plan.notes
        assert any("is past the 256 positions this model was trained for" in n for n in notes) == noted
