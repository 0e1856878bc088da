"""`generate` on a placed model stays inside the plan: prompts prefill in the plan's chunks, and the
KV cache is allocated once per call (`PresizedLayer`) instead of growing by concatenation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

import overspill
from overspill.planning.plan import PREFILL_CHUNK_TOKENS
from overspill.runtime.kv import PresizedLayer, cache_kwargs, presized_cache

from conftest import VOCAB

GEN = dict(do_sample=False, pad_token_id=0)


def _ids(batch: int = 1, length: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def placed(tiny_checkpoint):
    """The tiny llama with half its layers streamed."""
    model, _ = overspill.load(str(tiny_checkpoint("llama")), gpu_memory=None, progress=False, device="cpu",
                              context=128)
    return model


def test_placed_model_prefills_in_the_plans_chunks(placed) -> None:
    assert placed.generation_config.prefill_chunk_size == PREFILL_CHUNK_TOKENS


@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_chunked_prefill_into_presized_kv_matches_plain_greedy(placed, reference, chunk) -> None:
    """Tokens equal transformers' own dynamic cache, unchunked, for prompts split into several chunks."""
    ids = _ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on one row
    with torch.no_grad():
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=12, prefill_chunk_size=None, **GEN)
        out = placed.generate(ids, attention_mask=mask, max_new_tokens=12, prefill_chunk_size=chunk,
                              return_dict_in_generate=True, **GEN)
    assert torch.equal(out.sequences, want)
    cache = out.past_key_values
    full = [layer for layer in cache.layers if isinstance(layer, PresizedLayer)]
    assert len(full) == len(cache.layers)
    for layer in full:  # one buffer, sized by generate's max length, every token written in place
        assert layer._k.shape[2] == 40 + 12 - 1
        assert layer.keys.data_ptr() == layer._k.data_ptr()
        assert layer.get_seq_length() == 40 + 12 - 1


def test_generate_without_a_cache_still_works(placed, reference) -> None:
    ids = _ids(1, 20, seed=3)
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=5, use_cache=False, **GEN)
        got = placed.generate(ids, max_new_tokens=5, use_cache=False, **GEN)
    assert torch.equal(got, want)


def test_a_cache_implementation_asked_for_is_kept(placed) -> None:
    with torch.no_grad():
        out = placed.generate(_ids(1, 10), max_new_tokens=3, cache_implementation="static",
                              return_dict_in_generate=True, **GEN)
    assert not any(isinstance(layer, PresizedLayer) for layer in out.past_key_values.layers)


def _filled(cache, config, steps: list[int], batch: int = 2) -> None:
    """Feed each layer of `cache` the same seeded K/V chunks of the given lengths."""
    gen = torch.Generator().manual_seed(1)
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    for n in steps:
        k = torch.randn(batch, heads, n, dim, generator=gen)
        v = torch.randn(batch, heads, n, dim, generator=gen)
        for i in range(len(cache.layers)):
            cache.update(k, v, i)


@pytest.mark.parametrize("capacity", [3, 64])  # 3: every update overflows and the buffer moves
def test_presized_layer_follows_dynamic_layer_through_crop_select_and_reorder(reference, capacity) -> None:
    config = reference.config
    want, got = DynamicCache(config=config), presized_cache(config, capacity)
    assert all(type(layer) is PresizedLayer for layer in got.layers)
    assert all(type(layer) is DynamicLayer for layer in want.layers)
    for cache in (want, got):
        _filled(cache, config, [5, 1, 1])
        cache.crop(-1)  # drop the last of 7 tokens (negative: the same meaning in transformers 5.17 and 5.25)
        _filled(cache, config, [2])
        cache.reorder_cache(torch.tensor([1, 0]))  # beam search's row permutation
        _filled(cache, config, [1])
        cache.batch_select_indices(torch.tensor([1]))
        _filled(cache, config, [3], batch=1)
    for a, b in zip(want.layers, got.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert b.get_seq_length() == 12


def test_presized_layer_reuses_its_buffer_after_reset(reference) -> None:
    cache = presized_cache(reference.config, 32)
    _filled(cache, reference.config, [4, 4])
    buffers = [layer._k.data_ptr() for layer in cache.layers]
    cache.reset()
    assert cache.get_seq_length() == 0
    _filled(cache, reference.config, [6])
    assert [layer._k.data_ptr() for layer in cache.layers] == buffers
    assert cache.get_seq_length() == 6


def test_tiered_cache_device_layers_are_presized(reference) -> None:
    from overspill.runtime.kv import HostKVLayer, TieredCache

    cache = TieredCache(reference.config, {0, 1}, capacity=64, block_tokens=16)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds[:2] == [HostKVLayer, HostKVLayer] and set(kinds[2:]) == {PresizedLayer}
    ids = _ids(1, 30, seed=5)
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=8, **GEN)
        got = reference.generate(ids, max_new_tokens=8, **cache_kwargs(reference, cache), **GEN)
    assert torch.equal(got, want)
