"""Speculative decoding through the graphed decode path (`GraphedDecode.verify`), run eagerly on the CPU.

Everything but the capture: verify passes over the static cache with each token's mask row, graphed
pass sizes filled with extra guesses, crops moving the cache's counters and the host's count back.
Tokens must be plain graphed greedy's, and plain transformers'.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB
from test_placement import load_tiny
from test_speculative import GEN, NEW, _prompt, reference  # noqa: F401 - fixture

from overspill.api import placement_of
from overspill.planning.speculation import GRAPHED_PASSES
from overspill.runtime import speculative
from overspill.runtime.drafts import NgramDrafter, OracleDrafter
from overspill.runtime.graphs import enable_graphs



GRAPHABLE = ["llama", "mixtral", "qwen3"]


@pytest.mark.parametrize("chain", [3, 8, None])
@pytest.mark.parametrize("resident", [0, 3])
@pytest.mark.parametrize("arch", GRAPHABLE)
def test_graphed_verify_gives_plain_graphed_greedy(arch, resident, chain, reference, tiny_checkpoint) -> None:
    ids = _prompt(5)
    want = reference(arch).generate(ids, **GEN)
    model = load_tiny(tiny_checkpoint(arch), resident=resident)
    graphed = enable_graphs(model, capture=False)
    assert graphed is not None
    plain = model.generate(ids, **GEN)  # graphed plain decoding, the loop's reference
    assert torch.equal(plain, want)
    calls = []
    verify = graphed.verify
    graphed.verify = lambda x: calls.append(x.shape[1]) or verify(x)
    speculative.enable(model, OracleDrafter(want[0, ids.shape[1]:], ids.shape[1], 0.7, VOCAB, seed=2), chain=chain)
    try:
        got = model.generate(ids, **GEN)
        stats = model.speculation_stats
    finally:
        speculative.enable(model, None)
    assert torch.equal(got, want)
    assert stats.emitted == NEW and stats.passes < NEW and stats.serial
    assert calls and all(n in GRAPHED_PASSES for n in calls)  # few pass sizes: few graphs
    assert graphed.length == int(graphed.cache.get_seq_length())  # crops kept the host's count in step
    again = model.generate(ids, **GEN)  # the static cache is reused: the crops left nothing behind
    assert torch.equal(again, want)


@pytest.mark.parametrize("arch", ["llama"])
def test_graphed_verify_with_prompt_lookup_and_a_reused_cache(arch, reference, tiny_checkpoint) -> None:
    ids = _prompt(7)
    want = reference(arch).generate(ids, **GEN)
    model = load_tiny(tiny_checkpoint(arch), resident=2)
    enable_graphs(model, capture=False)
    speculative.enable(model, NgramDrafter())
    try:
        for _ in range(2):
            assert torch.equal(model.generate(ids, **GEN), want)
    finally:
        speculative.enable(model, None)
    assert placement_of(model).plan.streamed_layers


def test_graph_cache_crop_moves_the_counters_back(reference, tiny_checkpoint) -> None:
    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    graphed = enable_graphs(model, capture=False)
    cache = graphed.fresh_cache(1)
    ids = _prompt(2)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{graphed.key: cache})
        assert graphed.length == ids.shape[1] == int(cache.get_seq_length())
        cache.crop(-5)
        assert graphed.length == ids.shape[1] - 5
        assert all(int(layer.cumulative_length) == ids.shape[1] - 5 for layer in cache.layers)
        cache.crop(4)  # the legacy form: keep 4
        assert graphed.length == 4 == int(cache.get_seq_length())
