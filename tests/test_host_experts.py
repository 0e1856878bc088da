"""The host computes missing routed experts (`planning.host_experts`, `runtime.experts.HostExperts`):
the split's arithmetic, tokens and logits as the resident model's, and one-line refusals."""

from __future__ import annotations

import pytest
import torch

import overspill
from overspill.errors import OverspillError
from overspill.planning.host_experts import check_mode, host_count
from overspill.runtime.experts import HostExperts
from test_moe import CONTEXT, checkpoint, experts_plan, generate, prompts  # noqa: F401 - fixture

MIXTRAL_EXPERT = 3 * 4096 * 14336  # parameters of one Mixtral-8x7B expert
LINK, HOST = 54e9, 36e9  # pinned bytes/s and host bf16 GEMV params/s (the lent H200's measured rates)


def test_the_host_takes_the_share_that_shortens_the_layer() -> None:
    # Mixtral at batch 1: two misses of one token; copying both costs 13 ms, the host computing one while
    # the link brings the other costs max(4.9, 6.5) ms; the host computing both costs 9.8 ms.
    assert host_count([1, 1], 2 * MIXTRAL_EXPERT, MIXTRAL_EXPERT, LINK, HOST) == 1
    # a miss routed to many tokens costs the host more than its copy: it crosses the link
    assert host_count([40], 2 * MIXTRAL_EXPERT, MIXTRAL_EXPERT, LINK, HOST) == 0
    # four single-token misses: two on the host (9.8 ms) against two copies (13 ms) beats one (4.9 vs 19.6)
    assert host_count([1, 1, 1, 1], 2 * MIXTRAL_EXPERT, MIXTRAL_EXPERT, LINK, HOST) == 2
    assert host_count([1, 1], 2 * MIXTRAL_EXPERT, MIXTRAL_EXPERT, LINK, 0.0) == 0  # unmeasured host: copy
    assert host_count([], 1, 1, LINK, HOST) == 0


def test_the_policy_picks_the_fewest_token_misses() -> None:
    policy = HostExperts("auto", 2 * MIXTRAL_EXPERT, MIXTRAL_EXPERT, LINK, HOST)
    assert policy.pick([5, 2], [30, 1]) == {2}
    assert HostExperts("on", 1, 1).pick([5, 2], [30, 1]) == {5, 2}
    assert HostExperts("on", 1, 1).pick([5, 2], [30, 1], free_slots=1) == {2}  # a free slot takes the busier one
    with pytest.raises(ValueError, match="off, auto, on"):
        check_mode("always")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "llama4_text"])
def test_experts_computed_on_the_host_match_resident(arch: str, checkpoint) -> None:
    path, reference = checkpoint(arch)
    model, _ = overspill.load(path, plan=experts_plan(arch, 0, False), dtype="float32", context=CONTEXT, batch=2,
                              progress=False, cpu_experts="on")
    cache = model.overspill.experts
    assert any("cpu experts on" in n for n in model.overspill.plan.notes)
    single, batch, mask = prompts()
    for ids, m in ((single, None), (batch, mask)):
        want, want_logits = generate(reference, ids, m)
        cache.reset_stats()
        got, got_logits = generate(model, ids, m)
        assert torch.equal(got, want), arch
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        assert cache.host_computed > 0
    # the first misses filled the cache's free slots; from then on every miss stays on the host
    assert all(owner is not None for owner in cache.owner)
    cache.reset_stats()
    generate(model, single)
    assert cache.host_computed > 0 and cache.misses == 0 and cache.bytes_copied == 0


def test_cpu_experts_refusals_and_auto_without_rates(checkpoint) -> None:
    path, _ = checkpoint("mixtral")
    with pytest.raises(OverspillError, match="cpu_experts must be one of"):
        overspill.load(path, dtype="float32", context=CONTEXT, progress=False, cpu_experts="yes")
    with pytest.raises(OverspillError, match="moe_streaming='dense' streams MoE layers whole"):
        overspill.load(path, dtype="float32", context=CONTEXT, progress=False, cpu_experts="on",
                       moe_streaming="dense", gpu_memory="2MiB")
    model, _ = overspill.load(path, plan=experts_plan("mixtral", 0, False), dtype="float32", context=CONTEXT,
                              progress=False, cpu_experts="auto")
    assert any("no probed link" in n for n in model.overspill.plan.notes)
    single, _, _ = prompts()
    generate(model, single)
    assert model.overspill.experts.host_computed == 0 and model.overspill.experts.misses > 0


@pytest.mark.parametrize(("arch", "impl"), [("mixtral", "grouped_mm"), ("mixtral", "eager"), ("mixtral", "batched_mm"),
                                           ("qwen3_moe", "grouped_mm"),
                                           ("qwen3_moe", "eager"), ("llama4_text", "grouped_mm")])
def test_a_layer_split_between_host_and_gpu_matches_resident(arch: str, impl: str, checkpoint, monkeypatch) -> None:
    """Rates where a copy and one token on the host cost the same: each layer with two or more misses
    computes some on the host and copies the rest, and the two sums add up to the resident model's.
    grouped_mm skips the host's rows (sentinels past the last slot) instead of multiplying them by zero."""
    from transformers.integrations import moe as hf_moe

    skipped = []
    if impl == "grouped_mm":
        grouped = hf_moe._grouped_mm

        def counted(input, weight, offs):
            skipped.append(input.shape[0] - int(offs[-1]))
            return grouped(input, weight, offs)

        monkeypatch.setattr(hf_moe, "_grouped_mm", counted)
    path, reference = checkpoint(arch)
    model, _ = overspill.load(path, plan=experts_plan(arch, 0, False), dtype="float32", context=CONTEXT, batch=2,
                              progress=False)
    cache = model.overspill.experts
    params = cache.expert_nbytes // 4
    cache.host_policy = HostExperts("auto", cache.expert_nbytes, params, cache.expert_nbytes, params)
    saved = reference.config._experts_implementation
    reference.config._experts_implementation = model.config._experts_implementation = impl
    try:
        single, batch, mask = prompts()
        for ids, m in ((single, None), (batch, mask)):
            want, want_logits = generate(reference, ids, m)
            cache.reset_stats()
            got, got_logits = generate(model, ids, m)
            assert torch.equal(got, want), (arch, impl)
            torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
            assert cache.host_computed > 0 and cache.misses > 0  # both sides worked
        assert impl != "grouped_mm" or arch == "llama4_text" or max(skipped) > 0
    finally:
        reference.config._experts_implementation = saved


def test_layer_split_and_the_plan_with_the_host_share() -> None:
    from overspill.planning.host_experts import layer_split, supported

    k, seconds = layer_split(2.0, 1.0, 2 * MIXTRAL_EXPERT, MIXTRAL_EXPERT, LINK, HOST)
    assert k == 1 and seconds == pytest.approx(2 * MIXTRAL_EXPERT / LINK)  # the copy outlasts the host's expert
    # an expectation of 1.9 misses: the split of 2, scaled, so neither share exceeds what is expected
    k, seconds = layer_split(1.9, 1.0, 2 * MIXTRAL_EXPERT, MIXTRAL_EXPERT, LINK, HOST)
    assert k == pytest.approx(0.95) and seconds == pytest.approx(0.95 * 2 * MIXTRAL_EXPERT / LINK)
    assert layer_split(1.9, 1.0, 2 * MIXTRAL_EXPERT, MIXTRAL_EXPERT, LINK, HOST, "off") == \
        (0, pytest.approx(1.9 * 2 * MIXTRAL_EXPERT / LINK))
    assert layer_split(1.9, 1.0, 2 * MIXTRAL_EXPERT, MIXTRAL_EXPERT, LINK, HOST, "on")[0] == pytest.approx(1.9)
    # 0.4 expected misses still wait for their copies; without a host rate nothing goes to the host
    assert layer_split(0.4, 1.0, 2 * MIXTRAL_EXPERT, MIXTRAL_EXPERT, LINK, 0.0, "on") == \
        (0, pytest.approx(0.4 * 2 * MIXTRAL_EXPERT / LINK))
    assert supported("mixtral") and supported("llama4_text") and not supported("gpt_oss")


@pytest.mark.parametrize("mode", ["off", "auto", "on"])
def test_plan_predicts_with_the_host_share(mode: str, capsys) -> None:
    from overspill import cli

    args = ["plan", "mixtral-8x7b", "--gpu-memory", "24GiB", "--context", "256", "--profile", "h100-pcie5"]
    assert cli.main(args + ["--cpu-experts", mode, "--json"]) == 0
    import json

    plan = json.loads(capsys.readouterr().out)
    plan = plan.get("plan", plan)
    tok_s = plan["prediction"]["decode_tok_s"]
    assert cli.main(args + ["--cpu-experts", "off", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    plain = plain.get("plan", plain)
    if mode == "off":
        assert tok_s == plain["prediction"]["decode_tok_s"]
    else:  # fewer bytes cross: the host computes misses (on the reference H100: 5.16 auto, 4.14 on vs 2.80)
        assert tok_s > 1.4 * plain["prediction"]["decode_tok_s"]
        assert plan["streamed_bytes_per_step"] < plain["streamed_bytes_per_step"]
    assert cli.main(args[:-2] + ["--profile", "h100-pcie5"]) == 0
    assert "experts+cpu" in capsys.readouterr().out


def test_plan_refuses_on_as_load_does(capsys) -> None:
    from overspill import cli
    from overspill.planning.host_experts import refusal

    assert cli.main(["plan", "llama-3-8b", "--profile", "h100-pcie5", "--gpu-memory", "6GiB", "--cpu-experts", "on"]) == 1
    assert "no routed experts" in capsys.readouterr().err
    assert cli.main(["plan", "mixtral-8x7b", "--profile", "h100-pcie5", "--gpu-memory", "24GiB", "--cpu-experts", "on",
                     "--moe-streaming", "dense"]) == 1
    assert "--moe-streaming dense" in capsys.readouterr().err
    assert "gpt_oss's experts" in refusal("on", "gpt_oss", True, True, None)
    assert refusal("auto", "llama", False, False, None) is None
