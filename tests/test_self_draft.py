"""The `self` draft source: int4 matmuls close to float ones, a draft whose structure is the target's,
greedy output identical to plain for every tiny architecture (resident, streamed, host-tier KV), a cache
that resyncs after rejections, and the planner's arithmetic."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import overspill
from overspill.planning.plan import Footprint, Workload
from overspill.planning.self_draft import (
    Machine,
    draft_token_seconds,
    int4_bytes,
    pass_seconds,
    plan_self_draft,
    prior_acceptance,
    self_draft_bytes,
    spread_layers,
)
from overspill.planning.placement import place, streaming_plan
from overspill.planning.speculation import PassCost, best_chain, forecast
from overspill.runtime import speculative
from overspill.runtime.loader import decoder_layers
from overspill.runtime.self_draft import (
    SelfDrafter,
    build_self_draft,
    draft_device_bytes,
    int4_matmul,
    make_self_drafter,
    quantizable,
    quantize_int4,
)

from conftest import ARCHS, VOCAB, hf_config

NEW = 24
GEN = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
CPU = torch.device("cpu")


def _prompt(seed: int = 0, length: int = 18) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32).eval()


def _dequantized(weight: torch.Tensor, group: int) -> torch.Tensor:
    """What the int4 kernel multiplies by: the product with the identity, [out, in]."""
    packed, scales_zeros = quantize_int4(weight, group, CPU)
    eye = torch.eye(weight.shape[1], dtype=weight.dtype)
    return int4_matmul(eye, packed, scales_zeros, group, weight.shape[0]).t().contiguous()


def _snap_to_int4(model: torch.nn.Module) -> None:
    """Round the model's quantizable weights to the int4 grid, so the draft's codes reproduce them."""
    _, layers = decoder_layers(model)
    with torch.no_grad():
        for module in layers.modules():
            if isinstance(module, torch.nn.Linear) and quantizable(tuple(module.weight.shape), 32):
                module.weight.copy_(_dequantized(module.weight, 32))
            for name in ("gate_up_proj", "down_proj"):
                p = module._parameters.get(name)
                if isinstance(p, torch.Tensor) and p.dim() == 3:
                    for e in range(p.shape[0]):
                        p[e].copy_(_dequantized(p[e], 32))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_matmul_is_the_groupwise_dequantized_product(group) -> None:
    # The kernel multiplies by (q - 8) * scale + zero, each group's scale spanning its min..max in 15
    # steps: the product is within bf16 rounding of that, and the weight within half a step of its own.
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    x = torch.randn(5, 256)
    packed, scales_zeros = quantize_int4(w, group, CPU)
    y = int4_matmul(x, packed, scales_zeros, group, 96)
    scale, zero = scales_zeros[..., 0].float().t(), scales_zeros[..., 1].float().t()  # [out, in / group]
    groups = w.reshape(96, 256 // group, group)
    codes = ((groups - (zero - 8 * scale)[..., None]) / scale[..., None]).round().clamp(0, 15)
    deq = ((codes - 8) * scale[..., None] + zero[..., None]).reshape(96, 256)
    assert (deq - w).abs().max() <= 0.5 * scale.max() * 1.01  # rounding to the nearest of 16 levels
    torch.testing.assert_close(y, x @ deq.t(), rtol=0.02, atol=0.05 * (x @ deq.t()).abs().max().item())
    rel = (y - x @ w.t()).norm() / (x @ w.t()).norm()
    assert rel < 0.02 * group**0.5  # 4 bits on a gaussian: ~9% of a group's spread per weight, less summed
    assert y.dtype == x.dtype and y.shape == (5, 96)


def test_only_kernel_shapes_are_quantized() -> None:
    assert quantizable((64, 96), 128)  # 96 inputs: groups of 32
    assert not quantizable((4, 64), 128)  # a 4-expert router: 4 outputs, not a multiple of 8
    assert not quantizable((64, 48), 128)  # 48 inputs: no group size of 32 or more divides it
    # 24 outputs (one KV head group of 24): the CUDA packer takes multiples of 8, the CPU's of 16 only
    assert quantizable((24, 96), 32, "cuda") and not quantizable((24, 96), 32, "cpu")


def test_a_cpu_draft_keeps_rows_its_packer_refuses(tmp_path) -> None:
    """A k_proj of 24 rows stays in the compute dtype in a CPU draft (the CPU int4 packer raised a raw
    RuntimeError for it), and the drafted model decodes as plain greedy."""
    config = AutoConfig.for_model("llama", hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, intermediate_size=128, vocab_size=256,
                                  max_position_embeddings=128)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    reference.save_pretrained(str(tmp_path))
    model, _ = overspill.load(str(tmp_path), dtype="float32", context=64, speculate="self", progress=False)
    ids = torch.tensor([[5, 6, 7, 8] * 3])
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **gen), reference.generate(ids, **gen))


@pytest.mark.parametrize("arch", ARCHS)
def test_draft_on_the_int4_grid_is_the_target(arch) -> None:
    # A target whose weights already sit on the int4 grid: the draft (shared embedding, norm, head,
    # rotary table; every layer int4; its own layer indices into its own cache) computes the target's
    # logits up to bf16 activations, and its greedy drafts are nearly all accepted.
    model = _tiny(arch)
    _snap_to_int4(model)
    ids = _prompt(1, 30)
    draft = build_self_draft(model, group=32)
    with torch.no_grad():
        want, got = model(ids).logits[0], draft(ids).logits[0]
    assert (got - want).norm() / want.norm() < 0.06
    plain = model.generate(ids, **GEN)
    speculative.enable(model, SelfDrafter(draft, VOCAB), chain=6)
    assert torch.equal(model.generate(ids, **GEN), plain)
    stats = model.speculation_stats
    assert stats.accepted >= 0.65 * stats.drafted and stats.tokens_per_pass > 3, stats


@pytest.mark.parametrize("layers", [None, (0, 3, 7)])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_plain_resident(arch, layers) -> None:
    model = _tiny(arch)
    ids = _prompt()
    want = model.generate(ids, **GEN)
    speculative.enable(model, make_self_drafter(model, layers), chain=6)
    got = model.generate(ids, **GEN)
    assert torch.equal(got, want)
    assert model.speculation_stats.emitted == NEW and model.speculation_stats.drafted > 0


@pytest.mark.parametrize("kv_host", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_greedy_equals_plain_streamed(arch, kv_host, tiny_checkpoint) -> None:
    # Streamed layers are quantized from their flat host buffers (their parameters point at a ring
    # slot only while they compute): the draft is the one built from the resident reference, and the
    # target's verify passes and crops go through the ring and the host-tier KV as before.
    from test_placement import load_tiny

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch), dtype=torch.float32).eval()
    ids = _prompt(3)
    want = reference.generate(ids, **GEN)
    extra = {"kv_gpu_memory": "96KiB"} if kv_host else {}
    model = load_tiny(tiny_checkpoint(arch), resident=3, **extra)
    plan = overspill.api.placement_of(model).plan
    assert plan.streamed_layers and bool(plan.kv_host_layers) == kv_host
    drafter = make_self_drafter(model)
    with torch.no_grad():
        torch.testing.assert_close(drafter.model(ids).logits, build_self_draft(reference)(ids).logits)
    speculative.enable(model, drafter, chain=5)
    assert torch.equal(model.generate(ids, **GEN), want)
    assert model.speculation_stats.drafted > 0


def test_drafter_resyncs_its_cache_after_a_rejection() -> None:
    model = _tiny("llama")
    drafter = make_self_drafter(model)
    ids = _prompt(7)
    first = drafter.propose(ids, 4).tokens
    fed = drafter.fed
    # the target kept two drafts and chose its own third token: only that token is fed again
    other = (int(first[2]) + 1) % VOCAB
    longer = torch.cat([ids, first[:2].view(1, 2), torch.tensor([[other]])], dim=1)
    again = drafter.propose(longer, 3).tokens
    assert drafter.fed - fed == 3  # the new token, then one per further draft; no prompt recomputed
    assert torch.equal(again, make_self_drafter(model).propose(longer, 3).tokens)  # as from a fresh cache


def test_sampling_drafts_return_their_distribution() -> None:
    model = _tiny("qwen2")
    torch.manual_seed(0)
    draft = make_self_drafter(model).propose(_prompt(2), 5, sample=True)
    assert draft.tokens.shape == (5,) and draft.probs.shape == (5, VOCAB)
    torch.testing.assert_close(draft.probs.sum(-1), torch.ones(5))
    assert (draft.probs[torch.arange(5), draft.tokens] > 0).all()


def test_planned_bytes_cover_the_built_draft() -> None:
    # The planner counts every layer parameter as int4 (norms and odd shapes are in fact kept dense);
    # on a real model's widths that is within a few percent of what the draft holds.
    from overspill.runtime.loader import footprint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoConfig

        config = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=1024)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    fp = footprint(model, decoder_layers(model)[1], torch.bfloat16)
    planned, _ = self_draft_bytes(fp, (0, 1, 2, 3), Workload(context=64))
    built = draft_device_bytes(build_self_draft(model))
    assert 0.97 * built <= planned <= 1.03 * built, (planned, built)


# --- planning (no torch in the arithmetic) ---------------------------------------------------------

MB = 2**20


def _fp(n: int = 16, layer: int = 100 * MB) -> Footprint:
    return Footprint(layer_bytes=(layer,) * n, embed_bytes=20 * MB, head_bytes=20 * MB, other_bytes=MB,
                     tied_embeddings=False, kv_bytes_per_token=n * 8192, activation_bytes_per_token=4096)


def test_int4_bytes_and_spread_layers() -> None:
    assert int4_bytes(1024, 128) == 512 + 8 * 4  # half a byte a weight, a bf16 scale and zero per group
    assert int4_bytes(1000, 128) == 500 + 8 * 4  # a partial group still has its pair
    assert spread_layers(16, 16) == tuple(range(16))
    assert spread_layers(16, 8) == (0, 2, 4, 6, 9, 11, 13, 15)  # first and last kept, evenly between
    assert spread_layers(30, 1) == (29,)
    with pytest.raises(ValueError):
        spread_layers(4, 5)


def test_draft_bytes_and_kv() -> None:
    fp = _fp()
    weights, kv = self_draft_bytes(fp, (0, 5, 15), Workload(context=1000))
    assert weights == 3 * int4_bytes(50 * MB)  # 100 MB of bf16 is 50 M weights
    assert kv == 3 * 8192 * 1000  # three layers' KV for one sequence of the workload's context


def test_no_budget_keeps_everything_resident_and_picks_the_fastest_share() -> None:
    fp, w = _fp(), Workload(context=512, activation_floor=0)
    draft, plan = plan_self_draft(fp, None, w)
    assert not plan.streamed_layers and draft.resident_lost == 0
    machine = Machine()
    speeds = {}
    for count in (16, 8, 4):
        layers = spread_layers(16, count)
        weights, _ = self_draft_bytes(fp, layers, w)
        cost = PassCost(base_s=pass_seconds(fp, place(fp, None, w), machine),
                        draft_per_token_s=draft_token_seconds(fp, weights, count, machine))
        a = prior_acceptance(count / 16)
        speeds[count] = forecast(cost, a, best_chain(cost, a, 16)).tok_s
    assert len(draft.layers) == max(speeds, key=speeds.get)
    assert plan.device_weight_bytes == place(fp, None, w).device_weight_bytes + draft.weight_bytes


def test_the_draft_takes_its_bytes_from_resident_layers() -> None:
    # Budget for all 16 layers resident: a 16-layer int4 draft (~25 MB a layer, + KV) pushes layers onto
    # the link; the plan stays inside the budget with the draft counted, and says what it cost.
    fp, w = _fp(), Workload(context=512, activation_floor=0)
    budget = place(fp, None, w).device_bytes
    draft, plan = plan_self_draft(fp, budget, w, shares=(1.0,))
    plain = place(fp, budget, w)
    assert len(plain.resident_layers) == 16
    assert draft.resident_lost == 16 - len(plan.resident_layers) > 0
    assert plan.device_bytes <= budget and plan.budget_bytes == budget
    assert plan.device_bytes == place(fp, budget - draft.device_bytes, w).device_bytes + draft.device_bytes
    assert any("self draft: 16 of 16 layers" in note for note in plan.notes)
    # a quarter of the layers costs fewer resident layers
    quarter = plan_self_draft(fp, budget, w, shares=(0.25,))[0]
    assert len(quarter.layers) == 4 and 0 < quarter.resident_lost < draft.resident_lost


def test_a_budget_with_no_room_for_a_draft_is_one_clear_error() -> None:
    fp, w = _fp(), Workload(context=512, activation_floor=0)
    # the model fits streaming every layer, but not with even a 4-layer draft (~100 MiB) beside it
    minimum = streaming_plan(fp, w, 16).device_bytes
    place(fp, minimum + 10 * MB, w)
    with pytest.raises(overspill.OverspillError, match="no room for a self draft"):
        plan_self_draft(fp, minimum + 10 * MB, w)


def test_load_speculate_self_counts_the_draft_in_the_plan(tiny_checkpoint) -> None:
    # `load(..., speculate="self")`: the plan holds the draft's bytes inside the same budget (fewer bf16
    # layers resident than plain under it) and generate decodes speculatively, exactly as plain.
    from test_placement import load_tiny

    path = tiny_checkpoint("llama")
    plain = load_tiny(path, resident=4)
    ids = _prompt(4)
    want = plain.generate(ids, **GEN)
    model = load_tiny(path, resident=4, speculate="self")
    plan, before = overspill.api.placement_of(model).plan, overspill.api.placement_of(plain).plan
    assert model.self_draft is not None and model.speculation_source == "self"
    assert plan.device_bytes <= before.budget_bytes == plan.budget_bytes
    assert len(plan.resident_layers) == len(before.resident_layers) - model.self_draft.resident_lost
    assert torch.equal(model.generate(ids, **GEN), want)
    assert model.speculation_stats.drafted > 0


@pytest.mark.gpu
def test_cuda_int4_kernel_matches_the_cpu_one() -> None:
    # The same codes, packed for each device's kernel: products agree to bf16 accumulation, and a tiny
    # model on the GPU drafts for itself with greedy output unchanged.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    w, x = torch.randn(256, 512), torch.randn(3, 512)
    for group in (32, 128):
        cpu = int4_matmul(x, *quantize_int4(w, group, CPU), group, 256)
        gpu = int4_matmul(x.to(dev), *quantize_int4(w.to(dev), group, dev), group, 256)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0.02, atol=0.02 * cpu.abs().max().item())
    model = _tiny("llama").to(dev)
    ids = _prompt().to(dev)
    want = model.generate(ids, **GEN)
    speculative.enable(model, make_self_drafter(model), chain=6)
    assert torch.equal(model.generate(ids, **GEN), want)
    assert model.speculation_stats.drafted > 0
