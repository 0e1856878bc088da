"""bench/speculative.py's pass-cost fit: the line goes through the one-token pass, so the forecast's plain step
is the measured one and never 0 (a free intercept went below 0 on steep serial costs: ZeroDivisionError)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from speculative import fit  # noqa: E402


def test_fit_goes_through_the_one_token_pass_on_steep_serial_costs() -> None:
    cost = fit({1: 0.0041, 9: 0.0247, 17: 0.1937})
    assert cost.pass_seconds(1) == pytest.approx(0.0041)
    assert cost.per_token_s > 0 and cost.step_seconds(0) > 0


def test_fit_floors_a_negative_slope() -> None:
    cost = fit({1: 0.200, 8: 0.199, 64: 0.198})
    assert cost.per_token_s == 0 and cost.pass_seconds(64) == pytest.approx(0.200)


def test_tree_gains_pair_each_tree_with_the_chain_of_its_budget() -> None:
    from speculative_acceptance import tree_gains

    def run(mode, size, tpp, prompt="summarize", source="ngram"):
        return {"prompt": prompt, "source": source, "mode": mode, "size": size, "tokens_per_pass": tpp}

    runs = [run("chain", "8", 1.3), run("chain", "32", 1.4), run("tree", "32", 1.6), run("tree", "64", 1.7),
            run("chain", "32", 2.0, source="self"), run("tree", "32", 3.0, source="self")]
    gains = tree_gains(runs)
    assert [(g["source"], g["budget"]) for g in gains] == [("ngram", 32), ("self", 32)]  # tree 64 has no chain 64
    assert gains[0]["tree_over_chain"] == pytest.approx(1.6 / 1.4) and gains[1]["tree_over_chain"] == 1.5


def test_smoke_with_spread_loads_the_plan_again_and_records_its_runs(tmp_path) -> None:
    import json
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "speculative.py"), "--smoke", "--spread", "--points",
                          "0.8:4", "--new-tokens", "10", "--pass-k", "1", "4", "--serial-k", "1", "5", "--repeats", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    [path] = tmp_path.glob("speculative-smoke-*.json")
    record = json.loads(path.read_text())
    spread = record["spread"]
    assert spread["streamed_layers"] == [0, 2] and spread["plain_identical_to_prefix"]  # prefix streamed 0-1
    assert [(r["acceptance"], r["chain"], r["identical"]) for r in spread["runs"]] == [(0.8, 4, True)]
    assert set(spread["serial_pass_seconds"]) == {"1", "5"} and record["runs"][0]["identical"]


def test_smoke_with_graphs_runs_graphed_verify_passes_and_oracle_points(tmp_path) -> None:
    import json
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "speculative.py"), "--smoke", "--graphs", "--points",
                          "0.8:4", "--new-tokens", "10", "--pass-k", "1", "--serial-k", "1", "5", "--repeats", "1",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    [path] = tmp_path.glob("speculative-smoke-*.json")
    graphed = json.loads(path.read_text())["graphed"]
    assert graphed["plain_identical_to_eager"] and set(graphed["verify_pass_seconds"]) == {"1", "5"}
    assert [(r["acceptance"], r["chain"], r["identical"]) for r in graphed["runs"]] == [(0.8, 4, True)]
    assert graphed["graphs"] == 0 and graphed["eager_steps"] > 0  # the CPU runs the fixed-buffer steps eagerly


def test_smoke_graphs_only_skips_the_eager_runs(tmp_path) -> None:
    import json
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "bench" / "speculative.py"), "--smoke", "--graphs-only", "--points",
                          "0.9:4", "--new-tokens", "10", "--serial-k", "1", "5", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    [path] = tmp_path.glob("speculative-smoke-*.json")
    record = json.loads(path.read_text())
    assert "pass_seconds" not in record and record["runs"] == []
    graphed = record["graphed"]
    assert graphed["plain_identical_to_eager"] is None and graphed["runs"][0]["identical"]
    assert path.with_suffix(".png").exists()
