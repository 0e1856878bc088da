"""TieredCache: host-tier KV layers give the same tokens as transformers' dynamic cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import overspill
from overspill.errors import OverspillError
from overspill.runtime.kv import HostKVLayer, KVRing, TieredCache, cache_kwargs

from conftest import N_LAYERS, VOCAB

GEN = dict(do_sample=False, pad_token_id=0)
BLOCK = 16  # small blocks so prompts and generation cross several block boundaries


def _prompt(batch: int, length: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :7] = 0  # left padding on one row
    return ids, mask


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch), dtype=torch.float32).eval()
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "mixtral"])
@pytest.mark.parametrize("host_fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 4])
def test_tiered_cache_matches_dynamic_cache(arch, host_fraction, batch, reference) -> None:
    model = reference(arch)
    ids, mask = _prompt(batch)
    # Host layers: the first `host_fraction` of the decoder layers.
    host = set(range(int(N_LAYERS * host_fraction)))
    cache = TieredCache(model.config, host, capacity=128, block_tokens=BLOCK)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=40, **cache_kwargs(model, DynamicCache(config=model.config)), **GEN)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=40, **cache_kwargs(model, cache), **GEN)
    assert torch.equal(got, want)
    # Every host layer keeps only whole blocks in host memory, the rest on the device.
    for i in cache.host_layer_indices:
        layer = cache.layers[i]
        assert layer.length == 37 + 40 - 1 and layer.host_tokens == layer.length // BLOCK * BLOCK
    sliding = {i for i, l in enumerate(cache.layers) if getattr(l, "is_sliding", False)}
    assert set(cache.host_layer_indices) == host - sliding
    if cache.host_layer_indices:
        assert cache.ring.restarts == 1  # primed once, then stayed in order across steps
        assert cache.memory()["host_bytes"] > 0


def test_tiered_cache_on_streamed_model(tiny_checkpoint, reference) -> None:
    # KV on host and weights streamed at once: both rings run in the same forward passes.
    path = tiny_checkpoint("llama")
    from transformers import AutoConfig

    from overspill.planning.placement import streaming_plan
    from overspill.planning.plan import Workload
    from overspill.runtime.loader import build_skeleton, decoder_layers, footprint

    skeleton = build_skeleton(AutoConfig.from_pretrained(path), torch.float32)
    plan = streaming_plan(footprint(skeleton, decoder_layers(skeleton)[1], torch.float32), Workload(128, 1, 0), 5)
    placed, _ = overspill.load(path, dtype="float32", plan=plan, progress=False)
    ids, mask = _prompt(1)
    cache = TieredCache(placed.config, set(range(0, N_LAYERS, 2)), capacity=128, block_tokens=BLOCK)
    with torch.no_grad():
        want = reference("llama").generate(ids, attention_mask=mask, max_new_tokens=30, **GEN)
        got = placed.generate(ids, attention_mask=mask, max_new_tokens=30, **cache_kwargs(placed, cache), **GEN)
    assert torch.equal(got, want)


def test_capacity_overflow_is_a_clear_error(reference) -> None:
    model = reference("llama")
    ids, mask = _prompt(1)
    cache = TieredCache(model.config, {0}, capacity=40, block_tokens=BLOCK)
    with torch.no_grad(), pytest.raises(OverspillError, match="capacity"):
        model.generate(ids, attention_mask=mask, max_new_tokens=30, **cache_kwargs(model, cache), **GEN)


def test_presized_layer_holds_keys_and_values_of_their_own_widths() -> None:
    """DeepSeek-V3's MLA caches a latent as "keys" and its rotary key as "values", one head each and of
    different widths: the presized layer keeps each in its own buffer (it sized both like the keys, so
    plain `generate` failed on every DeepSeek model), and the host tier refuses them in one line."""
    from overspill.runtime.kv import PresizedLayer

    layer = PresizedLayer(capacity=8)
    parts = [(torch.randn(2, 1, n, 16), torch.randn(2, 1, n, 4)) for n in (3, 1, 1)]
    for k, v in parts:
        keys, values = layer.update(k, v)
    assert torch.equal(keys, torch.cat([k for k, _ in parts], dim=2))
    assert torch.equal(values, torch.cat([v for _, v in parts], dim=2))
    assert layer._k.shape == (2, 1, 8, 16) and layer._v.shape == (2, 1, 8, 4)
    host = HostKVLayer(KVRing(), capacity=8)
    with pytest.raises(OverspillError, match="different shapes"):
        host.update(*parts[0])


def test_unsupported_operations_say_so(reference) -> None:
    cache = TieredCache(reference("llama").config, {1}, capacity=64, block_tokens=BLOCK)
    layer = cache.layers[1]
    assert isinstance(layer, HostKVLayer)
    for call in (lambda: layer.reorder_cache(torch.tensor([0])), lambda: layer.batch_repeat_interleave(2)):
        with pytest.raises(OverspillError):
            call()


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("keep", [37, 33, 32, 20, 0])
def test_host_layer_crop_keeps_the_first_tokens(reference, keep, legacy) -> None:
    # 40 tokens with 16-token blocks: 32 sealed in host memory, 8 in the device tail; crops into the
    # tail, onto a block edge and into a sealed block must all read back as the first `keep` tokens.
    cache = TieredCache(reference("llama").config, {1}, capacity=64, block_tokens=16)
    layer = cache.layers[1]
    D = 16
    k = torch.randn(1, 2, 40, D)
    v = torch.randn(1, 2, 40, D)
    layer.update(k[:, :, :30], v[:, :, :30])
    layer.update(k[:, :, 30:], v[:, :, 30:])
    layer.crop(0)  # transformers' "remove nothing" (generate calls it when every draft token is accepted)
    assert layer.get_seq_length() == 40
    if legacy and keep:  # the positive form transformers 5.17 still accepts: the length to keep
        layer.crop(keep)
    else:
        layer.crop(keep - 40)
    assert layer.get_seq_length() == keep and layer.host_tokens == keep // 16 * 16
    more_k, more_v = torch.randn(1, 2, 5, D), torch.randn(1, 2, 5, D)
    got_k, got_v = layer.update(more_k, more_v)
    assert torch.equal(got_k, torch.cat([k[:, :, :keep], more_k], dim=2))
    assert torch.equal(got_v, torch.cat([v[:, :, :keep], more_v], dim=2))
    layer.crop(-3)
    assert layer.get_seq_length() == keep + 2


def _prefill_tokens(model) -> list[int]:
    """Records how many tokens each forward pass embeds (the first entry is the prefill)."""
    seen: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-1]))
    return seen


@pytest.mark.parametrize("host_fraction", [0.0, 0.5])
def test_prefix_reuse_computes_only_new_tokens(host_fraction, tiny_checkpoint) -> None:
    from overspill.runtime.prefix import PrefixCache

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    seen = _prefill_tokens(model)
    prefix = PrefixCache(model.config, capacity_tokens=64 * BLOCK, block_tokens=BLOCK, dtype=torch.float32)
    host = set(range(int(N_LAYERS * host_fraction)))
    gen = torch.Generator().manual_seed(7)
    shared = torch.randint(1, VOCAB, (50,), generator=gen).tolist()
    first = shared + torch.randint(1, VOCAB, (20,), generator=gen).tolist()
    second = shared + torch.randint(1, VOCAB, (16,), generator=gen).tolist()

    def run(tokens: list[int], reuse: bool) -> torch.Tensor:
        ids = torch.tensor([tokens])
        cache = TieredCache(model.config, host, capacity=256, block_tokens=BLOCK)
        lease = prefix.start(tokens, cache) if reuse else None
        seen.clear()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 **cache_kwargs(model, cache), **GEN)
        if lease is not None:
            prefix.finish(lease, cache, tokens)
        return out

    # Cold: nothing cached, the whole prompt is prefilled, then its 4 full blocks are stored.
    cold_first = run(first, reuse=True)
    assert seen[0] == len(first)
    # Second request shares 50 tokens = 3 full blocks of 16: only the other 18 tokens are computed.
    warm = run(second, reuse=True)
    assert seen[0] == len(second) - 3 * BLOCK
    # Same tokens as without any reuse.
    assert torch.equal(warm, run(second, reuse=False))
    assert torch.equal(cold_first, run(first, reuse=False))
    usage = prefix.manager.usage()
    assert usage.hit_tokens == 3 * BLOCK and usage.host.used_blocks == 0  # leases released


def test_prefix_abort_forgets_unwritten_blocks(tiny_checkpoint) -> None:
    from overspill.runtime.prefix import PrefixCache

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    prefix = PrefixCache(model.config, capacity_tokens=16 * BLOCK, block_tokens=BLOCK, dtype=torch.float32)
    tokens = list(range(1, 60))
    lease = prefix.start(tokens, TieredCache(model.config, set(), capacity=128, block_tokens=BLOCK))
    prefix.abort(lease)  # e.g. the request was cancelled before prefill ran
    again = prefix.start(tokens, TieredCache(model.config, set(), capacity=128, block_tokens=BLOCK))
    assert again.cached_tokens == 0


@pytest.mark.parametrize("arch", ["gemma2", "mistral", "phi3"])  # mistral and phi3 set a window but no layer_types
def test_prefix_cache_refuses_sliding_window_models(reference, arch) -> None:
    from overspill.runtime.prefix import PrefixCache

    with pytest.raises(OverspillError, match="sliding"):
        PrefixCache(reference(arch).config, capacity_tokens=1024)


def test_prefix_cache_refuses_latent_attention() -> None:
    """DeepSeek's MLA caches one latent head, not the per-head keys and values the pool is shaped for."""
    from overspill.runtime.prefix import PrefixCache

    from test_spec import TINY, hf_config

    with pytest.raises(OverspillError, match="latent attention"):
        PrefixCache(hf_config(TINY["deepseek_v3"]), capacity_tokens=1024)


def test_load_with_kv_budget_uses_tiered_cache_in_generate_and_pipeline(tiny_checkpoint, reference) -> None:
    # A KV budget for 3 layers' KV: 5 of 8 layers keep KV in host memory (3 slots of staging + 3 layers
    # would need more), and plain generate()/pipeline() build the TieredCache by themselves.
    from overspill.api import placement_of

    path = tiny_checkpoint("llama")
    config = reference("llama").config
    kv_layer = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4 * 128
    model, _ = overspill.load(path, gpu_memory=None, dtype="float32", context=128,
                              kv_gpu_memory=6 * kv_layer, progress=False)
    plan = placement_of(model).plan
    assert plan.kv_host_layers == tuple(range(5))
    assert "pinned host memory" in plan.summary()
    created = []
    original = TieredCache.__init__

    def spy(self, *args, **kwargs):
        created.append(self)
        original(self, *args, **kwargs)

    ids, mask = _prompt(1)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(TieredCache, "__init__", spy)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=20, **GEN)
        assert len(created) == 1 and created[0].host_layer_indices == [0, 1, 2, 3, 4]
        want = reference("llama").generate(ids, attention_mask=mask, max_new_tokens=20, **GEN)
        assert torch.equal(got, want)
    assert created[0].memory()["staging_bytes"] > 0  # the host layers went through the staging ring


def test_pipeline_with_host_kv_answers(default_model_dir) -> None:
    # The embedded SmolLM2 with most of its KV in host memory still answers through pipeline().
    from transformers import pipeline

    from overspill.api import placement_of

    model, tok = overspill.load(default_model_dir, gpu_memory=None, context=256, kv_gpu_memory="2MiB", progress=False)
    assert len(placement_of(model).plan.kv_host_layers) > 20
    created = []
    original = TieredCache.__init__

    def spy(self, *args, **kwargs):
        created.append(self)
        original(self, *args, **kwargs)

    chat = [{"role": "user", "content": "What is the highest mountain in the world?"}]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TieredCache, "__init__", spy)
        out = pipeline("text-generation", model=model, tokenizer=tok)(chat, max_new_tokens=24, do_sample=False)
    assert "Everest" in out[0]["generated_text"][-1]["content"]
    assert created and created[0].host_layer_indices


def test_prefix_restores_blocks_scattered_over_the_pool(tiny_checkpoint) -> None:
    """Copies go per run of consecutive pool blocks; a fragmented pool must restore the same KV."""
    from overspill.planning.kvblocks import KVTier
    from overspill.runtime.prefix import PrefixCache, _runs

    assert _runs([3, 4, 5, 9, 10, 2]) == [(0, 3, 3), (3, 9, 2), (5, 2, 1)]
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    prefix = PrefixCache(model.config, capacity_tokens=16 * BLOCK, block_tokens=BLOCK, dtype=torch.float32)
    free = prefix.manager._free[KVTier.HOST]
    order = [3, 4, 9, 1, 0]  # the prompt's 5 blocks land in runs [3, 4], [9], [1], [0]
    free.clear()
    free.extend(order + [i for i in range(16) if i not in order])
    tokens = torch.randint(1, VOCAB, (5 * BLOCK + 3,), generator=torch.Generator().manual_seed(3)).tolist()

    def run(reuse: bool) -> torch.Tensor:
        ids = torch.tensor([tokens])
        cache = TieredCache(model.config, set(), capacity=256, block_tokens=BLOCK)
        lease = prefix.start(tokens, cache) if reuse else None
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 **cache_kwargs(model, cache), **GEN)
        if lease is not None:
            prefix.finish(lease, cache, tokens)
        return out

    cold = run(reuse=True)
    warm = run(reuse=True)
    assert prefix.manager.usage().hit_tokens == 5 * BLOCK
    assert torch.equal(warm, cold) and torch.equal(warm, run(reuse=False))


@pytest.mark.parametrize("batch", [1, 3])
def test_the_block_manager_holds_exactly_the_host_blocks(reference, batch) -> None:
    """One manager block per host layer per sealed block, their bytes the KV the reference cache holds;
    crop, reset and close give blocks back, and a closed cache runs again."""
    from overspill.runtime.kv import layer_kv

    model = reference("llama")
    ids, mask = _prompt(batch)
    host = {0, 2, 3}
    cache = TieredCache(model.config, host, capacity=128, block_tokens=BLOCK)
    want = DynamicCache(config=model.config)
    kw = dict(attention_mask=mask, max_new_tokens=20, **GEN)
    with torch.no_grad():
        model.generate(ids, **kw, **cache_kwargs(model, want))
        first = model.generate(ids, **kw, **cache_kwargs(model, cache))
    sealed = (37 + 20 - 1) // BLOCK  # the last generated token's KV is never written
    assert cache.host_blocks == len(host) * sealed == cache.blocks.usage().host_layer.used_blocks
    for i in host:
        assert cache.layers[i].host_tokens == sealed * BLOCK
        for row in range(batch):  # tokens [0, sealed blocks) are read from host memory alone
            for got, ref in zip(layer_kv(cache, i, 0, sealed * BLOCK, row), layer_kv(want, i, 0, sealed * BLOCK, row)):
                torch.testing.assert_close(got, ref)
    cache.crop(30 - (37 + 20 - 1))  # back across a sealed block to 30 tokens: 1 block per layer stays on the host
    assert cache.host_blocks == len(host) == cache.blocks.usage().host_layer.used_blocks
    cache.reset()
    assert cache.host_blocks == 0 == cache.blocks.usage().host_layer.used_blocks
    cache.close()
    assert cache.blocks.usage().host_layer.used_blocks == 0 and cache.ring.slots == []
    with torch.no_grad():
        again = model.generate(ids, **kw, **cache_kwargs(model, cache))
    assert torch.equal(again, first) and cache.host_blocks == len(host) * sealed


def test_a_shared_manager_bounds_several_caches(reference) -> None:
    from overspill.planning.kvblocks import KVBlockManager, KVCapacityError

    config = reference("llama").config
    blocks = KVBlockManager(BLOCK, 0, 0, layer_blocks=5)
    a, b = (TieredCache(config, {1}, capacity=128, block_tokens=BLOCK, blocks=blocks) for _ in range(2))
    k = torch.randn(1, 2, 80, 16)
    a.layers[1].update(k[:, :, :40], k[:, :, :40])  # 2 sealed blocks
    b.layers[1].update(k[:, :, :60], k[:, :, :60])  # 3 more: the manager is full
    assert blocks.usage().host_layer.used_blocks == 5 == a.host_blocks + b.host_blocks
    with pytest.raises(KVCapacityError):
        b.layers[1].update(k[:, :, 60:64], k[:, :, 60:64])  # a 4th block for b
    assert b.layers[1].get_seq_length() == 60 and b.host_blocks == 3  # nothing changed
    a.close()
    got, _ = b.layers[1].update(k[:, :, 60:64], k[:, :, 60:64])
    assert torch.equal(got, k[:, :, :64]) and blocks.usage().host_layer.used_blocks == 4
    # an engine's manager: GPU and HOST blocks are its requests' and its prefix pool's, never the layers'
    engine = KVBlockManager(BLOCK, 4, 1, layer_blocks=2)
    c = TieredCache(config, {1}, capacity=128, block_tokens=BLOCK, blocks=engine)
    c.layers[1].update(k[:, :, :20], k[:, :, :20])
    assert engine.usage().host_layer.used_blocks == 1 and engine.usage().gpu.used_blocks == 0
    assert engine.usage().host.used_blocks == 0
    # a manager of smaller blocks counts the same host tokens in more of its blocks; a crop gives them back
    fine = KVBlockManager(BLOCK // 4, 0, 0, layer_blocks=c.max_host_blocks(BLOCK // 4))
    d = TieredCache(config, {1}, capacity=128, block_tokens=BLOCK, blocks=fine)
    assert c.max_host_blocks(BLOCK) == 128 // BLOCK and fine.usage().host_layer.total_blocks == 4 * 128 // BLOCK
    d.layers[1].update(k[:, :, :50], k[:, :, :50])  # 3 blocks of BLOCK spill: 12 of the manager's
    assert d.layers[1].host_tokens == 3 * BLOCK and d.host_blocks == 12 == fine.usage().host_layer.used_blocks
    d.crop(-30)  # keep 20 tokens: one host block of BLOCK (16) stays, 4 of the manager's
    assert d.layers[1].host_tokens == BLOCK and d.host_blocks == 4 == fine.usage().host_layer.used_blocks
    d.close()
    assert fine.usage().host_layer.used_blocks == 0
