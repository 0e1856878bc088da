"""Expert-aware streaming generates exactly what the resident model generates.

Tiny random-weight Mixtral, Qwen2-MoE, Qwen3-MoE, Llama 4 (text) and DeepSeek-V3 checkpoints are loaded
with their streamed MoE layers carrying only attention, router, norms and shared experts through the
ring, and their routed experts copied per expert into an expert cache as the router selects them.
Greedy tokens must equal plain transformers', and every step's logits (float32) too, bit for bit for
one sequence (a batch: within 1e-5, see below), for 0 and half the layers resident (all resident
streams nothing: `test_load_picks_expert_streaming_by_default`), batch 1 and a left-padded batch of 2, with the smallest cache (one layer's experts,
evicting on almost every call: cold) and a cache of every streamed expert (warm after one pass).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import overspill
from overspill.errors import OverspillError
from overspill.planning import moe
from overspill.planning.placement import streaming_plan
from overspill.planning.plan import Workload, footprint_from_spec
from overspill.runtime.experts import Llama4RoutedMoe, RoutedExperts
from overspill.runtime.loader import build_skeleton, decoder_layers, measured_spec

LAYERS = 6
VOCAB = 256
CONTEXT = 64
BASE = dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.1, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
MOE_CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, intermediate_size=96),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, intermediate_size=96,
                      head_dim=16),
    # one of every two layers MoE, 8 experts, one per token, plus the shared expert
    "llama4_text": dict(num_local_experts=8, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=96,
                        interleave_moe_layer_step=2),
    # MLA attention; the first layer dense; grouped top-k routing
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, intermediate_size=96,
                        first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_shared_experts=1,
                        num_key_value_heads=4),
}
ARCHS = sorted(MOE_CONFIGS)
GEN = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)


def config(arch: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(arch, **{**BASE, **MOE_CONFIGS[arch]})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """`checkpoint(arch) -> (path, resident model)`, built once per arch."""
    built: dict = {}

    def make(arch: str):
        if arch not in built:
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_config(config(arch), dtype=torch.float32).eval()
            path = tmp_path_factory.mktemp(f"moe-{arch}")
            model.save_pretrained(str(path))
            built[arch] = path, model
        return built[arch]

    return make


def shapes(arch: str):
    skeleton = build_skeleton(config(arch), torch.float32)
    spec = measured_spec(skeleton, decoder_layers(skeleton)[1], torch.float32)
    return footprint_from_spec(spec), moe.MoeLayers.from_spec(spec)


def experts_plan(arch: str, resident: int, warm: bool, batch: int = 2):
    """The expert-aware plan streaming the first LAYERS - resident layers, with the smallest expert cache
    (one layer's experts) or one that holds every streamed expert."""
    fp, layers = shapes(arch)
    base = streaming_plan(fp, Workload(CONTEXT, batch, activation_floor=0), LAYERS - resident, depth=2)
    plan = moe.to_experts(base, fp, layers, None)  # no budget: every streamed expert gets a slot
    if not warm:
        plan = replace(plan, expert_slots=moe.min_cache_slots(layers, plan.streamed_layers))
    return plan


def prompts():
    g = torch.Generator().manual_seed(1234)
    single = torch.randint(3, VOCAB, (1, 12), generator=g)
    batch = torch.randint(3, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(batch)
    batch[0, :3], mask[0, :3] = 0, 0
    return single, batch, mask


def generate(model, ids, mask=None):
    """Greedy tokens and every step's logits, each model with the cache its `generate` makes (an
    overspill model: the plan's presized cache, DeepSeek-V3's MLA latents included)."""
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True, **GEN)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("resident", [0, 1, LAYERS // 2, LAYERS - 1, LAYERS])
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_streaming_matches_resident(arch: str, resident: int, warm: bool, checkpoint) -> None:
    """Budgets from no layer resident to all (issue 17's must-show). Where no routed expert streams (every
    layer resident, or only DeepSeek-V3's dense first layers streamed) the plan streams whole layers."""
    path, reference = checkpoint(arch)
    fp, layers = shapes(arch)
    single, batch, mask = prompts()
    if not any(layers.num_experts[i] for i in range(LAYERS - resident)):
        plan = streaming_plan(fp, Workload(CONTEXT, 2, activation_floor=0), LAYERS - resident, depth=2)
        model, _ = overspill.load(path, plan=plan, dtype="float32", context=CONTEXT, batch=2, progress=False)
        for ids, m in ((single, None), (batch, mask)):
            assert torch.equal(generate(model, ids, m)[0], generate(reference, ids, m)[0]), (arch, resident)
        return
    plan = experts_plan(arch, resident, warm)
    model, _ = overspill.load(path, plan=plan, dtype="float32", context=CONTEXT, batch=2, progress=False)
    placed = model.overspill
    assert placed.plan.moe_streaming == "experts" and placed.experts.slots == plan.expert_slots
    wrapped = [m for m in model.modules() if isinstance(m, (RoutedExperts, Llama4RoutedMoe))]
    streamed = [m for m in wrapped if m.cache is not None]
    assert len(streamed) == sum(1 for i in plan.streamed_layers if layers.num_experts[i])
    resident_moe = sum(1 for i in range(LAYERS) if i not in plan.streamed_layers and layers.num_experts[i])
    # resident Llama 4 MoE blocks compute only their selected experts too; other experts modules do already
    assert len(wrapped) - len(streamed) == (resident_moe if arch == "llama4_text" else 0)
    placed.experts.reset_stats()
    for ids, m in ((single, None), (batch, mask)):
        want, want_logits = generate(reference, ids, m)
        got, got_logits = generate(model, ids, m)
        assert torch.equal(got, want), (arch, resident, warm)
        # One sequence: bit-identical. A batch: an expert's rows can meet its weights in another order
        # (transformers' grouped_mm sorts (token, expert) pairs with an unstable sort, and the cache slot
        # numbers it sorts by differ from expert numbers), which moves float32 sums by an ulp or so.
        tol = 0 if m is None else 1e-5
        torch.testing.assert_close(got_logits, want_logits, rtol=tol, atol=tol)
    assert placed.experts.misses > 0  # experts crossed the link (the cache starts empty, warm or cold)
    placed.experts.reset_stats()
    generate(model, single)
    if warm:  # every streamed expert has a slot and has been fetched by now: nothing crosses again
        assert placed.experts.misses == 0 and placed.experts.hits > 0
    elif sum(1 for i in plan.streamed_layers if shapes(arch)[1].num_experts[i]) > 1:
        assert placed.experts.misses > 0  # one layer's worth of slots for several layers' experts: they churn


def test_resident_llama4_moe_reads_only_selected_experts(checkpoint, monkeypatch) -> None:
    """A resident Llama 4 MoE block under expert streaming gives transformers' sums bit for bit while
    multiplying only the experts some token selected (transformers' module multiplies all of them), up to
    RESIDENT_ROUTED_PAIRS (token, expert) pairs; more run the module itself."""
    from overspill.runtime.experts import RESIDENT_ROUTED_PAIRS, route_resident

    _, reference = checkpoint("llama4_text")
    layer = next(layer for layer in reference.model.layers if type(layer.feed_forward).__name__ == "Llama4TextMoe")
    moe_block = layer.feed_forward
    wrapper = torch.nn.Module()
    wrapper.feed_forward = moe_block
    route_resident(wrapper, 0)
    routed = wrapper.feed_forward
    assert isinstance(routed, Llama4RoutedMoe) and routed.cache is None
    experts = moe_block.num_experts
    for tokens in (1, 3, RESIDENT_ROUTED_PAIRS + 1):
        x = torch.randn(1, tokens, BASE["hidden_size"], generator=torch.Generator().manual_seed(tokens))
        want, want_logits = moe_block(x)
        scores, _ = moe_block.router(x.reshape(-1, BASE["hidden_size"]))
        selected = int(((scores != 0).sum(dim=0) > 0).sum())
        bmm, calls = torch.bmm, []
        monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(b.shape) or bmm(a, b))
        got, got_logits = routed(x)
        monkeypatch.setattr(torch, "bmm", bmm)
        assert torch.equal(got, want) and torch.equal(got_logits, want_logits)
        if tokens * moe_block.top_k <= RESIDENT_ROUTED_PAIRS:
            assert selected < experts and len(calls) == 2 * selected  # gate_up and down of each selected expert
        else:  # transformers' own module: one bmm over every expert each
            assert [shape[0] for shape in calls] == [experts, experts]


@pytest.mark.parametrize("arch", ["mixtral", "llama4_text"])
def test_load_picks_expert_streaming_by_default(arch: str, checkpoint) -> None:
    """`auto` streams experts where fewer bytes cross per step; `dense` keeps whole layers; all
    layers resident streams nothing either way; and the tokens stay the reference's."""
    path, reference = checkpoint(arch)
    single, _, _ = prompts()
    want = reference.generate(single, **GEN)
    budget = experts_plan(arch, 0, warm=False, batch=1).device_bytes
    for mode, expected in (("auto", "experts"), ("dense", "dense")):
        try:
            model, _ = overspill.load(path, gpu_memory=budget, dtype="float32", context=CONTEXT, progress=False,
                                      moe_streaming=mode)
        except OverspillError:  # whole layers may not fit the expert-aware plan's budget
            assert mode == "dense"
            continue
        assert model.overspill.plan.moe_streaming == expected
        assert torch.equal(model.generate(single, **GEN), want)
    model, _ = overspill.load(path, gpu_memory=None, dtype="float32", context=CONTEXT, progress=False)
    assert not model.overspill.plan.streamed_layers and model.overspill.experts is None


def test_expert_streaming_refusals(checkpoint) -> None:
    path, _ = checkpoint("mixtral")
    budget = experts_plan("mixtral", 0, warm=False, batch=1).device_bytes * 2
    kwargs = dict(gpu_memory=budget, dtype="float32", context=CONTEXT, progress=False)
    with pytest.raises(OverspillError, match="moe_streaming must be one of"):
        overspill.load(path, moe_streaming="sparse", **kwargs)
    with pytest.raises(OverspillError, match="does not combine with stream format int8"):
        overspill.load(path, moe_streaming="experts", stream_format="int8", **kwargs)
    model, _ = overspill.load(path, stream_format="int8", **kwargs)
    plan = model.overspill.plan
    assert plan.moe_streaming == "dense" and any("stream format int8" in n for n in plan.notes)


def test_caller_plan_with_experts_refuses_what_it_cannot_combine_with(checkpoint) -> None:
    path, _ = checkpoint("mixtral")
    with pytest.raises(OverspillError, match="does not combine with speculative decoding"):
        overspill.load(path, plan=experts_plan("mixtral", 0, warm=False), dtype="float32", context=CONTEXT,
                       progress=False, speculate="self")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_eager_experts_loop_matches_resident_bit_for_bit(arch: str, checkpoint) -> None:
    """transformers' eager experts loop (the default where grouped_mm is not) adds each expert's rows in
    expert-index order: the per-expert path over cache slots gives the same sums without copying experts."""
    path, reference = checkpoint(arch)
    model, _ = overspill.load(path, plan=experts_plan(arch, 0, False), dtype="float32", context=CONTEXT, batch=2,
                              progress=False)
    calls = []
    original = RoutedExperts._expert_by_expert

    def counted(self, *args):
        calls.append(self.layer)
        return original(self, *args)

    saved = reference.config._experts_implementation
    reference.config._experts_implementation = model.config._experts_implementation = "eager"
    try:
        RoutedExperts._expert_by_expert = counted
        single, batch, mask = prompts()
        for ids, m in ((single, None), (batch, mask)):
            want, want_logits = generate(reference, ids, m)
            got, got_logits = generate(model, ids, m)
            assert torch.equal(got, want), arch
            # One sequence: bit-identical. A padded batch moves float32 logits by an ulp even with every
            # layer resident (measured: 4.8e-7, outside the experts), so it gets the same bound as above.
            tol = 0 if m is None else 1e-5
            torch.testing.assert_close(got_logits, want_logits, rtol=tol, atol=tol)
    finally:
        RoutedExperts._expert_by_expert = original
        reference.config._experts_implementation = saved
    assert calls, "the eager path ran"


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_generate_decodes_with_grouped_mm_not_batched_mm(arch: str, checkpoint, monkeypatch) -> None:
    """On a GPU transformers' generate renames "grouped_mm" to "batched_mm" for decoding, and batched_mm
    gathers every routed (token, expert) pair's weights: on an H100 Mixtral-8x7B at 24 GiB peaked 0.54 GiB
    past its plan in those copies. A loaded model gives that switch no "grouped_mm" to rename, and its
    eager passes (prefill and decode) run grouped_mm."""
    from transformers.integrations.moe import ExpertsInterface

    path, reference = checkpoint(arch)
    model, _ = overspill.load(path, plan=experts_plan(arch, 0, False), dtype="float32", context=CONTEXT, batch=2,
                              progress=False)
    assert "grouped_mm" not in model.get_experts_implementation().values()  # what generate's switch looks for
    single, _, _ = prompts()
    want = generate(reference, single)[0]
    calls = []
    for name in ("grouped_mm", "batched_mm"):
        fn = ExpertsInterface._global_mapping[name]
        monkeypatch.setitem(ExpertsInterface._global_mapping, name,
                            lambda *a, _name=name, _fn=fn, **k: calls.append(_name) or _fn(*a, **k))
    got, _ = generate(model, single)
    assert torch.equal(got, want)
    assert calls and set(calls) == {"grouped_mm"}


def test_speculate_auto_keeps_the_prefix_where_experts_stream(checkpoint) -> None:
    # speculate='auto' drafts nothing for expert-streamed layers (`auto_source`), so layout 'auto' does not spread
    # them; speculate='ngram' with dense streaming does.
    path, _ = checkpoint("mixtral")
    budget = experts_plan("mixtral", 0, warm=False, batch=1).device_bytes * 2
    kwargs = dict(gpu_memory=budget, dtype="float32", context=CONTEXT, progress=False)
    plan = overspill.load(path, speculate="auto", moe_streaming="experts", **kwargs)[0].overspill.plan
    first = list(range(len(plan.streamed_layers)))
    assert plan.moe_streaming == "experts" and plan.streamed_layers and list(plan.streamed_layers) == first
    assert not plan.workload.spread
