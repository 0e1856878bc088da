"""`layout="spread"`: streamed layers spread evenly among the resident ones instead of the first ones.

The plan streams as many layers (of equal size: as many bytes) as the prefix plan; host-tier KV keeps the
prefix; the runtime is order-free, so tokens are the resident model's, for dense and expert-aware streaming.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_moe import CONTEXT, LAYERS, generate, prompts, shapes
from test_moe import checkpoint as moe_checkpoint  # noqa: F401 - fixture
from test_placement import generate_with_logits, resident_budget

import overspill
from overspill.api import placement_of
from overspill.errors import OverspillError
from overspill.planning import moe
from overspill.planning.configs import shipped_config
from overspill.planning.placement import greedy_plan, streamed_tiers, streaming_plan
from overspill.planning.plan import Tier, Workload, footprint_from_spec
from overspill.planning.spec import spec_from_config
from overspill.planning.units import parse_bytes


def test_streamed_tiers_spread_evenly_or_keep_the_prefix() -> None:
    pinned = lambda tiers: [i for i, t in enumerate(tiers) if t is Tier.PINNED]  # noqa: E731
    assert pinned(streamed_tiers(8, 3, spread=False)) == [0, 1, 2]
    assert pinned(streamed_tiers(8, 4, spread=True)) == [0, 2, 4, 6]
    assert pinned(streamed_tiers(80, 37, spread=True))[:4] == [0, 2, 4, 6] and len(pinned(streamed_tiers(80, 37, True))) == 37
    assert pinned(streamed_tiers(8, 0, spread=True)) == [] and pinned(streamed_tiers(8, 8, spread=True)) == list(range(8))


def test_a_spread_plan_streams_what_the_prefix_plan_streams() -> None:
    fp = footprint_from_spec(spec_from_config(shipped_config("llama-3-70b")))
    budget = parse_bytes("76GiB")
    prefix = greedy_plan(fp, budget, Workload(4096, 1))
    spread = greedy_plan(fp, budget, Workload(4096, 1, spread=True))
    assert len(spread.streamed_layers) == len(prefix.streamed_layers) > 0
    assert spread.streamed_layers != prefix.streamed_layers and spread.streamed_layers[0] == 0
    assert spread.streamed_bytes_per_step == prefix.streamed_bytes_per_step
    assert spread.device_bytes == prefix.device_bytes
    host_kv = streaming_plan(fp, Workload(4096, 1, spread=True), 40, kv_host=4)
    assert host_kv.streamed_layers == tuple(range(40))  # host-tier KV belongs to the leading layers


def test_load_spread_gives_the_resident_tokens(tiny_checkpoint) -> None:
    from test_placement import load_tiny

    path = tiny_checkpoint("llama")
    want = load_tiny(path, resident=4)
    single = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(5))
    model, _ = overspill.load(path, gpu_memory=resident_budget(path, 2), dtype=torch.float32, context=64,
                              depth=2, progress=False, layout="spread")
    streamed = placement_of(model).plan.streamed_layers
    assert streamed and streamed != tuple(range(len(streamed)))
    got, got_logits = generate_with_logits(model, single)
    ref, ref_logits = generate_with_logits(want, single)
    assert torch.equal(got, ref) and torch.equal(got_logits, ref_logits)


@pytest.mark.parametrize("arch, streamed", [("mixtral", 3), ("llama4_text", 4)])  # llama4: MoE every 2nd layer
def test_expert_streaming_with_spread_layers_gives_the_resident_tokens(arch, streamed, moe_checkpoint) -> None:
    path, reference = moe_checkpoint(arch)
    single, batch, mask = prompts()
    fp, layers = shapes(arch)
    base = streaming_plan(fp, Workload(CONTEXT, 2, activation_floor=0, spread=True), streamed, depth=2)
    assert base.streamed_layers == tuple((i * LAYERS) // streamed for i in range(streamed))
    plan = moe.to_experts(base, fp, layers, None)
    model, _ = overspill.load(path, plan=plan, dtype="float32", context=CONTEXT, batch=2, progress=False)
    assert model.overspill.plan.moe_streaming == "experts"
    for ids, m in ((single, None), (batch, mask)):
        assert torch.equal(generate(model, ids, m)[0], generate(reference, ids, m)[0]), arch


def test_unknown_layout_is_one_clear_error(tiny_checkpoint) -> None:
    with pytest.raises(OverspillError, match="unknown layout 'middle'"):
        overspill.load(tiny_checkpoint("llama"), gpu_memory=None, progress=False, layout="middle")


def test_plan_layout_spread_on_the_command_line() -> None:
    out = subprocess.run([sys.executable, "-m", "overspill", "plan", "llama-3-8b", "--gpu-memory", "6GiB",
                          "--profile", "h100-pcie5", "--layout", "spread", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '"layer_tiers"' in out.stdout or "pinned" in out.stdout


def test_auto_layout_spreads_only_where_drafts_are_verified():
    from overspill.planning.placement import spreads

    assert spreads("auto", "ngram") and spreads("auto", "self") and not spreads("auto", None)
    assert spreads("spread", None) and not spreads("prefix", "ngram")
    with pytest.raises(ValueError, match="unknown layout 'middle': choose one of auto, prefix, spread"):
        spreads("middle", None)
