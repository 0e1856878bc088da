"""The speculation planner: a verify pass's cost from the plan's prediction, fitted online, and
`overspill plan --speculate` (table, JSON, one-line errors). Pure Python: no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from overspill import cli
from overspill.planning.costmodel import Prediction
from overspill.planning.speculation import (
    PassCost, PassCostFit, best_chain, check_source, expected_tokens, fit_pass_cost, forecast, plan_pass_cost,
    plan_speculation, verify_pass_cost,
)

from test_plan_cli import one_line_error, plan


def _prediction(step: float, link: float, gpu: float, host: float, overlapped_gpu: float = 0.0) -> Prediction:
    return Prediction(decode_step_s=step, decode_tok_s=1 / step, link_s=link, gpu_s=gpu, kv_s=0.0, host_s=host,
                      bottleneck="link", link_floor_tok_s=1 / link if link else None, prefill_tok_s=1e4,
                      cpu_only_tok_s=1.0, overlapped_gpu_s=overlapped_gpu)


# 8B shape at 6 GiB on the H200, as `bench/speculative.py` printed the plan (link 189.7 ms, GPU 3.9 ms,
# host 19.9 ms per step), and what it measured: a plain pass 193.7 ms, serial verify runs.
H200_8B = _prediction(0.1937, 0.1897, 0.0039, 0.0199)
MEASURED = [  # (tokens per pass, mean drafted chain, measured tok/s) of the serial oracle runs
    (3.6154, 7.846, 16.300),  # acceptance 0.8, chain 8
    (2.0435, 7.739, 9.036),  # acceptance 0.6, chain 8
]


def test_serial_pass_adds_a_decode_steps_gpu_compute_per_token():
    cost = verify_pass_cost(0.2, gpu_token_s=0.004, host_token_s=0.02, marginal_token_s=1e-5, serial=True)
    assert cost.pass_seconds(1) == pytest.approx(0.2)  # one token: the plain step
    assert cost.pass_seconds(9) == pytest.approx(0.2 + 8 * 0.004)
    assert cost.pass_seconds(20) == pytest.approx(20 * 0.02)  # past 10 tokens the host's dispatch bounds it
    batched = verify_pass_cost(0.2, 0.004, 0.02, 1e-5, serial=False)
    assert batched.pass_seconds(9) == pytest.approx(0.2 + 8e-5) and batched.dispatch_per_token_s == 0


def test_a_graphed_serial_pass_costs_no_dispatch_per_token():
    """A graphed verify pass is one replay: only the GPU's compute grows with its tokens."""
    eager = verify_pass_cost(0.2, gpu_token_s=0.004, host_token_s=0.02, marginal_token_s=1e-5, serial=True)
    graphed = verify_pass_cost(0.2, 0.004, 0.02, 1e-5, serial=True, graphed=True)
    assert graphed.dispatch_per_token_s == 0 and graphed.pass_seconds(20) == pytest.approx(0.2 + 19 * 0.004)
    assert graphed.pass_seconds(20) < eager.pass_seconds(20)
    fast = plan_speculation(H200_8B, 7.5e9, 780e12, "ngram", 0.9, serial=True, graphed=True)
    slow = plan_speculation(H200_8B, 7.5e9, 780e12, "ngram", 0.9, serial=True)
    assert fast.best.tok_s > slow.best.tok_s and fast.best.chain >= slow.best.chain


@pytest.mark.parametrize("tokens_per_pass, chain, measured", MEASURED)
def test_serial_forecast_is_within_15_percent_of_the_measured_h200_runs(tokens_per_pass, chain, measured):
    """With the measured tokens per pass (acceptance noise aside), the pass cost alone predicts the speed."""
    cost = plan_pass_cost(H200_8B, active_params=7.5e9, matmul_flops_s=780e12, serial=True)
    predicted = tokens_per_pass / cost.pass_seconds(chain + 1)
    assert abs(measured / predicted - 1) < 0.15
    flat = PassCost(H200_8B.decode_step_s)  # last session's forecast: no per-token term
    assert measured / (tokens_per_pass / flat.pass_seconds(chain + 1)) < 0.88


# CUDA-graphed serial verification on an H100 at 5638238 (bench/results/speculative-llama-3-*-2026120711*.json and
# -115454.json), as the bench printed each plan: (link, GPU, host per step; streamed layers' share of the GPU time
# by their count, the head counted as ~1.2 and ~2.4 layers), the graphed verify passes measured over 1, 9 and 17
# tokens, and the oracle runs (tokens per pass, mean chain, tok/s)
H100_GRAPHED = {
    "70b-76GiB": (_prediction(1.1424, 1.1424, 0.0466, 0.0585, 0.0466 * 37 / 81.2), {1: 1.1448, 9: 1.3381, 17: 1.5878},
                  [(3.958, 7.583, 2.884), (9.4, 13.2, 6.195), (3.357, 7.214, 2.54)]),
    "8b-6GiB": (_prediction(0.1889, 0.1889, 0.0050, 0.0242, 0.0050 * 24 / 34.4), {1: 0.1902, 9: 0.1975, 17: 0.2213},
                [(3.938, 7.625, 19.827), (7.875, 13.0, 36.375)]),
}


@pytest.mark.parametrize("shape", H100_GRAPHED)
def test_graphed_serial_passes_add_the_resident_layers_compute_per_token(shape):
    """The link hides the streamed layers' compute of a serial pass: each token adds the resident layers' (and the
    head's) GPU time, which predicts the measured passes and oracle speeds within 15%, where charging the whole
    step's GPU time missed the 70B chains of 16 by 16%."""
    prediction, passes, runs = H100_GRAPHED[shape]
    cost = plan_pass_cost(prediction, active_params=7e10, matmul_flops_s=7.5e14, serial=True, graphed=True)
    for tokens, seconds in passes.items():
        assert abs(cost.pass_seconds(tokens) / seconds - 1) < 0.05
    whole = verify_pass_cost(prediction.decode_step_s, prediction.gpu_s, prediction.host_s, 0.0, True, graphed=True)
    for tokens_per_pass, chain, measured in runs:
        assert abs(measured / (tokens_per_pass / cost.pass_seconds(chain + 1)) - 1) < 0.15
    misses = [measured / (tokens / whole.pass_seconds(chain + 1)) for tokens, chain, measured in runs]
    assert shape != "70b-76GiB" or max(misses) > 1.15


def test_a_serial_pass_costs_at_least_the_gpus_compute_per_token():
    """Hidden streamed compute cannot make a pass cheaper than n steps of the GPU's whole compute."""
    cost = verify_pass_cost(0.1, gpu_token_s=0.05, host_token_s=0.0, marginal_token_s=0.0, serial=True,
                            graphed=True, hidden_token_s=0.04)
    assert cost.pass_seconds(2) == pytest.approx(0.11) and cost.pass_seconds(10) == pytest.approx(0.5)
    expanding = verify_pass_cost(0.1, 0.05, 0.0, 0.0, serial=True, graphed=True, hidden_token_s=0.04, expand_s=0.03)
    assert expanding.compute_per_token_s == pytest.approx(0.02)  # encoded layers expand once a pass, not a token


def test_a_resident_model_gains_nothing_from_serial_verification():
    """Nothing streams: a serial pass over n tokens costs n plain steps, so drafting cannot pay."""
    cost = plan_pass_cost(_prediction(0.02, 0.0, 0.02, 0.01), 1e9, 1e14, serial=True)
    for k in (1, 4, 16):
        assert forecast(cost, 0.9, k).speedup <= 1.0 + 1e-9
    assert best_chain(cost, 0.9) == 1


def test_plan_speculation_forecasts_every_chain_and_picks_the_fastest():
    s = plan_speculation(H200_8B, 7.5e9, 780e12, "ngram", 0.8, serial=True, max_chain=16)
    assert [f.chain for f in s.forecasts] == list(range(17))
    assert s.forecasts[0].speedup == pytest.approx(1.0)
    assert s.best.tok_s == max(f.tok_s for f in s.forecasts)
    assert s.forecasts[3].tokens_per_pass == pytest.approx(expected_tokens(0.8, 3))
    d = s.to_dict()
    assert d["acceptance_assumed"] is True and d["verify"] == "serial" and d["best_chain"] == s.best.chain
    with pytest.raises(ValueError, match="unknown speculate source"):
        plan_speculation(H200_8B, 7.5e9, 780e12, "medusa", 0.8, serial=True)
    with pytest.raises(ValueError, match="acceptance"):
        plan_speculation(H200_8B, 7.5e9, 780e12, "ngram", 1.5, serial=True)


def test_fit_recovers_a_linear_pass_cost_and_scales_the_prior_on_one_point():
    fitted = fit_pass_cost([(n, 0.19 + 0.004 * n) for n in (1, 5, 9, 17)])
    assert fitted.base_s == pytest.approx(0.19) and fitted.per_token_s == pytest.approx(0.004)
    noisy = fit_pass_cost([(1, 0.2), (9, 0.199)])  # a flat pass tilted by noise: slope floored at 0
    assert noisy.per_token_s == 0.0
    prior = PassCost(1.0, 0.1)
    scaled = fit_pass_cost([(3, 0.26), (3, 0.26)], prior)  # one token count: the prior's shape, scaled
    assert scaled.pass_seconds(3) == pytest.approx(0.26) and scaled.per_token_s / scaled.base_s == pytest.approx(0.1)
    assert fit_pass_cost([], prior) is prior


def test_online_fit_counts_drafting_and_forgets_old_passes():
    fit = PassCostFit(PassCost(1.0), window=4)
    for n in (1, 2, 3, 4):
        fit.add(n, 0.1 * n, drafted=n - 1, draft_seconds=0.001 * (n - 1))
    cost = fit.cost()
    assert cost.per_token_s == pytest.approx(0.1) and cost.draft_per_token_s == pytest.approx(0.001)
    for _ in range(4):
        fit.add(5, 2.0)
    assert fit.passes == [(5, 2.0)] * 4  # the window dropped the first four


def test_check_source_names_the_accepted_sources():
    check_source("ngram")
    check_source("draft:/models/tiny")
    for bad in ("draft:", "self", ""):
        with pytest.raises(ValueError, match="'ngram' or 'draft:PATH'"):
            check_source(bad)


def test_plan_speculate_prints_the_forecast_and_the_best_chain(capsys):
    code, out, _ = plan(capsys, "llama-3-8b", "--gpu-memory", "6GiB", "--profile", "h100-pcie5",
                        "--speculate", "ngram", "--acceptance", "0.8", "--max-chain", "12")
    assert code == 0
    assert "acceptance 0.80 per drafted token is an ASSUMPTION" in out
    assert "serial verify" in out and "chain k | tokens/pass" in out
    assert "best chain:" in out and "x plain" in out
    assert "\n12 " in out and "\n16 " not in out  # rows stop at --max-chain


def test_plan_speculate_json_carries_the_forecast(capsys):
    code, out, _ = plan(capsys, "llama-3-8b", "--gpu-memory", "6GiB", "--profile", "h100-pcie5",
                        "--speculate", "ngram", "--json")
    assert code == 0
    spec = json.loads(out)["speculation"]
    assert spec["source"] == "ngram" and spec["acceptance"] == 0.7 and spec["acceptance_assumed"] is True
    assert len(spec["chains"]) == 17 and spec["chains"][spec["best_chain"]]["tok_s"] == spec["best_tok_s"]
    assert spec["pass_cost"]["per_token_s"] > 0 and spec["pass_cost"]["dispatch_per_token_s"] > 0
    code, out, _ = plan(capsys, "llama-3-8b", "--gpu-memory", "6GiB", "--profile", "h100-pcie5", "--json")
    assert "speculation" not in json.loads(out)


@pytest.mark.parametrize("args, words", [
    (["--speculate", "medusa"], ["--speculate", "medusa", "'ngram', 'self' or 'draft:PATH'"]),
    (["--speculate", "ngram", "--acceptance", "1.2"], ["--acceptance", "[0, 1]"]),
    (["--acceptance", "5"], ["--acceptance", "[0, 1]"]),  # wrong without --speculate too
    (["--speculate", "ngram", "--max-chain", "0"], ["--max-chain"]),
    (["--max-chain", "-3"], ["--max-chain"]),
    (["--speculate", "ngram", "--batch", "4"], ["batch-1", "--batch 4"]),
])
def test_plan_speculate_refuses_bad_input_in_one_line(capsys, args, words):
    code, out, err = plan(capsys, "llama-3-8b", "--profile", "h100-pcie5", *args)
    line = one_line_error(code, out, err)
    for word in words:
        assert word in line, (word, line)


def test_help_documents_every_new_flag():
    parser = cli._build_parser()
    commands = next(a for a in parser._subparsers._group_actions).choices
    for command, flags in (("plan", ["--speculate", "--acceptance", "--max-chain"]),
                           ("serve", ["--speculate"]), ("batch", ["--speculate"])):
        text = commands[command].format_help()
        for flag in flags:
            assert flag in text, (command, flag)
    assert "ASSUMES" in commands["plan"].format_help()


def test_cli_defaults_come_from_one_torch_free_module():
    """The parser reads the serving defaults without importing torch or pydantic."""
    code = ("import sys; from overspill import cli; p = cli._build_parser(); "
            "a = p.parse_args(['serve']); b = p.parse_args(['batch', 'i', 'o']); "
            "from overspill.serving import defaults as d; "
            "assert (a.max_batch, a.max_queue, a.max_new_tokens_limit, a.port) == "
            "(d.DEFAULT_MAX_BATCH, d.DEFAULT_MAX_QUEUE, d.DEFAULT_MAX_NEW_TOKENS_LIMIT, d.DEFAULT_PORT); "
            "assert b.max_batch == d.DEFAULT_MAX_BATCH and a.speculate is None; "
            "bad = [m for m in ('torch', 'pydantic', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_plan_counts_a_draft_models_bytes_as_load_does(capsys, tiny_checkpoint):
    # `plan --speculate draft:PATH` places the model under the budget less the draft's weights and KV, and
    # says so; a draft that does not fit is one line.
    from overspill.planning.spec import spec_from_config
    from overspill.planning.speculation import draft_model_bytes
    from overspill.runtime.sources import resolve

    path = str(tiny_checkpoint("llama"))
    args = ["llama-3-8b", "--profile", "h100-pcie5", "--gpu-memory", "6GiB", "--context", "4096", "--json"]
    code, out, _ = plan(capsys, *args)
    alone = json.loads(out)["plan"]
    code, out, _ = plan(capsys, *args, "--speculate", f"draft:{path}")
    with_draft = json.loads(out)["plan"]
    code, table, _ = plan(capsys, *args[:-1], "--speculate", f"draft:{path}")
    assert code == 0 and "its memory comes out of the budget above" in table
    draft = draft_model_bytes(spec_from_config(resolve(path, config_only=True).config(), "bfloat16"), 4096)
    assert code == 0 and with_draft["budget_bytes"] == alone["budget_bytes"] - draft
    assert any(n.startswith(f"draft model {path}: ") for n in with_draft["notes"])
    one_line_error(*plan(capsys, "llama-3-8b", "--profile", "h100-pcie5", "--gpu-memory", "100KiB",
                         "--speculate", f"draft:{path}"), "draft model", "more than the")
    one_line_error(*plan(capsys, "llama-3-8b", "--profile", "h100-pcie5", "--speculate", "draft:/nonexistent/draft"),
                   "/nonexistent/draft", "draft model")


def test_plan_speculate_self_places_the_draft_as_load_does(capsys):
    # `plan --speculate self` places the model beside the int4 draft `plan_self_draft` chooses (as `load`
    # does) and forecasts with the draft's token cost; serve's sources stay 'ngram' and 'draft:PATH'.
    from overspill.planning.plan import Workload, footprint_from_spec
    from overspill.planning.profile import REFERENCE_PROFILES
    from overspill.planning.self_draft import Machine, plan_self_draft
    from overspill.planning.configs import shipped_config
    from overspill.planning.spec import spec_from_config

    code, out, _ = plan(capsys, "llama-3-8b", "--gpu-memory", "12GiB", "--profile", "h100-pcie5", "--context", "4096",
                        "--speculate", "self", "--json")
    assert code == 0
    shown = json.loads(out)
    profile = REFERENCE_PROFILES["h100-pcie5"]
    fp = footprint_from_spec(spec_from_config(shipped_config("llama-3-8b")))
    # layout auto spreads the streamed layers where drafts are verified, as `load` does
    draft, placed = plan_self_draft(fp, 12 * 2**30, Workload(4096, 1, spread=True), 2, None, False,
                                    Machine(profile.h2d_bytes_s, profile.hbm_bytes_s, profile.layer_overhead_s))
    assert shown["plan"]["layer_tiers"] == [t.value for t in placed.layer_tiers]
    assert any(n.startswith("self draft: ") for n in shown["plan"]["notes"])
    assert shown["speculation"]["source"] == "self" and shown["speculation"]["pass_cost"]["draft_per_token_s"] > 0
    code, out, _ = plan(capsys, "llama-3-8b", "--gpu-memory", "12GiB", "--profile", "h100-pcie5", "--speculate", "self")
    assert code == 0 and "speculative decoding (self)" in out and "best chain" in out


def test_plan_speculate_with_cuda_graphs_forecasts_graphed_passes_only_where_load_graphs(capsys):
    """`--cuda-graphs`: a graphed verify pass has no per-token dispatch, so more chain pays; a plan with
    host-tier KV is not graphed by `load`, so its forecast is the eager one."""
    base = ("llama-3-8b", "--gpu-memory", "6GiB", "--profile", "h100-pcie5", "--speculate", "ngram",
            "--acceptance", "0.8", "--json")

    def best(*extra: str) -> float:
        code, out, _ = plan(capsys, *base, *extra)
        assert code == 0
        return json.loads(out)["speculation"]["best_tok_s"]

    assert best("--cuda-graphs") > best()
    host_kv = ("--kv-gpu-memory", "256MiB", "--context", "4096")
    assert best(*host_kv, "--cuda-graphs") == best(*host_kv)
