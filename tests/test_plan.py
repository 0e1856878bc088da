"""Scenario tests of the pure planner on synthetic footprints (no model, no torch)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from overspill.errors import OverspillError
from overspill.planning.placement import (
    RUNTIME_SLACK_BYTES,
    at_least,
    budget_for,
    greedy_plan,
    streaming_plan,
    with_prediction,
    workspace_bytes,
)
from overspill.planning.plan import (
    DEFAULT_DEPTH,
    Footprint,
    Plan,
    Tier,
    Workload,
)
from overspill.planning.profile import REFERENCE_PROFILES
from overspill.planning.units import format_bytes

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
N = 32
LAYER = 436_207_616  # Llama-3-8B decoder layer in bf16 (218M parameters)
EMBED = 1_050_673_152  # 128256 x 4096 x 2 bytes
LLAMA3_8B = Footprint(
    layer_bytes=(LAYER,) * N,
    embed_bytes=EMBED,
    head_bytes=EMBED,
    other_bytes=8192,
    tied_embeddings=False,
    kv_bytes_per_token=131072,
    activation_bytes_per_token=(4 * 4096 + 3 * 14336) * 2,
)
TIED = dataclasses.replace(LLAMA3_8B, head_bytes=0, tied_embeddings=True)
WORKLOAD = Workload()  # 4096 tokens, batch 1, 128 MiB activation floor
WS = workspace_bytes(LLAMA3_8B, WORKLOAD)
FULL = EMBED + EMBED + 8192 + N * LAYER + WS  # every byte resident


def test_workspace_is_kv_plus_activations_plus_attention_transients() -> None:
    # 4096 tokens x 128 KiB of KV = 512 MiB, plus 2048 tokens of activations (above the 128 MiB floor),
    # plus one layer's attention transients during a 2048-token prefill chunk: the KV expanded for GQA
    # (4 heads per KV head here: 4 x 16 MiB) and the mask of 2048 x 4096 entries, boolean and bf16,
    # plus the fixed slack for unnamed temporaries.
    layer_kv = 131072 * 4096 // 32
    gqa = dataclasses.replace(LLAMA3_8B, gqa_group=4)
    transient = 4 * layer_kv + 2048 * 4096 * 3 + RUNTIME_SLACK_BYTES
    assert workspace_bytes(gqa, WORKLOAD) == 131072 * 4096 + (4 * 4096 + 3 * 14336) * 2 * 2048 + transient
    # The floor applies when activations are small; the CPU path sets it to zero.
    tiny = dataclasses.replace(LLAMA3_8B, activation_bytes_per_token=1)
    assert workspace_bytes(tiny, Workload(16, 1)) == 131072 * 16 + 128 * 2**20
    small_transient = 131072 * 16 * 2 // 32 + 16 * 16 * 2 * 3  # gqa_group 1: the layer's KV once, boolean + bf16 mask
    assert workspace_bytes(tiny, Workload(16, 2, activation_floor=0)) == 2 * (131072 * 16 + 16) + small_transient


def test_long_contexts_reserve_room_for_attention_transients() -> None:
    """At 128k tokens the transients of one layer are GiBs: the plan must not count on that memory."""
    gqa = dataclasses.replace(LLAMA3_8B, gqa_group=4)
    long = Workload(131072, 1)
    layer_kv = 131072 * 131072 // 32  # 512 MiB
    assert workspace_bytes(gqa, long) - workspace_bytes(dataclasses.replace(gqa, gqa_group=0), long) == 4 * layer_kv
    assert workspace_bytes(gqa, long) >= 131072 * 131072 + 5 * layer_kv + 2048 * 131072 * 2


def test_no_budget_keeps_everything_resident() -> None:
    plan = greedy_plan(LLAMA3_8B, None, WORKLOAD)
    assert plan.resident_layers == tuple(range(N)) and plan.streamed_layers == ()
    assert plan.embed_tier is Tier.DEVICE and plan.head_tier is Tier.DEVICE
    assert plan.slots == 0 and plan.depth == 0 and plan.streamed_bytes_per_step == 0
    assert plan.budget_bytes is None and plan.device_bytes == FULL


def test_big_budget_keeps_everything_resident() -> None:
    # 80 GB is plenty; the exact total is the tightest budget that still keeps embeddings on the device.
    for budget in (80 * 10**9, FULL):
        plan = greedy_plan(LLAMA3_8B, budget, WORKLOAD)
        assert plan.streamed_layers == () and plan.embed_tier is Tier.DEVICE
        assert plan.device_bytes == FULL <= budget


def test_one_byte_short_moves_embeddings_to_host_first() -> None:
    # The input embedding is a row lookup: moving it costs nothing on the link, so it goes before any layer.
    plan = greedy_plan(LLAMA3_8B, FULL - 1, WORKLOAD)
    assert plan.embed_tier is Tier.HOST and plan.head_tier is Tier.DEVICE
    assert plan.streamed_layers == () and plan.slots == 0
    assert plan.device_bytes == FULL - EMBED


def test_medium_budget_streams_the_first_layers() -> None:
    budget = 8 * GiB
    plan = greedy_plan(LLAMA3_8B, budget, WORKLOAD)
    resident, streamed = plan.resident_layers, plan.streamed_layers
    # Some of each; the resident ones are the *last* layers, the streamed ones the first.
    assert 0 < len(resident) < N
    assert resident == tuple(range(N - len(resident), N))
    assert streamed == tuple(range(N - len(resident)))
    assert all(plan.layer_tiers[i] is Tier.PINNED for i in streamed)
    assert plan.embed_tier is Tier.HOST
    # The ring: one slot computing plus `depth` being filled, each as big as a layer.
    assert plan.depth == DEFAULT_DEPTH and plan.slots == DEFAULT_DEPTH + 1 and plan.slot_bytes == LAYER
    assert plan.streamed_bytes_per_step == len(streamed) * LAYER
    assert plan.device_weight_bytes == EMBED + 8192 + len(resident) * LAYER  # lm_head + other + resident
    # It fits, and greedily: one more resident layer would not.
    assert plan.device_bytes <= budget < plan.device_bytes + LAYER
    # 8 GiB - 1 GB head - 744 MiB workspace - 3 slots leaves room for 12 layers of 416 MiB.
    assert len(resident) == 12


def test_deeper_prefetch_reserves_more_slots() -> None:
    shallow = greedy_plan(LLAMA3_8B, 8 * GiB, WORKLOAD, depth=1)
    deep = greedy_plan(LLAMA3_8B, 8 * GiB, WORKLOAD, depth=4)
    assert (shallow.slots, deep.slots) == (2, 5)
    # Each extra slot costs one resident layer (all layers are the same size).
    assert len(shallow.resident_layers) - len(deep.resident_layers) == 3
    with pytest.raises(OverspillError, match="depth"):
        greedy_plan(LLAMA3_8B, 8 * GiB, WORKLOAD, depth=0)


def test_tied_embeddings_stay_on_device() -> None:
    # A tied table is also the LM head, which runs on the device every step.
    plan = greedy_plan(TIED, 8 * GiB, WORKLOAD)
    assert plan.embed_tier is Tier.DEVICE and plan.streamed_layers
    assert plan.device_weight_bytes == EMBED + 8192 + len(plan.resident_layers) * LAYER
    assert plan.device_bytes <= 8 * GiB


def test_scaled_embedding_stays_on_device() -> None:
    # An embedding module that is not a plain lookup (e.g. Gemma's scaled one) cannot move to the host.
    fp = dataclasses.replace(LLAMA3_8B, host_embedding_ok=False)
    assert greedy_plan(fp, FULL - 1, WORKLOAD).embed_tier is Tier.DEVICE
    assert greedy_plan(fp, 8 * GiB, WORKLOAD).embed_tier is Tier.DEVICE


def test_budget_below_minimum_names_the_minimum() -> None:
    # Minimum: lm_head + small tensors + workspace + 3 ring slots.
    streamed_all = EMBED + 8192 + WS + 3 * LAYER
    # One byte below "every layer streams, all KV on the device", leading layers' KV moves to host.
    plan = greedy_plan(LLAMA3_8B, streamed_all - 1, WORKLOAD)
    assert plan.resident_layers == () and len(plan.kv_host_layers) >= DEFAULT_DEPTH + 2
    assert plan.device_bytes <= streamed_all - 1
    # The true minimum: every layer streams and every layer's KV is in host memory (3 staging slots).
    kv_layer = 131072 * 4096 // N
    minimum = streamed_all - N * kv_layer + 3 * kv_layer
    with pytest.raises(OverspillError) as err:
        greedy_plan(LLAMA3_8B, minimum - 1, WORKLOAD)
    msg = str(err.value)
    assert f"minimum working set of {at_least(minimum)}" in msg and "\n" not in msg
    assert f"--gpu-memory to at least {at_least(minimum)} or lower --context" in msg  # says what to do about it
    # At one token of context lowering it cannot help: the message does not offer it, and says "1 token"
    with pytest.raises(OverspillError) as err:
        greedy_plan(LLAMA3_8B, EMBED, Workload(context=1, batch=1))
    assert "--context" not in str(err.value) and "for 1 token x batch 1" in str(err.value)
    plan = greedy_plan(LLAMA3_8B, minimum, WORKLOAD)
    assert plan.resident_layers == () and plan.kv_host_layers == tuple(range(N)) and plan.device_bytes == minimum
    # With exactly the all-streamed budget the KV stays on the device.
    assert greedy_plan(LLAMA3_8B, streamed_all, WORKLOAD).kv_host_layers == ()
    # A shorter context lowers the need: 1024 tokens shrink the KV + activation reserve by 488 MiB,
    # enough for one resident layer with all KV on the device.
    short = greedy_plan(LLAMA3_8B, streamed_all - 1, Workload(context=1024))
    assert short.resident_layers == (N - 1,) and short.kv_host_layers == ()


# With `depth + 1` slots reserved, keeping k layers resident only saves memory while
# k + depth + 1 < N; for larger k every layer fits anyway. Reachable k: 0 .. N - depth - 2, and N.
@pytest.mark.parametrize("depth", [1, DEFAULT_DEPTH, 4])
def test_budget_for_gives_exactly_k_resident(depth: int) -> None:
    for k in [*range(0, N - depth - 1), N]:
        budget = budget_for(LLAMA3_8B, WORKLOAD, k, depth)
        plan = greedy_plan(LLAMA3_8B, budget, WORKLOAD, depth)
        assert len(plan.resident_layers) == k, (k, depth)
        assert plan.device_bytes <= budget
        # It is the smallest such budget: one byte less loses a layer (or, at k=0, moves KV to host).
        if k == 0:
            assert greedy_plan(LLAMA3_8B, budget - 1, WORKLOAD, depth).kv_host_layers
        elif k < N:
            assert len(greedy_plan(LLAMA3_8B, budget - 1, WORKLOAD, depth).resident_layers) == k - 1


def test_budget_for_tied_and_cpu_workload() -> None:
    cpu = Workload(64, 1, activation_floor=0)
    for fp in (TIED, LLAMA3_8B):
        for k in (0, 7, 20, N):
            assert len(greedy_plan(fp, budget_for(fp, cpu, k), cpu).resident_layers) == k


def test_budget_for_with_uneven_layers() -> None:
    # Eight small layers and a bigger last one (e.g. a dense/MoE mix); k=1 keeps the big one resident.
    fp = dataclasses.replace(LLAMA3_8B, layer_bytes=(100,) * 7 + (200,), embed_bytes=10, head_bytes=10,
                             other_bytes=0, kv_bytes_per_token=0, activation_bytes_per_token=0)
    cpu = Workload(1, 1, activation_floor=0)
    budget = budget_for(fp, cpu, 1)  # 10 (head) + 200 (last layer) + 3 x 100 (slots)
    assert len(greedy_plan(fp, budget, cpu).resident_layers) == 1


def test_budget_for_rejects_counts_greedy_never_picks() -> None:
    # Keeping 30 of 32 resident would stream 2 layers through 2 slots: as costly as keeping them.
    with pytest.raises(ValueError):
        budget_for(LLAMA3_8B, WORKLOAD, N - 2)


def test_streaming_plan_streams_exactly_the_first_layers() -> None:
    plan = streaming_plan(LLAMA3_8B, WORKLOAD, 2)
    assert plan.streamed_layers == (0, 1) and plan.slots == 2
    assert plan.embed_tier is Tier.HOST
    assert plan.streamed_bytes_per_step == 2 * LLAMA3_8B.layer_bytes[0]
    assert streaming_plan(LLAMA3_8B, WORKLOAD, 0).embed_tier is Tier.DEVICE
    with pytest.raises(OverspillError):
        streaming_plan(LLAMA3_8B, WORKLOAD, N + 1)


def test_plan_to_json_round_trips() -> None:
    plan = greedy_plan(LLAMA3_8B, 8 * GiB, WORKLOAD)
    d = json.loads(plan.to_json())
    # Tiers are plain strings in JSON, and every field is there.
    assert d["layer_tiers"][0] == "pinned" and d["layer_tiers"][-1] == "device"
    assert d["embed_tier"] == "host" and d["head_tier"] == "device"
    assert set(d) == {f.name for f in dataclasses.fields(Plan)}
    rebuilt = Plan.from_json(plan.to_json())
    assert rebuilt == plan
    assert json.loads(rebuilt.to_json()) == d
    # A plan with a prediction round-trips as well.
    predicted = with_prediction(LLAMA3_8B, plan, REFERENCE_PROFILES["h100-pcie5"])
    assert Plan.from_json(predicted.to_json()) == predicted
    # An unlimited plan serialises too (budget null).
    assert json.loads(greedy_plan(LLAMA3_8B, None).to_json())["budget_bytes"] is None


def test_plan_summary_names_streamed_layers() -> None:
    plan = greedy_plan(LLAMA3_8B, 8 * GiB, WORKLOAD)
    text = plan.summary()
    assert "12/32 resident, 20 streamed" in text and "(layers 0-19)" in text
    assert "ring: 3 slots" in text and "embeddings: host" in text
    assert "streamed" in str(greedy_plan(LLAMA3_8B, None)) and "ring" not in str(greedy_plan(LLAMA3_8B, None))


def test_plan_is_frozen() -> None:
    plan = greedy_plan(LLAMA3_8B, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.slots = 7  # type: ignore[misc]


def test_plan_module_imports_no_torch() -> None:
    """Planning must stay pure: importing the planner (through the package) pulls in no torch."""
    code = """
import sys
import overspill.planning.plan, overspill.planning.units, overspill.errors
from overspill.planning.placement import greedy_plan
from overspill.planning.plan import Footprint, Workload
p = greedy_plan(Footprint((10,) * 4, 5, 5, 0, False, 1, 1), 40, Workload(1, 1, activation_floor=0))
assert p.streamed_layers, p
bad = [m for m in ("torch", "transformers", "numpy") if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_serving_batch_shrinks_until_the_kv_stays_on_the_gpu() -> None:
    """6 GiB on the 8B shape: 64 sequences of 256 tokens push KV to host memory, which the serving
    engine cannot batch; the largest batch whose KV stays on the device is planned instead."""
    from overspill.planning.placement import device_kv_workload

    budget = 6 * 2**30
    want = Workload(256, 64)
    assert greedy_plan(LLAMA3_8B, budget, want).kv_host_layers  # the trap
    fitted = device_kv_workload(LLAMA3_8B, budget, want)
    assert fitted.context == 256 and 1 <= fitted.batch < 64
    assert not greedy_plan(LLAMA3_8B, budget, fitted).kv_host_layers
    assert greedy_plan(LLAMA3_8B, budget, dataclasses.replace(fitted, batch=fitted.batch + 1)).kv_host_layers
    # fits already, or no budget: unchanged
    assert device_kv_workload(LLAMA3_8B, budget, Workload(256, 4)) == Workload(256, 4)
    assert device_kv_workload(LLAMA3_8B, None, want) == want
    # 64k tokens need host KV even for one sequence: plan for one (16 would not even fit the budget)
    assert device_kv_workload(LLAMA3_8B, budget, Workload(65536, 16)) == Workload(65536, 1)
    assert greedy_plan(LLAMA3_8B, budget, Workload(65536, 1)).kv_host_layers


def test_serving_batch_fits_a_kv_cap_too() -> None:
    """`--kv-gpu-memory` on a server: the batch shrinks until every layer's KV fits the cap on the GPU, instead
    of splitting the cap over 16 sequences and sending most layers' KV to host memory (one sequence at a time)."""
    from overspill.planning.placement import device_kv_workload, place

    cap = 2 * 2**30  # 16 sequences of 4096 tokens need 8 GiB of KV
    want = Workload(4096, 16)
    assert place(LLAMA3_8B, None, want, kv_device_bytes=cap).kv_host_layers  # the trap
    for budget in (None, 24 * 2**30):
        served = place(LLAMA3_8B, budget, want, kv_device_bytes=cap, fit_batch=True)
        assert served.workload.batch == 4 and not served.kv_host_layers, budget  # 4 x 512 MiB fill 2 GiB
        more = dataclasses.replace(served.workload, batch=5)
        assert place(LLAMA3_8B, budget, more, kv_device_bytes=cap).kv_host_layers
    # one sequence that needs host KV under the cap: planned for one
    assert device_kv_workload(LLAMA3_8B, None, Workload(65536, 16), kv_device_bytes=cap) == Workload(65536, 1)


def test_serving_pass_bound_keeps_layers_resident_that_a_batch_prefill_would_need() -> None:
    """The engine bounds every forward pass (a 512-token prefill chunk or one token per sequence);
    generate prefills the whole batch at once. On the 8B shape at 6 GiB, 64 sequences of 256
    tokens: the generate reserve leaves no layer resident (what the H100 serving run planned),
    the engine's bound keeps some."""
    from overspill.planning.configs import shipped_config
    from overspill.planning.placement import device_kv_workload, pass_tokens
    from overspill.planning.plan import footprint_from_spec
    from overspill.planning.spec import spec_from_config

    fp = footprint_from_spec(spec_from_config(shipped_config("llama-3-8b")))
    budget = 6 * 2**30
    generate = Workload(256, 64)
    serving = Workload(256, 64, pass_tokens=512)
    assert pass_tokens(generate) == 256 * 64 and pass_tokens(serving) == 512
    assert workspace_bytes(fp, serving) < workspace_bytes(fp, generate)
    plan_generate = greedy_plan(fp, budget, device_kv_workload(fp, budget, generate))
    plan_serving = greedy_plan(fp, budget, device_kv_workload(fp, budget, serving))
    assert not plan_generate.resident_layers
    assert plan_serving.resident_layers and plan_serving.workload.batch >= plan_generate.workload.batch
