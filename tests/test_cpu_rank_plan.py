"""The CPU rank's planner (pure Python): the fraction that makes host time equal link time, how it
shrinks with batch, when `auto` turns it off, and what the plan then predicts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from overspill.planning import cpu_rank
from overspill.planning.placement import plan_for
from overspill.planning.plan import Workload, footprint_from_spec
from overspill.planning.profile import REFERENCE_PROFILES
from overspill.planning.spec import spec_from_config
from overspill.planning.units import parse_bytes
from overspill.runtime.sources import resolve

H100 = REFERENCE_PROFILES["h100-pcie5"]
# A probed-looking host (the numbers are this test's inputs, not measurements): a GEMM rate and a join cost.
PROBED = replace(H100, cpu_gemm_flops_s=1e12, cpu_join_s=50e-6, host_read_bytes_s=80e9, cpu_threads=14)


def _plan(name: str, budget: str, batch: int = 1, profile=H100, context: int = 1024):
    spec = spec_from_config(resolve(name, config_only=True).config(), "bfloat16")
    fp = footprint_from_spec(spec)
    return fp, plan_for(fp, profile, Workload(context, batch), parse_bytes(budget))


@pytest.mark.parametrize("profile", [H100, PROBED])
def test_batch_1_balances_host_time_against_link_time(profile) -> None:
    fp, plan = _plan("llama-3-8b", "6GiB", profile=profile)
    split = cpu_rank.split_at(fp, plan, profile, 1)
    assert 0.3 < split.fraction < 0.8
    assert split.link_s == pytest.approx(split.cpu_s, rel=1e-9)  # the two paths end together
    # link time falls by the fraction of streamed bytes the host keeps
    assert split.link_s == pytest.approx(plan.prediction.link_s - split.fraction * plan.streamed_bytes_per_step / profile.h2d_bytes_s)
    assert split.tok_s > 1.8 * split.plain_tok_s


def test_the_share_shrinks_as_the_batch_grows_and_auto_turns_it_off() -> None:
    fp, plan = _plan("llama-3-8b", "6GiB")
    table = cpu_rank.batch_table(fp, plan, H100)
    fractions = [s.fraction for s in table]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > fractions[-1]
    off = cpu_rank.off_batch(fp, plan, H100)
    assert off is not None
    before = [s for s in table if s.batch < off]
    assert all(s.gain >= cpu_rank.MIN_GAIN for s in before) and cpu_rank.split_at(fp, plan, H100, off).gain < cpu_rank.MIN_GAIN


def test_with_cpu_rank_auto_replaces_the_prediction_and_notes_it() -> None:
    fp, plan = _plan("llama-3-70b", "80GiB")
    planned = cpu_rank.with_cpu_rank(fp, plan, H100, "auto")
    split = cpu_rank.split_at(fp, plan, H100, 1)
    assert planned.cpu_fraction == split.fraction
    assert planned.prediction.decode_tok_s == pytest.approx(split.tok_s) and planned.prediction.link_s == split.link_s
    assert planned.prediction.link_floor_tok_s == plan.prediction.link_floor_tok_s  # the plain floor, to compare against
    assert planned.cpu_max_tokens == cpu_rank.max_tokens(fp, H100) == 1  # GEMM not measured: each token a GEMV
    assert "CPU rank: 0." in planned.notes[-1] and "auto turns it off from batch" in planned.notes[-1]
    assert cpu_rank.with_cpu_rank(fp, plan, H100, "off") is plan


def test_auto_stays_off_where_nothing_streams_or_the_gain_is_small() -> None:
    fp, plan = _plan("llama-3-8b", "40GiB")
    assert not plan.streamed_layers and cpu_rank.with_cpu_rank(fp, plan, H100, "auto") is plan
    fp, plan = _plan("llama-3-8b", "12GiB", batch=64, context=256)
    assert plan.streamed_layers
    planned = cpu_rank.with_cpu_rank(fp, plan, H100, "auto")
    assert planned.cpu_fraction == 0 and "CPU rank off: predicted gain" in planned.notes[-1]
    forced = cpu_rank.with_cpu_rank(fp, plan, H100, "on")
    assert 0 < forced.cpu_fraction < 0.1


def test_max_tokens_is_where_host_compute_costs_what_a_copy_does() -> None:
    fp, _ = _plan("llama-3-8b", "6GiB")
    # copying a bf16 parameter: 2 B / 54 GB/s = 37 ps; computing it at T tokens: 2 T / 1 TFLOP/s
    assert cpu_rank.max_tokens(fp, PROBED) == 18
    assert cpu_rank.seconds_per_param(PROBED, 1) == pytest.approx(1 / PROBED.cpu_gemv_params_s)


def test_modes() -> None:
    assert cpu_rank.check_mode("auto") == "auto" and cpu_rank.check_mode("0.25") == 0.25
    with pytest.raises(ValueError, match="must be auto, off, on"):
        cpu_rank.check_mode("max")
    with pytest.raises(ValueError, match="fraction must be in"):
        cpu_rank.check_mode(1.5)


def test_int8_host_weights_take_a_larger_share() -> None:
    # int8 host weights at twice the bf16 rate (an input here): the host keeps more of each layer
    # and the step beats the bf16 split; without an int8 measurement the bf16 rate is used.
    fp, plan = _plan("llama-3-8b", "6GiB")
    fast = replace(H100, cpu_int8_gemv_params_s=2 * H100.cpu_gemv_params_s)
    bf16 = cpu_rank.split_at(fp, plan, fast, 1)
    int8 = cpu_rank.split_at(fp, plan, fast, 1, host_format="int8")
    assert int8.fraction > bf16.fraction and int8.tok_s > bf16.tok_s
    assert cpu_rank.split_at(fp, plan, H100, 1, host_format="int8") == cpu_rank.split_at(fp, plan, H100, 1)


def test_int8_host_weights_are_recorded_in_the_plan_with_their_host_bytes() -> None:
    # with_cpu_rank(host_format="int8"): Plan.cpu_format says it (and survives JSON), the note gives
    # the CPU share's host bytes (a byte a weight: half of bf16's, held instead of them) and the rate
    # it was balanced at; with an int8 rate twice bf16's (an input) the host takes a larger share.
    fp, plan = _plan("llama-3-8b", "6GiB")
    fast = replace(H100, cpu_int8_gemv_params_s=2 * H100.cpu_gemv_params_s)
    bf16 = cpu_rank.with_cpu_rank(fp, plan, fast, "auto")
    int8 = cpu_rank.with_cpu_rank(fp, plan, fast, "auto", host_format="int8")
    assert (bf16.cpu_format, int8.cpu_format) == ("bf16", "int8")
    assert int8.cpu_fraction > bf16.cpu_fraction
    assert int8.prediction.decode_tok_s > bf16.prediction.decode_tok_s
    assert type(plan).from_json(int8.to_json()).cpu_format == "int8"
    held = cpu_rank.share_host_bytes(fp, plan, 0.5, "int8")
    assert held == cpu_rank.share_host_bytes(fp, plan, 0.5) // 2 > 0
    note = int8.notes[-1]
    assert "int8 host weights (lossy" in note and "balanced at the int8 GEMV's 76 G params/s" in note
    # the reference H100 has no int8 measurement: the bf16 rate, said so, and the same fraction
    same = cpu_rank.with_cpu_rank(fp, plan, H100, "auto", host_format="int8")
    assert same.cpu_fraction == cpu_rank.with_cpu_rank(fp, plan, H100, "auto").cpu_fraction
    assert "int8 GEMV not measured on this profile" in same.notes[-1]
    assert "int8 host weights at the bf16 GEMV's" in cpu_rank.table_lines(fp, plan, H100, "int8")[0]
    assert "host int8 GEMV 76 G" in cpu_rank.table_lines(fp, plan, fast, "int8")[0]
    # nothing recorded where the CPU rank stays off
    assert cpu_rank.with_cpu_rank(fp, plan, None, "auto", host_format="int8").cpu_format == "bf16"


def test_host_formats() -> None:
    assert cpu_rank.check_format("int8", 0.5) == "int8" and cpu_rank.check_format("bf16", "off") == "bf16"
    with pytest.raises(ValueError, match="must be bf16 or int8, got 'fp8'"):
        cpu_rank.check_format("fp8")
    with pytest.raises(ValueError, match="cpu_compute is off"):
        cpu_rank.check_format("int8", "off")
