"""The planner's stream formats (no torch): bytes per trip, slots that hold both forms, predicted speed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from overspill.planning import formats
from overspill.planning.formats import choose, encoded_bytes, resolve_auto, with_format
from overspill.planning.placement import greedy_plan, plan_for
from overspill.planning.plan import Footprint, Workload
from overspill.planning.profile import REFERENCE_PROFILES
from overspill.planning.self_draft import INT4_GROUP

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
LAYER = 436_207_616  # Llama-3-8B decoder layer in bf16: 218,103,808 parameters
PARAMS = LAYER // 2
LLAMA3_8B = Footprint(
    layer_bytes=(LAYER,) * 32, embed_bytes=1_050_673_152, head_bytes=1_050_673_152, other_bytes=8192,
    tied_embeddings=False, kv_bytes_per_token=131072, activation_bytes_per_token=(4 * 4096 + 3 * 14336) * 2,
    hidden_size=4096,
)
H100 = REFERENCE_PROFILES["h100-pcie5"]


def test_bytes_per_trip_of_each_format() -> None:
    assert encoded_bytes("bf16", LAYER, 2) == LAYER
    assert encoded_bytes("int8", LAYER, 2) == PARAMS + 4 * PARAMS // 128  # 1 B + a float32 scale per 128 inputs
    assert encoded_bytes("fp8", LAYER, 2) == PARAMS + 4 * PARAMS // 128
    assert encoded_bytes("int4", LAYER, 2) == PARAMS // 2 + 4 * PARAMS // 128  # bf16 scale + zero a group
    # lossless: the low byte raw, the high byte at the nvCOMP ANS prior 0.365: 0.6825 of bf16
    assert encoded_bytes("lossless", LAYER, 2) == int(LAYER * 0.6825)
    assert formats.lossless_ratio(4) == pytest.approx((3 + 0.365) / 4)  # float32: three raw planes
    assert formats.INT4_GROUP == INT4_GROUP  # the same groups as the self draft's int4 layers


def test_encoded_layers_need_two_staging_buffers_beside_the_slots() -> None:
    budget = 6 * GiB
    bf16 = greedy_plan(LLAMA3_8B, budget)
    int8 = greedy_plan(with_format(LLAMA3_8B, choose(LLAMA3_8B, "int8")), budget)
    enc = encoded_bytes("int8", LAYER, 2)
    # slots hold the layer as it computes; its encoded bytes land in one of two staging buffers, which hold the
    # copies in flight, so at depth 2 two slots do (`placement.ring_slots`) where bf16 copies need three
    assert bf16.slot_bytes == int8.slot_bytes == LAYER and (bf16.slots, int8.slots) == (3, 2)
    assert bf16.expand_bytes == 0 and int8.expand_bytes == 2 * enc
    assert int8.stream_format == "int8" and bf16.stream_format == "bf16"
    # the staging (2 x 1.03 B a parameter) costs about the slot saved (2 B a parameter): as many layers stream;
    # every streamed layer sends its encoded bytes
    assert len(int8.streamed_layers) == len(bf16.streamed_layers)
    assert int8.streamed_bytes_per_step == enc * len(int8.streamed_layers)
    assert int8.device_bytes <= budget
    lossless = greedy_plan(with_format(LLAMA3_8B, choose(LLAMA3_8B, "lossless")), budget)
    staging = 2 * encoded_bytes("lossless", LAYER, 2)
    # plus one coded chunk of the high plane decoded at a time (64 MiB of the layer's 208 MiB)
    assert lossless.expand_bytes == staging + formats.LOSSLESS_CHUNK < staging + PARAMS
    assert lossless.device_bytes == (lossless.device_weight_bytes + 2 * LAYER + staging + formats.LOSSLESS_CHUNK
                                     + lossless.workspace_bytes)


def test_fewer_bytes_raise_the_link_floor() -> None:
    plans = {name: plan_for(with_format(LLAMA3_8B, choose(LLAMA3_8B, name)), H100, Workload(), 6 * GiB)
             for name in formats.FORMATS}
    for name, plan in plans.items():
        p = plan.prediction
        assert p.bottleneck == "link", name
        assert p.link_floor_tok_s == pytest.approx(H100.h2d_bytes_s / plan.streamed_bytes_per_step)
        assert (p.expand_s > 0) == (name != "bf16")
    speedup = {n: plans[n].prediction.decode_tok_s / plans["bf16"].prediction.decode_tok_s for n in plans}
    assert speedup["int8"] == pytest.approx(speedup["fp8"])
    assert speedup["int4"] > speedup["int8"] > speedup["lossless"] > 1.35


def test_lossless_measured_ratio_replaces_the_prior() -> None:
    assumed = choose(LLAMA3_8B, "lossless")
    measured = choose(LLAMA3_8B, "lossless", high_plane_ratio=0.5)
    assert assumed.assumed and not measured.assumed
    assert measured.encoded_layer_bytes[0] == int(LAYER * 0.75)
    exact = choose(LLAMA3_8B, "int8", exact=(123,) * 32)
    assert exact.encoded_layer_bytes == (123,) * 32 and not exact.assumed


def test_auto_is_lossless_only_where_the_codec_outruns_the_link() -> None:
    assert resolve_auto(True, 54e9) == ("lossless", None)
    fmt, note = resolve_auto(False, 54e9)
    assert fmt == "bf16" and "overspill[compress]" in note
    fmt, note = resolve_auto(True, 400e9)  # GH200's link beats the codec's 137 GB/s decode
    assert fmt == "bf16" and "no faster" in note
    fmt, note = resolve_auto(True, 54e9, blocker="CUDA graphs")  # asked-for graphs stream bf16 only: no refusal
    assert fmt == "bf16" and "CUDA graphs" in note
    with pytest.raises(ValueError, match="use one of"):
        formats.check_format("int5")


def test_plan_json_round_trips_the_format() -> None:
    plan = greedy_plan(with_format(LLAMA3_8B, choose(LLAMA3_8B, "int4")), 6 * GiB)
    again = type(plan).from_json(plan.to_json())
    assert again == plan and again.stream_format == "int4"
    assert "stream format: int4" in plan.summary()
    assert dataclasses.replace(LLAMA3_8B, encoded_layer_bytes=None).stream_format == "bf16"


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "overspill", "plan", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_plan_command_shows_formats_side_by_side() -> None:
    out = _plan_cli("llama-3-8b", "--gpu-memory", "6GiB", "--profile", "h100-pcie5")
    assert out.returncode == 0, out.stderr
    table = out.stdout.split("stream formats")[1]
    for name in formats.FORMATS:
        assert f"\n{name} " in table
    assert "ASSUMED" in table
    chosen = _plan_cli("llama-3-8b", "--gpu-memory", "6GiB", "--profile", "h100-pcie5", "--stream-format", "int4", "--json")
    data = json.loads(chosen.stdout)
    assert data["plan"]["stream_format"] == "int4"
    assert set(data["stream_formats"]) == set(formats.FORMATS)
    assert data["stream_formats"]["int4"]["decode_tok_s"] > 3 * data["stream_formats"]["bf16"]["decode_tok_s"]


def test_plan_command_refuses_an_unknown_format_in_one_line() -> None:
    out = _plan_cli("llama-3-8b", "--stream-format", "int5")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "--stream-format must be one of" in out.stderr


def test_encoded_rings_keep_depth_slots_and_at_least_two() -> None:
    from overspill.planning.placement import ring_slots

    assert [ring_slots(d, 30, encoded=False) for d in (1, 2, 4)] == [2, 3, 5]
    assert [ring_slots(d, 30, encoded=True) for d in (1, 2, 4)] == [2, 2, 4]
    assert ring_slots(2, 1, encoded=True) == ring_slots(2, 1, encoded=False) == 1  # never more than streamed layers
