"""Scenario tests of the cost model (`costmodel.predict` through `plan_for`) on reference profiles.

Every expected number is computed by hand from the derivation in `overspill/planning/costmodel.py`; the
comment above each assertion shows the arithmetic. Pure Python: no torch, no model.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from overspill.planning.configs import shipped_config
from overspill.planning.placement import greedy_plan, place, plan_for, serving_pass_tokens, with_prediction, workspace_bytes
from overspill.planning.plan import Workload, footprint_from_spec
from overspill.planning.profile import REFERENCE_PROFILES
from overspill.planning.spec import spec_from_config

ROOT = Path(__file__).resolve().parents[1]
GiB, MiB = 2**30, 2**20
H100, A100, GH200 = (REFERENCE_PROFILES[n] for n in ("h100-pcie5", "a100-pcie4", "gh200"))

FP = footprint_from_spec(spec_from_config(shipped_config("llama-3-8b")))
N = 32
LAYER = 436_224_000  # 218,112,000 parameters x 2 bytes (attention 41.9M + MLP 176.2M + norms 8192)
HEAD = 1_050_673_152  # 128256 x 4096 x 2 bytes, untied
PARAMS = N * LAYER // 2 + HEAD // 2  # 7.505 G parameters read per token (the input embedding is one row)
HOST_S = 4e-3 + N * 0.9e-3  # reference dispatch: 4 ms per step + 0.9 ms per layer = 32.8 ms


def test_footprint_matches_the_hand_numbers() -> None:
    assert FP.layer_bytes == (LAYER,) * N and FP.head_bytes == HEAD and FP.dtype_bytes == 2
    assert FP.kv_bytes_per_token == N * 2 * 8 * 128 * 2  # 32 layers x K,V x 8 heads x 128 dims x 2 bytes


def test_6gib_on_h100_is_link_bound_at_the_link_floor() -> None:
    plan = plan_for(FP, H100, Workload(), 6 * GiB)
    # 6 GiB - lm_head 1002 MiB - workspace 744 MiB - 3 slots x 416 MiB leaves 3.08 GiB = 7 layers: 25 stream.
    assert len(plan.streamed_layers) == 25 and plan.streamed_bytes_per_step == 25 * LAYER
    p = plan.prediction
    # t_link = 25 x 436.2 MB / 54 GB/s = 202 ms, far above t_host 32.8 ms and t_gpu ~5 ms.
    assert p.bottleneck == "link"
    assert p.link_s == pytest.approx(25 * LAYER / 54e9)
    assert p.decode_tok_s == pytest.approx(54e9 / plan.streamed_bytes_per_step, rel=0.01)  # 4.95 tok/s
    assert p.link_floor_tok_s == pytest.approx(p.decode_tok_s)
    # Prefill of 2048 tokens is one pass, also link-bound: 2048 / 202 ms = 10,141 tok/s.
    assert p.prefill_tok_s == pytest.approx(2048 / p.link_s)


def test_a100_pcie4_scales_with_the_link() -> None:
    h100 = plan_for(FP, H100, Workload(), 6 * GiB)
    a100 = plan_for(FP, A100, Workload(), 6 * GiB)
    # Same budget, same placement; only the link changes: 25 GB/s vs 54 GB/s.
    assert a100.layer_tiers == h100.layer_tiers and a100.prediction.bottleneck == "link"
    assert a100.prediction.decode_tok_s / h100.prediction.decode_tok_s == pytest.approx(25 / 54)


def test_fully_resident_is_bound_by_host_dispatch() -> None:
    plan = plan_for(FP, H100)  # budget None: 77.5 GiB holds all 15 GiB of weights
    assert plan.streamed_layers == () and plan.prediction.link_floor_tok_s is None
    p = plan.prediction
    # t_gpu = 32 x (436 MB + 16.8 MB KV) / 3 TB/s + 1.05 GB / 3 TB/s = 5.2 ms < t_host = 4 + 32 x 0.9 = 32.8 ms.
    assert p.bottleneck == "host dispatch"
    assert p.host_s == pytest.approx(HOST_S)
    assert p.gpu_s == pytest.approx(N * (LAYER + 4096 * 4096) / 3e12 + HEAD / 3e12)
    assert p.decode_tok_s == pytest.approx(1 / HOST_S)  # 30.5 tok/s
    assert plan.notes == ()  # far faster than the CPU's 38e9 / 7.5e9 = 5.06 tok/s


def test_without_dispatch_overhead_resident_decode_reads_hbm() -> None:
    # What CUDA graphs would buy: no host time, so the 15 GB weight read per token (5.2 ms) bounds it.
    graphs = replace(H100, layer_overhead_s=0.0, step_overhead_s=0.0)
    p = plan_for(FP, graphs).prediction
    assert p.bottleneck == "hbm"
    assert p.decode_tok_s == pytest.approx(1 / (N * (LAYER + 4096 * 4096) / 3e12 + HEAD / 3e12))  # 193 tok/s


def test_batch_256_at_4096_tokens_reads_kv() -> None:
    plan = with_prediction(FP, greedy_plan(FP, None, Workload(4096, 256)), H100)
    p = plan.prediction
    # KV per layer: 4 KiB/token x 4096 tokens x 256 seqs = 4.29 GB; x 32 layers / 3 TB/s = 45.8 ms > 32.8 ms host.
    assert p.kv_s == pytest.approx(N * 4096 * 4096 * 256 / 3e12)
    assert p.bottleneck == "kv"
    assert p.decode_tok_s == pytest.approx(256 / p.gpu_s)  # ~5,040 tok/s over the batch


def test_long_context_big_batch_is_kv_bound() -> None:
    p = with_prediction(FP, greedy_plan(FP, None, Workload(32768, 64)), H100).prediction
    # KV 4 KiB x 32768 x 64 = 8.6 GB per layer: 91.6 ms of reads against 4.7 ms of weights and 1.1 ms of math.
    assert p.bottleneck == "kv" and p.kv_s > 10 * (N * LAYER / 3e12)
    assert p.decode_tok_s == pytest.approx(64 / p.gpu_s)  # ~660 tok/s


def test_huge_batch_of_short_sequences_is_compute_bound() -> None:
    p = with_prediction(FP, greedy_plan(FP, None, Workload(16, 4096)), H100).prediction
    # Per layer 2 x 218.1M params x 4096 seqs / 780 TFLOP/s = 2.29 ms of math vs 0.19 ms of reads;
    # the head: 2 x 525M x 4096 / 780 TFLOP/s = 5.5 ms. Total 78.8 ms > 32.8 ms host.
    compute = N * 2 * (LAYER / 2) * 4096 / 780e12 + 2 * (HEAD / 2) * 4096 / 780e12
    assert p.bottleneck == "compute"
    assert p.gpu_s == pytest.approx(compute)
    assert p.decode_tok_s == pytest.approx(4096 / compute)


def test_gh200_link_moves_the_bottleneck_to_the_host() -> None:
    h100 = plan_for(FP, H100, Workload(), 6 * GiB).prediction
    gh200 = plan_for(FP, GH200, Workload(), 6 * GiB).prediction
    # NVLink-C2C: 25 x 436 MB / 400 GB/s = 27.3 ms < 32.8 ms host, so dispatch bounds it at 30.5 tok/s.
    assert gh200.link_s == pytest.approx(25 * LAYER / 400e9)
    assert gh200.bottleneck == "host dispatch"
    assert gh200.decode_tok_s == pytest.approx(1 / HOST_S)
    assert gh200.decode_tok_s > 6 * h100.decode_tok_s  # 30.5 vs 4.95 tok/s


def test_slow_link_warns_that_the_cpu_alone_is_faster() -> None:
    slow = replace(H100, h2d_bytes_s=10e9)  # e.g. pageable copies
    plan = plan_for(FP, slow, Workload(), 6 * GiB)
    # Link: 10.9 GB / 10 GB/s = 1.09 s -> 0.92 tok/s; CPU: 7.505e9 params / 38e9 + 32.8 ms dispatch -> 4.34 tok/s.
    host = slow.step_overhead_s + 32 * slow.layer_overhead_s
    assert plan.prediction.cpu_only_tok_s == pytest.approx(1 / (PARAMS / 38e9 + host))
    assert plan.prediction.decode_tok_s == pytest.approx(10e9 / (25 * LAYER))
    assert any("no faster than the CPU" in n for n in plan.notes)


def test_budget_none_uses_free_memory_minus_margin() -> None:
    plan = plan_for(FP, H100)
    assert plan.budget_bytes == 79 * GiB - 1536 * MiB  # 77.5 GiB
    assert plan_for(FP, H100, margin_bytes=0).budget_bytes == 79 * GiB
    assert plan_for(FP, GH200).budget_bytes == 95 * GiB - 1536 * MiB


def test_max_batch_grows_with_the_budget() -> None:
    batches = [plan_for(FP, H100, Workload(), b).max_batch for b in (20 * GiB, 40 * GiB, None)]
    assert batches == sorted(batches) and batches[0] < batches[-1]
    # Each sequence of 4096 tokens needs 512 MiB KV + 232 MiB activations (a 2048-token prefill chunk) + its
    # mask (2048 x 4096 x 3 B = 24 MiB), beside one layer's grouped-KV transient (4 x 16 MiB a sequence) and
    # 32 MiB of slack; at 77.5 GiB: (77.5 GiB - 14.96 GiB weights - 32 MiB) / 832 MiB = 76.9 -> 76.
    assert batches[-1] == 76
    # the largest batch is the one at which a plan's own reserve (its workspace) still fits beside the weights
    plan = plan_for(FP, H100)
    fixed = plan.device_bytes - plan.workspace_bytes
    assert fixed + workspace_bytes(FP, Workload(batch=76)) <= plan.budget_bytes
    assert fixed + workspace_bytes(FP, Workload(batch=77)) > plan.budget_bytes


def test_a_served_plan_reports_at_least_its_own_batch() -> None:
    """`plan --serve --batch 64` placed for 64 sequences must not say at most 61 fit (the old count subtracted
    the activation floor on top of the pass's activations and charged each sequence an attention transient)."""
    fp = footprint_from_spec(spec_from_config(shipped_config("llama-3-8b")))
    workload = Workload(context=256, batch=64, pass_tokens=serving_pass_tokens(64))
    plan = with_prediction(fp, place(fp, 6 * GiB, workload, fit_batch=True), H100)
    assert plan.workload.batch == 64 and plan.device_bytes <= 6 * GiB
    assert plan.max_batch >= 64


@pytest.mark.parametrize(
    ("name", "layers", "streamed"),
    # Scout: 34, one more than before its prefill chunk reserved every expert's intermediates at once
    # (Llama-4's MoE runs all 16 experts on every token: ~2.8 GB a 2048-token chunk).
    [("llama-3-70b", 80, 37), ("mixtral-8x7b", 32, 7), ("llama-4-scout-109b", 48, 34)],
)
def test_big_models_plan_link_bound_on_h100(name: str, layers: int, streamed: int) -> None:
    fp = footprint_from_spec(spec_from_config(shipped_config(name)))
    plan = plan_for(fp, H100)
    assert len(plan.layer_tiers) == layers and len(plan.streamed_layers) == streamed
    assert plan.streamed_layers == tuple(range(streamed))  # the first layers stream, the tail stays
    assert plan.device_bytes <= plan.budget_bytes
    p = plan.prediction
    # Streaming tens of GB per token over 54 GB/s dwarfs every other term.
    assert p.bottleneck == "link"
    assert p.decode_tok_s == pytest.approx(54e9 / plan.streamed_bytes_per_step)


def test_moe_resident_layers_read_only_routed_experts() -> None:
    fp = footprint_from_spec(spec_from_config(shipped_config("mixtral-8x7b")))
    # Mixtral: 8 experts, 2 routed; a layer stores 2.9 GB but a token reads 0.79 GB of it.
    assert fp.layer_active_bytes[0] < fp.layer_bytes[0] / 3
    p = plan_for(fp, replace(GH200, layer_overhead_s=0.0, step_overhead_s=0.0)).prediction
    kv_layer = 4096 * 4096  # 4 KiB/token/layer x 4096 tokens
    head = fp.head_bytes / 3.6e12
    assert p.gpu_s == pytest.approx(sum(b + kv_layer for b in fp.layer_active_bytes) / 3.6e12 + head)


def test_planning_modules_import_without_torch() -> None:
    code = "import overspill.planning.plan, overspill.planning.costmodel, overspill.planning.profile, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_ttft_of_a_resident_prompt_is_matmuls_plus_causal_attention() -> None:
    from overspill.planning.costmodel import ATTENTION_PREFILL_FRACTION
    from overspill.planning.placement import ttft_seconds

    plan = plan_for(FP, H100, Workload(4096, 1), 40 * GiB)
    assert not plan.streamed_layers
    # two chunks of 2048: matmuls 2 x 7.37 G layer params x 4096 tokens at 780 TFLOP/s; attention
    # 4 x 4096 (query width) x 32 layers x 2048 x (1024.5 + 3072.5) tokens at 0.14 x 780 TFLOP/s
    params = N * LAYER // 2
    matmul = 2 * params * 4096 / 780e12
    attention = 4 * 4096 * N * 2048 * (1024.5 + 3072.5) / (ATTENTION_PREFILL_FRACTION * 780e12)
    head = 2 * (HEAD // 2) / 780e12
    assert ttft_seconds(FP, plan, H100, 4096) == pytest.approx(matmul + attention + head, rel=1e-9)


def test_ttft_of_a_short_streamed_prompt_is_one_link_pass_per_chunk() -> None:
    from overspill.planning.placement import ttft_seconds

    plan = plan_for(FP, H100, Workload(4096, 1), 6 * GiB)
    link = plan.streamed_bytes_per_step / H100.h2d_bytes_s
    assert ttft_seconds(FP, plan, H100, 4096) == pytest.approx(2 * link, rel=0.01)  # link-bound chunks
    assert ttft_seconds(FP, plan, H100, 8192) > ttft_seconds(FP, plan, H100, 4096)


@pytest.mark.parametrize("name, budget, prompt, measured", [
    ("llama-3-70b", None, 131072, 238.9),  # plan-truth-llama-3-70b-20261205-161655.json (H100)
    ("llama-3-8b", 40 * GiB, 131064, 42.7),  # plan-truth-llama-3-8b-20261204-163825.json (H200)
])
def test_ttft_fit_holds_for_the_measured_128k_prompts(name: str, budget, prompt: int, measured: float) -> None:
    """The attention rate was fitted to these two runs: the prediction stays within 5% of each."""
    from overspill.planning.placement import ttft_seconds

    fp = footprint_from_spec(spec_from_config(shipped_config(name)))
    plan = plan_for(fp, H100, Workload(prompt + 64, 1), budget)
    assert ttft_seconds(fp, plan, H100, prompt) == pytest.approx(measured, rel=0.05)


def test_plan_shows_the_ttft_of_a_long_prompt(capsys) -> None:
    from overspill import cli

    assert cli.main(["plan", "llama-3-70b", "--profile", "h100-pcie5", "--context", "131072"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("predicted prefill"))
    assert "a prompt of 131072 tokens: first token in ~" in line


def test_spread_streaming_overlaps_nearly_every_layers_compute_with_the_copies() -> None:
    """A serial verify pass hides the compute of every layer up to the last streamed one under the copies
    (`Prediction.overlapped_gpu_s`): streaming the first layers leaves the resident ones as a tail, spreading
    them leaves at most one resident layer after the last copy."""
    budget = 6 * GiB
    prefix = plan_for(FP, H100, Workload(), budget)
    spread = plan_for(FP, H100, Workload(spread=True), budget)
    assert prefix.streamed_layers and len(spread.streamed_layers) == len(prefix.streamed_layers)
    per_layer = prefix.prediction.overlapped_gpu_s / len(prefix.streamed_layers)  # layers of one size
    assert prefix.prediction.gpu_s - prefix.prediction.overlapped_gpu_s > (N - len(prefix.streamed_layers)) * per_layer
    tail = N - 1 - max(spread.streamed_layers)
    assert tail <= 1
    assert spread.prediction.overlapped_gpu_s == pytest.approx((N - tail) * per_layer, rel=0.05)


def test_a_plan_saved_before_the_rename_still_loads() -> None:
    """Plans saved as JSON before 5bcabff name the overlapped GPU time `streamed_gpu_s` (the prefix layout's
    value: the same number)."""
    plan = plan_for(FP, H100, Workload(), 6 * GiB)
    old = plan.to_json().replace('"overlapped_gpu_s"', '"streamed_gpu_s"')
    assert '"streamed_gpu_s"' in old and type(plan).from_json(old) == plan
