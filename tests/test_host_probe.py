"""The host-as-rank probe: rates measured the way the CPU rank computes, on a worker thread with its
own thread count that leaves the caller's as it was."""

from __future__ import annotations

import torch

from overspill.planning.profile import REFERENCE_PROFILES, Profile
from overspill.runtime import host_probe


def test_thread_choices_leave_two_cores() -> None:
    assert host_probe.thread_choices(16) == (8, 12, 14)
    assert host_probe.thread_choices(2) == (1,)
    assert host_probe.thread_choices(1) == (1,)


def test_rates_run_on_their_own_thread_count_and_restore_the_callers() -> None:
    before = torch.get_num_threads()
    seen = host_probe.on_threads(1, torch.get_num_threads)
    assert seen == 1 and torch.get_num_threads() == before
    rate = host_probe.linear_rate(torch.float32, 1, rows=256, cols=128, iters=3, warmup=1)
    gemm = host_probe.linear_rate(torch.float32, 1, tokens=8, rows=256, cols=128, iters=3, warmup=1)
    assert rate > 0 and gemm > 0


def test_measure_on_a_cpu_only_machine_picks_the_fastest_bf16_thread_count() -> None:
    rank = host_probe.measure(None, 4)
    bf16 = {threads: rate for dtype, threads, rate in rank.table if dtype == "bfloat16"}
    assert {d for d, _, _ in rank.table} == {"bfloat16", "float32"} and set(bf16) == {1, 2}
    assert rank.gemv_params_s == max(bf16.values()) == bf16[rank.threads]
    assert rank.join_s == 0.0 and rank.gemm_flops_s > 0 and rank.read_bytes_s > 0


def test_profiles_saved_before_the_cpu_rank_fields_still_load() -> None:
    old = Profile.from_json(REFERENCE_PROFILES["h100-pcie5"].to_json().replace('"cpu_threads": 0,', ""))
    assert old.cpu_threads == 0 and "join" not in old.summary()
    probed = Profile.from_json(old.to_json().replace('"cpu_threads": 0', '"cpu_threads": 14'))
    assert "on 14 threads while the link copies" in probed.summary()
