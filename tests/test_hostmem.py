"""The host memory a plan needs is counted and checked before a load starts (`planning.hostmem`)."""

from __future__ import annotations

from dataclasses import replace

import pytest

import overspill
from overspill.errors import OverspillError
from overspill.planning.configs import shipped_config
from overspill.planning.formats import choose, with_format
from overspill.planning.hostmem import HOST_MARGIN_BYTES, check_host, host_bytes
from overspill.planning.placement import plan_for
from overspill.planning.plan import Tier, Workload, footprint_from_spec
from overspill.planning.profile import REFERENCE_PROFILES, GiB
from overspill.planning.spec import spec_from_config

FP = footprint_from_spec(spec_from_config(shipped_config("llama-3-70b")))


def _plan(fp=FP, budget=78 * GiB, context=8192):
    return plan_for(fp, REFERENCE_PROFILES["h100-pcie5"], Workload(context, 1), budget_bytes=budget)


def test_streamed_layers_host_kv_and_a_host_embedding_are_counted() -> None:
    plan = _plan()
    need = host_bytes(FP, plan)
    assert need.streamed == sum(FP.layer_bytes[i] for i in plan.streamed_layers) > 0
    assert need.kv == plan.kv_host_bytes
    assert need.embeddings == (FP.embed_bytes if plan.embed_tier is Tier.HOST else 0)
    assert need.device == 0
    assert need.total == need.streamed + need.kv + need.embeddings
    assert host_bytes(FP, plan, on_cpu=True).device == plan.device_bytes  # a CPU device is host memory too


def test_a_stream_format_stores_its_own_bytes() -> None:
    fp = with_format(FP, choose(FP, "int4"))
    plan = replace(_plan(fp), stream_format="int4")
    bf16 = sum(FP.layer_bytes[i] for i in plan.streamed_layers)
    assert host_bytes(fp, plan).streamed == sum(fp.encoded_layer_bytes[i] for i in plan.streamed_layers)
    assert host_bytes(fp, plan).streamed < 0.3 * bf16


def test_int8_cpu_shares_hold_a_byte_a_weight() -> None:
    plan = replace(_plan(), cpu_fraction=0.4, cpu_format="int8")
    full = sum(FP.layer_bytes[i] for i in plan.streamed_layers)
    assert host_bytes(FP, plan).streamed == pytest.approx(full * (0.6 + 0.4 / 2), rel=1e-6)
    assert host_bytes(FP, replace(plan, cpu_format="bf16")).streamed == full


def test_check_passes_with_room_and_refuses_in_one_line_without() -> None:
    plan = _plan(context=131072)
    need = host_bytes(FP, plan)
    assert check_host(FP, plan, need.total + HOST_MARGIN_BYTES) == need
    with pytest.raises(OverspillError) as err:
        check_host(FP, plan, need.total)
    msg = str(err.value)
    assert "\n" not in msg and "host memory" in msg and "streamed layers" in msg
    assert ("--context" in msg) == bool(need.kv) and "--stream-format int8" in msg


def test_load_refuses_before_reading_weights_when_the_host_is_short(tiny_checkpoint, monkeypatch) -> None:
    import overspill.api as api

    read = []
    monkeypatch.setattr(api, "host_available_bytes", lambda: HOST_MARGIN_BYTES)
    monkeypatch.setattr(api, "materialize", lambda *a, **k: read.append(1))
    with pytest.raises(OverspillError, match="in host memory"):
        overspill.load(str(tiny_checkpoint("llama")), progress=False)
    assert not read


FP_8B = footprint_from_spec(spec_from_config(shipped_config("llama-3-8b")))


def test_a_plan_that_pins_nothing_is_not_refused() -> None:
    # Everything resident: no host bytes, so the process's margin alone is no reason to refuse.
    plan = _plan(FP_8B, context=1024)
    assert host_bytes(FP_8B, plan).total == 0
    assert check_host(FP_8B, plan, 1 * GiB).total == 0


@pytest.mark.parametrize(("fp", "budget", "on_cpu", "available", "lead"), [
    (FP, 78 * GiB, False, 20 * GiB, "this plan keeps"),  # streamed layers: several kinds of advice
    (FP_8B, 6 * GiB, False, 1 * GiB, "only 1 GiB of host memory is available, less than the 2 GiB"),
    (FP_8B, 78 * GiB, True, 4 * GiB, "this plan keeps"),  # the model on a CPU device: one piece of advice
], ids=["streamed", "below-the-margin", "cpu-device"])
def test_refusals_are_one_sentence_for_run_and_plan(fp, budget, on_cpu, available, lead) -> None:
    with pytest.raises(OverspillError) as err:
        check_host(fp, _plan(fp, budget, context=1024), available, on_cpu=on_cpu)
    msg = str(err.value)
    assert msg.startswith(lead) and "\n" not in msg
    assert "()" not in msg and ": or " not in msg  # every part named, advice never starts with "or"
    assert "free host memory, or use a bigger host (`overspill plan MODEL --host-memory SIZE`" in msg


def test_plan_says_nothing_is_pinned_when_nothing_is(capsys) -> None:
    """A plan that pins nothing fits any host: the plan table says so, not '0 B pinned ... (fits)' beside a
    margin larger than the host."""
    from overspill import cli

    assert cli.main(["plan", "llama-3-8b", "--host-memory", "1GiB", "--gpu-memory", "60GiB"]) == 0
    assert "host memory: none pinned" in capsys.readouterr().out
