"""The fixed-buffer decode step that CUDA graphs capture, run eagerly on the CPU.

Everything but the capture itself: the static cache reused across `generate` calls, inputs copied
into fixed buffers, the 4D mask built from the padding mask and the cache's counter, the ring's
phases. Tokens and logits must match plain transformers, resident, streamed and batched.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import N_LAYERS
from test_placement import generate_with_logits, load_tiny, prompts, reference  # noqa: F401 - fixture

from overspill.api import placement_of
from overspill.runtime.graphs import GraphCache, enable_graphs, graphs_supported

GRAPHABLE = ["llama", "mixtral", "qwen3"]


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # static cache: attention sums over masked zeros too


@pytest.mark.parametrize("resident", [0, 4, N_LAYERS])
@pytest.mark.parametrize("arch", GRAPHABLE)
def test_fixed_buffer_decode_matches_transformers(arch: str, resident: int, tiny_checkpoint, reference) -> None:
    model = load_tiny(tiny_checkpoint(arch), resident)
    graphed = enable_graphs(model, capture=False)
    assert graphed is not None and placement_of(model).graphs is graphed
    ref = reference(arch)
    single, batch, mask = prompts()
    with torch.no_grad():
        want, want_logits = generate_with_logits(ref, single)
        got, got_logits = generate_with_logits(model, single)
        assert torch.equal(got, want)
        close(got_logits, want_logits)
        cache = graphed.cache
        assert isinstance(cache, GraphCache) and graphed.eager_steps == want.shape[1] - single.shape[1] - 1
        # A second call reuses the same cache (graphs captured over it stay valid), emptied.
        again, _ = generate_with_logits(model, single)
        assert torch.equal(again, want) and graphed.cache is cache
        # Left-padded batch: a new batch size gets its own cache.
        want_b, want_b_logits = generate_with_logits(ref, batch, attention_mask=mask)
        got_b, got_b_logits = generate_with_logits(model, batch, attention_mask=mask)
        assert torch.equal(got_b, want_b) and graphed.cache is not cache
        close(got_b_logits, want_b_logits)


def test_static_cache_refuses_more_tokens_than_its_context(tiny_checkpoint) -> None:
    from overspill.errors import OverspillError

    model = load_tiny(tiny_checkpoint("llama"), 4)
    enable_graphs(model, capture=False)
    ids = torch.randint(3, 100, (1, 60))
    with pytest.raises(OverspillError, match="static KV cache of 64"):
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma2"])
def test_sliding_window_models_are_not_graphed(arch: str, tiny_checkpoint) -> None:
    model = load_tiny(tiny_checkpoint(arch), 4)
    assert "sliding" in graphs_supported(model, placement_of(model))
    assert enable_graphs(model, capture=False) is None


@pytest.mark.parametrize(("streamed", "slots"), [(8, 3), (6, 3), (5, 2), (1, 2)])
def test_ring_phases_repeat_every_slots_over_gcd_steps(streamed: int, slots: int) -> None:
    """A graph per phase covers every step: the phase sequence is periodic with slots / gcd."""
    from overspill.runtime.executor import LayerRing
    from overspill.runtime.streams import HostCopier

    ring = LayerRing([torch.empty(4) for _ in range(slots)], HostCopier())
    ring.layers = [object()] * streamed  # positions only; no layer runs
    assert ring.step_phase() is None  # not primed: the first step runs eagerly
    ring.visit, ring.issued = 0, slots  # the previous step issued this one's first `slots` copies
    phases = []
    for _ in range(2 * slots):
        phases.append(ring.step_phase())
        ring.advance()
    period = slots // math.gcd(streamed, slots)
    assert len(set(phases)) == period and phases[:period] == phases[period : 2 * period]
    ring.issued -= 1  # a step that did not issue the next one's first copies: not replayable
    assert ring.step_phase() is None


def test_one_token_prompt_and_a_reused_cache_match_transformers(tiny_checkpoint, reference) -> None:
    """A one-token prompt is a decode step at position 0: transformers would skip the mask of a
    non-compileable static cache there and attend to stale keys of the reused cache."""
    model = load_tiny(tiny_checkpoint("llama"), 4)
    enable_graphs(model, capture=False)
    ref = reference("llama")
    long = torch.randint(3, 100, (1, 30), generator=torch.Generator().manual_seed(5))
    short = long[:, :1]
    with torch.no_grad():
        model.generate(long, max_new_tokens=4, do_sample=False, pad_token_id=0)  # fills the cache with other keys
        got, got_logits = generate_with_logits(model, short)
        want, want_logits = generate_with_logits(ref, short)
    assert torch.equal(got, want)
    close(got_logits, want_logits)


@pytest.mark.parametrize("q_len", [1, 3])
def test_decode_attention_matches_sdpa_with_repeated_heads(q_len: int) -> None:
    from overspill.runtime.graphs import decode_attention

    gen = torch.Generator().manual_seed(0)
    b, heads, kv_heads, length, d = 2, 8, 2, 12, 16
    query = torch.randn(b, heads, q_len, d, generator=gen)
    key, value = (torch.randn(b, kv_heads, length, d, generator=gen) for _ in range(2))
    mask = torch.rand(b, 1, q_len, length, generator=gen) > 0.3
    mask[..., 0] = True  # every row attends somewhere
    got, weights = decode_attention(None, query, key, value, mask, scaling=0.25)
    rep = heads // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1), attn_mask=mask, scale=0.25)
    assert weights is None and got.shape == (b, q_len, heads, d)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("streamed", "slots"), [(1, 1), (2, 2), (5, 3)])
def test_a_freed_slot_gets_its_next_copy_at_once(streamed: int, slots: int) -> None:
    """The copy into a slot is issued as its previous user exits, not when the layer before its
    next user enters: with few streamed layers, every resident layer in between hides the copy."""
    from overspill.runtime.executor import LayerRing
    from overspill.runtime.streams import HostCopier

    class Recorder(HostCopier):
        def __init__(self) -> None:
            self.log: list[tuple[str, int]] = []

        def copy(self, dst, src, slot: int) -> None:
            self.log.append(("copy", slot))

        def mark_done(self, slot: int) -> None:
            self.log.append(("done", slot))

    copier = Recorder()
    ring = LayerRing([torch.empty(4) for _ in range(slots)], copier)
    ring.layers = [type("L", (), {"host": torch.empty(4)})() for _ in range(streamed)]
    for _ in range(2):  # two forward passes
        for position in range(streamed):
            ring.exit(ring.enter(position))
    log = copier.log
    for i, (kind, slot) in enumerate(log):
        if kind == "done":
            assert log[i + 1] == ("copy", slot)  # the freed slot's next copy follows at once
    assert ring.step_phase() == (2 * streamed) % slots


def test_graphed_steps_pick_their_kernels_without_touching_the_config(tiny_checkpoint, monkeypatch) -> None:
    """`enable_graphs` names routers in the config once; graphed steps then run `decode_attention` and
    `batched_mm` experts while the config stays as it is, and every other pass runs the model's own kernels."""
    from transformers.integrations.moe import ExpertsInterface

    import overspill.runtime.graphs as graphs

    model = load_tiny(tiny_checkpoint("mixtral"), 4)
    graphed = enable_graphs(model, capture=False)
    config = model.config
    names = (config._attn_implementation, config._experts_implementation)
    assert all(name.startswith("overspill_graphed_or_") for name in names)
    seen = {"attention": [], "experts": []}  # the config's names at each graph-safe kernel call
    attention, experts = graphs.decode_attention, ExpertsInterface._global_mapping["batched_mm"]

    def spy(kind, kernel):
        def call(*args, **kwargs):
            seen[kind].append((config._attn_implementation, config._experts_implementation))
            return kernel(*args, **kwargs)
        return call

    monkeypatch.setattr(graphs, "decode_attention", spy("attention", attention))
    monkeypatch.setitem(ExpertsInterface._global_mapping, "batched_mm", spy("experts", experts))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))  # a plain pass: the model's own kernels
        assert seen == {"attention": [], "experts": []}
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    steps = graphed.eager_steps  # the 4 decode steps after the prefill, through the fixed-buffer body
    assert steps == 4
    assert seen["attention"] == seen["experts"] == [names] * steps * N_LAYERS


def test_routers_reach_sub_configs() -> None:
    """A multimodal config (Llama 4) keeps its text model's kernels in `text_config`: the routers and
    `keep_grouped_experts` name them there too, and a sub-config with no kernel set stays unset."""
    from transformers import Llama4Config

    import overspill.runtime.graphs as graphs

    config = Llama4Config()
    config.text_config._attn_implementation = "sdpa"
    config.text_config._experts_implementation = "grouped_mm"
    model = torch.nn.Module()
    model.config = config
    graphs.keep_grouped_experts(model)
    assert config.text_config._experts_implementation == "overspill_graphed_or_grouped_mm"
    graphs.route_decode_kernels(model)
    graphs.route_decode_kernels(model)  # idempotent
    assert config.text_config._attn_implementation == "overspill_graphed_or_sdpa"
    assert config.text_config._experts_implementation == "overspill_graphed_or_grouped_mm"
    assert config.vision_config._attn_implementation is None
