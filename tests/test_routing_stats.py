"""Expected expert bytes per step from routing statistics (`planning.routing`, issue 17 item 5), and the
runtime's measured routing fed back to the planner (`runtime.routing`).

Planning tests are pure Python over shipped configs; the end-to-end tests load tiny random MoE models
with expert-aware streaming on the CPU, as tests/test_moe.py does.
"""

from __future__ import annotations

import math
import warnings

import pytest

from overspill.planning import moe
from overspill.planning.configs import shipped_config
from overspill.planning.plan import Workload, footprint_from_spec
from overspill.planning.profile import REFERENCE_PROFILES
from overspill.planning.routing import PRIOR_TOKENS, RoutingStats, selection_probs, traffic
from overspill.planning.spec import spec_from_config

GiB = 2**30
H100 = REFERENCE_PROFILES["h100-pcie5"]
NAMES = ["mixtral-8x7b", "llama-4-scout-109b", "qwen3-30b-a3b", "deepseek-v3"]


def shape(name: str):
    spec = spec_from_config(shipped_config(name))
    return footprint_from_spec(spec), moe.MoeLayers.from_spec(spec)


def moe_layers_of(layers: moe.MoeLayers, count: int) -> tuple[int, ...]:
    return tuple(i for i in range(len(layers.num_experts)) if layers.num_experts[i])[:count]


def skewed(layers: moe.MoeLayers, streamed: tuple[int, ...], tokens: float, hot: float = 0.9) -> RoutingStats:
    """Every layer's expert 0 gets `hot` of the tokens; the rest of the k picks spread evenly."""
    rows = []
    for i in streamed:
        e, k = layers.num_experts[i], layers.active[i]
        rest = (k - hot) * tokens / (e - 1)
        rows.append((hot * tokens,) + (rest,) * (e - 1))
    return RoutingStats(streamed, (tokens,) * len(streamed), tuple(rows))


@pytest.mark.parametrize("name", NAMES)
def test_uniform_stats_reproduce_the_uniform_prior(name: str) -> None:
    _, layers = shape(name)
    streamed = moe_layers_of(layers, 6)
    uniform = RoutingStats.uniform(layers, streamed)
    least, total = moe.min_cache_slots(layers, streamed), moe.streamed_experts(layers, streamed)
    for slots in (least, least + 1, least + total // 3, total, total + 5):
        for batch in (1, 2, 8, 64):
            old = moe.expert_bytes_per_step(layers, streamed, slots, batch)
            assert abs(moe.expert_bytes_per_step(layers, streamed, slots, batch, uniform) - old) <= 1, (slots, batch)
            assert moe.expected_hit_rate(layers, streamed, slots, batch, uniform) == \
                pytest.approx(moe.hit_fraction(layers, streamed, slots), abs=1e-12)
    for t in traffic(layers, streamed, 0, 8, uniform):  # distinct experts: E (1 - (1 - k/E)^b)
        i = t.layer
        assert t.distinct == pytest.approx(moe.expected_distinct(layers.num_experts[i], layers.active[i], 8))


@pytest.mark.parametrize("name, budget", [("mixtral-8x7b", 24 * GiB), ("llama-4-scout-109b", 70 * GiB)])
def test_uniform_stats_reproduce_the_prediction_and_forecasts(name: str, budget: int) -> None:
    fp, layers = shape(name)
    w = Workload(4096, 1)
    plan = moe.experts_plan(fp, layers, budget, w, depth=2)
    uniform = RoutingStats.uniform(layers, plan.streamed_layers)
    old, new = moe.predict(fp, plan, layers, H100), moe.predict(fp, plan, layers, H100, stats=uniform)
    assert abs(new.streamed_bytes_per_step - old.streamed_bytes_per_step) <= 1
    assert new.prediction.decode_tok_s == pytest.approx(old.prediction.decode_tok_s, rel=1e-9)
    # the host's share of the misses too
    old, new = (moe.predict(fp, plan, layers, H100, "auto", s) for s in (None, uniform))
    assert new.prediction.decode_tok_s == pytest.approx(old.prediction.decode_tok_s, rel=1e-9)
    before = moe.forecasts(fp, layers, budget, w, 2, H100)
    every = RoutingStats.uniform(layers, tuple(range(len(fp.layer_bytes))))
    after = moe.forecasts(fp, layers, budget, w, 2, H100, stats=every)
    assert [(f.mode, f.batch) for f in before] == [(f.mode, f.batch) for f in after]
    for a, b in zip(before, after):
        assert abs(a.bytes_per_step - b.bytes_per_step) <= 1 and a.tok_s == pytest.approx(b.tok_s, rel=1e-9)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "llama-4-scout-109b"])
def test_skewed_routing_moves_fewer_bytes_and_hits_more(name: str) -> None:
    """One expert taking 90% of each layer's tokens: the hot slots keep it, so the same cache hits more
    and fewer bytes cross than the uniform prior says; batches select fewer distinct experts too."""
    _, layers = shape(name)
    streamed = moe_layers_of(layers, 8)
    stats = skewed(layers, streamed, 1e6)
    least = moe.min_cache_slots(layers, streamed)
    for slots in (least + 1, least + 4, least + 8):
        for batch in (1, 8):
            assert moe.expert_bytes_per_step(layers, streamed, slots, batch, stats) < \
                moe.expert_bytes_per_step(layers, streamed, slots, batch)
            assert moe.expected_hit_rate(layers, streamed, slots, batch, stats) > \
                moe.hit_fraction(layers, streamed, slots)
    # one hot slot per layer (8 extra slots, 8 layers): each layer's 90% expert is kept
    kept = moe.expected_hit_rate(layers, streamed, least + len(streamed), 1, stats)
    k = layers.active[streamed[0]]
    assert kept == pytest.approx(0.9 / k, rel=1e-3)
    uniform_distinct = sum(t.distinct for t in traffic(layers, streamed, 0, 8, None))
    assert sum(t.distinct for t in traffic(layers, streamed, 0, 8, stats)) < uniform_distinct


def test_skewed_routing_repredicts_a_faster_plan() -> None:
    """A plan placed under the prior, re-predicted under skewed measured routing: fewer bytes per step,
    at least as many tokens per second (forecasts too)."""
    fp, layers = shape("llama-4-scout-109b")
    w = Workload(4096, 1)
    plan = moe.experts_plan(fp, layers, 70 * GiB, w, depth=2)
    stats = skewed(layers, plan.streamed_layers, 1e6)
    prior, measured = moe.predict(fp, plan, layers, H100), moe.predict(fp, plan, layers, H100, stats=stats)
    assert measured.streamed_bytes_per_step < prior.streamed_bytes_per_step
    assert measured.prediction.decode_tok_s >= prior.prediction.decode_tok_s
    assert moe.moe_bytes_per_step(fp, plan, layers, stats) == measured.streamed_bytes_per_step
    for a, b in zip(moe.forecasts(fp, layers, 70 * GiB, w, 2, H100),
                    moe.forecasts(fp, layers, 70 * GiB, w, 2, H100, stats=stats)):
        if a.mode == "experts":
            assert b.bytes_per_step < a.bytes_per_step and b.tok_s >= a.tok_s
        else:  # dense streaming moves whole layers whatever the router does
            assert b == a


@pytest.mark.parametrize("stats_of", [lambda layers, s: None, lambda layers, s: skewed(layers, s, 1e5),
                                      lambda layers, s: skewed(layers, s, 50, hot=0.6)], ids=["prior", "skew", "few"])
def test_more_slots_never_move_more_bytes(stats_of) -> None:
    _, layers = shape("mixtral-8x7b")
    streamed = moe_layers_of(layers, 4)
    stats = stats_of(layers, streamed)
    least, total = moe.min_cache_slots(layers, streamed), moe.streamed_experts(layers, streamed)
    for batch in (1, 4, 16):
        sent = [moe.expert_bytes_per_step(layers, streamed, s, batch, stats) for s in range(least, least + total + 3)]
        assert all(a >= b for a, b in zip(sent, sent[1:])), (batch, sent)
        assert sent[-1] == 0  # every streamed expert has a hot slot (beyond one layer's working set)


def test_batch_growth_selects_more_distinct_experts() -> None:
    _, layers = shape("llama-4-scout-109b")
    streamed = moe_layers_of(layers, 3)
    for stats in (None, skewed(layers, streamed, 1e5), skewed(layers, streamed, 10, hot=0.3)):
        distinct = [sum(t.distinct for t in traffic(layers, streamed, 0, b, stats)) for b in (1, 2, 4, 8, 32, 256)]
        assert all(a < b for a, b in zip(distinct, distinct[1:])), distinct
        assert distinct[0] == pytest.approx(len(streamed) * layers.active[streamed[0]])  # one token: k a layer
        assert distinct[-1] <= len(streamed) * layers.num_experts[streamed[0]] + 1e-9


def test_few_tokens_shrink_toward_the_uniform_prior() -> None:
    """q = (routed + PRIOR_TOKENS k/E) / (tokens + PRIOR_TOKENS): a handful of tokens barely moves the
    prior, many tokens give the measured shares; the k picks are kept (sum q = k), each q within [0, 1]."""
    _, layers = shape("mixtral-8x7b")  # 8 experts, 2 per token: prior 0.25
    layer = moe_layers_of(layers, 1)[0]

    def q(tokens: float) -> tuple[float, ...]:  # every token picks experts 0 and 1
        stats = RoutingStats((layer,), (tokens,), ((tokens, tokens) + (0.0,) * 6,))
        return selection_probs(layers, layer, stats)

    few, many = q(4), q(1e7)
    assert few[0] == pytest.approx((4 + PRIOR_TOKENS * 0.25) / (4 + PRIOR_TOKENS))
    assert abs(few[0] - 0.25) < 0.03 and abs(few[7] - 0.25) < 0.01
    assert many[0] == pytest.approx(1.0, abs=1e-4) and many[7] == pytest.approx(0.0, abs=1e-4)
    assert q(PRIOR_TOKENS)[0] == pytest.approx((1 + 0.25) / 2)  # as many tokens as the prior: halfway
    for probs in (few, many, q(0)):
        assert math.fsum(probs) == pytest.approx(2.0) and all(0.0 <= p <= 1.0 for p in probs)
    assert q(0) == (0.25,) * 8  # nothing seen: the prior
    assert selection_probs(layers, layer, None) == (0.25,) * 8
    with pytest.raises(ValueError, match="experts"):
        selection_probs(layers, layer, RoutingStats((layer,), (1.0,), ((1.0, 1.0),)))


# --- end to end on the CPU: the runtime counts what the router saw ---------------------------------------

torch = pytest.importorskip("torch")

import overspill  # noqa: E402 - after the torch check
from overspill.errors import OverspillError  # noqa: E402
from overspill.runtime.loader import decoder_layers  # noqa: E402
from overspill.runtime.routing import (ExpertCounters, decode_traffic, measured_moe_plan,  # noqa: E402
                                       measured_moe_prediction, routing_stats)
from test_moe import CONTEXT, GEN, LAYERS, config, experts_plan, prompts, shapes  # noqa: E402


def tiny(arch: str, path) -> str:
    """A seeded tiny random checkpoint of `arch` (tests/test_moe.py's configs) saved under `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_config(config(arch), dtype=torch.float32).save_pretrained(str(path))
    return str(path)


def router_counts(model, streamed: tuple[int, ...]) -> dict[int, list]:
    """Forward hooks on each streamed layer's router counting what it picked: {layer: [tokens, per-expert
    counts]} (transformers' routers return (logits, scores, indices [tokens, k]); Llama 4's (scores
    [tokens, E], zero where not picked, logits))."""
    _, layers = decoder_layers(model)
    seen: dict[int, list] = {}
    for i in streamed:
        for module in layers[i].modules():
            if not type(module).__name__.endswith("Router"):
                continue
            seen[i] = [0, torch.zeros(module.num_experts, dtype=torch.long)]

            def hook(mod, args, out, i=i, experts=module.num_experts):
                if len(out) == 3:
                    picked, tokens = torch.bincount(out[2].reshape(-1), minlength=experts), out[2].shape[0]
                else:
                    picked, tokens = (out[0] != 0).sum(dim=0), out[0].shape[0]
                seen[i][0] += tokens
                seen[i][1] += picked

            module.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "llama4_text", "deepseek_v3"])
def test_runtime_counts_the_router_and_repredicts(arch: str, tmp_path) -> None:
    """After `generate` the cache's stats hold exactly what each streamed MoE layer's router saw and
    picked; the plan re-predicted from them is finite."""
    plan = experts_plan(arch, resident=1, warm=False)
    model, _ = overspill.load(tiny(arch, tmp_path), plan=plan, dtype="float32", context=CONTEXT, batch=2,
                              progress=False)
    _, layers = shapes(arch)
    streamed = tuple(i for i in plan.streamed_layers if layers.num_experts[i])
    assert streamed and max(streamed) < LAYERS - 1
    hooks = router_counts(model, streamed)
    assert set(hooks) == set(streamed)
    before = routing_stats(model)
    assert before.layers == streamed and set(before.tokens) == {0.0}  # served layers, nothing routed yet
    single, batch, mask = prompts()
    start = ExpertCounters.of(model)
    model.generate(single, **GEN)
    model.generate(batch, attention_mask=mask, **GEN)
    stats = routing_stats(model)
    k = layers.active[streamed[0]]
    # per sequence the prompt and every new token but the last; padded positions are routed too
    expected = single.shape[1] + GEN["max_new_tokens"] - 1 + 2 * (batch.shape[1] + GEN["max_new_tokens"] - 1)
    for i, tokens, routed in zip(stats.layers, stats.tokens, stats.routed):
        assert tokens == hooks[i][0] == expected
        assert sum(routed) == tokens * k
        assert list(routed) == [float(n) for n in hooks[i][1].tolist()]  # each expert's count, as picked
    # no probe on the CPU: bytes re-predicted; the prediction with a given profile
    again = measured_moe_plan(model)
    assert again.prediction is None and again.streamed_bytes_per_step > 0
    with pytest.raises(OverspillError, match="profile"):
        measured_moe_prediction(model)
    pred = measured_moe_prediction(model, profile=H100)
    assert math.isfinite(pred.decode_tok_s) and pred.decode_tok_s > 0 and math.isfinite(pred.decode_step_s)
    seen = decode_traffic(model, start, 2 * GEN["max_new_tokens"])
    assert 0.0 <= seen.hit_rate <= 1.0 and seen.measured > 0 and seen.planned > 0 and seen.predicted > 0
    assert seen.predicted_tok_s is None


def test_dense_models_have_no_measured_routing(tmp_path) -> None:
    budget = experts_plan("mixtral", 0, warm=False, batch=1).device_bytes * 4
    model, _ = overspill.load(tiny("mixtral", tmp_path), gpu_memory=budget, dtype="float32", context=CONTEXT,
                              progress=False, moe_streaming="dense")
    assert routing_stats(model) is None and ExpertCounters.of(model) is None
    with pytest.raises(OverspillError, match="streams no experts"):
        measured_moe_prediction(model, profile=H100)


def test_run_prints_the_routing_line(tmp_path, capsys) -> None:
    """`overspill run` on an expert-streamed model: one line with the hit rate and the three byte counts."""
    import argparse

    from overspill.run import run

    budget = experts_plan("mixtral", 0, warm=False, batch=1).device_bytes
    run(argparse.Namespace(model=tiny("mixtral", tmp_path), gpu_memory=budget, dtype="float32", random_weights=False,
                           depth=2, context=CONTEXT, device=None, seed=0, kv_gpu_memory=None, moe_streaming="experts",
                           prompt="hello there", max_new_tokens=6, no_chat_template=True))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("expert routing:")]
    assert len(lines) == 1
    assert all(part in lines[0] for part in ("cache hits in decode", "measured", "planned (uniform routing)",
                                             "re-predicted from measured routing"))


def test_server_metrics_gauge_the_hit_rate_and_repredicted_speed(tmp_path) -> None:
    """The server's expert gauges read the cache and the re-predicted plan at each scrape (0 tok/s where
    nothing was probed, as on the CPU)."""
    from overspill.serving.metrics import Metrics

    model, _ = overspill.load(tiny("mixtral", tmp_path), plan=experts_plan("mixtral", 1, warm=False),
                              dtype="float32", context=CONTEXT, batch=2, progress=False)
    metrics = Metrics([], model.overspill.plan.streamed_bytes_per_step, None)
    metrics.watch_experts(model)
    model.generate(prompts()[0], **GEN)

    def value(gauge) -> float:  # one gauge's scrape (the engine's own gauges need a running engine)
        return next(iter(gauge.collect())).samples[0].value

    assert value(metrics.expert_hit_rate) == model.overspill.experts.hit_rate > 0
    assert value(metrics.measured_routing_tok_s) == 0.0
