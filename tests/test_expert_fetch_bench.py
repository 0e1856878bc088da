"""bench/expert_fetch.py on the CPU: --smoke's record (copy timed, the CUDA strategies skipped, a choice per
batch, the chart), and the strategies' bookkeeping run with plain copies: the sync-free gather, the in-place
reads and prefetch give copy's outputs bit for bit, and prefetch counts its hits, misses and wasted copies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_record(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "expert_fetch.py"), "--smoke", "--iters", "6",
                          "--warmup", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = tmp_path.glob("expert-fetch-smoke-*.json")
    assert path.with_suffix(".png").exists()
    record = json.loads(path.read_text())
    assert record["benchmark"] == "expert-fetch" and record["command"].startswith("bench/expert_fetch.py --smoke")
    assert "git_commit" in record and record["pinned_h2d_bytes_s"] is None
    assert record["shape"]["expert_bytes"] == 3 * 64 * 96 * 2 and "not measured" in record["prefetch_accuracy"]
    runs = {(r["strategy"], r["batch"]): r for r in record["runs"]}
    assert set(runs) == {(name, b) for name in ("copy", "zero_copy", "zero_copy_triton", "mapped_synced",
                                                  "prefetch_hit", "prefetch_miss") for b in (1, 8)}
    for b in (1, 8):
        copy = runs["copy", b]
        assert copy["identical_to_copy"] is True and copy["layers_timed"] == 6
        assert 0 < copy["median_ms"] <= copy["p90_ms"] and copy["effective_gb_s"] > 0
        assert copy["expert_bytes_read"] == copy["union_bytes"] > 0 and copy["fraction_of_copy_floor"] is None
        for name in ("zero_copy", "zero_copy_triton", "mapped_synced", "prefetch_hit", "prefetch_miss"):
            assert runs[name, b] == {"strategy": name, "batch": b, "skipped": "needs CUDA"}
        chosen = record["chosen"][str(b)]
        assert chosen["strategy"] == "copy" and chosen["why"].startswith("copy:")
        assert chosen["prefetch_break_even_hit_rate"] is None
    # top-2 of 8 experts: one token selects 2, eight tokens select more
    assert runs["copy", 1]["union_bytes"] == 2 * record["shape"]["expert_bytes"] < runs["copy", 8]["union_bytes"]
    assert "b=8 copy: median" in out.stdout


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    import expert_fetch

    return expert_fetch


@pytest.mark.parametrize("batch", [1, 2])
def test_strategies_agree_on_the_cpu(bench, batch: int) -> None:
    """Every strategy but the Triton gather runs on the CPU with plain copies (the host buffers stand in for
    their CUDA aliases): outputs equal copy's bit for bit; prefetch's counters follow its predictions."""
    import torch

    s = bench.SHAPES["smoke"]
    device = torch.device("cpu")
    ctx = bench.Ctx(s, bench.make_layers(s, device, 0), batch, 8, 2, batch, device)
    got = {"copy": bench.run_copy(ctx)}
    flats = [layer.flat for layer in ctx.layers]
    got["mapped_synced"] = bench.run_copy(ctx, mapped=flats)
    got["zero_copy"] = bench.run_gather(ctx, flats)
    got["prefetch_hit"] = bench.run_prefetch(ctx, ctx.sets)
    got["prefetch_miss"] = bench.run_prefetch(ctx, ctx.miss_sets)
    reference = got["copy"][1]
    assert len(reference) == 8 and any(bool(out.abs().sum()) for out in reference)
    for name, (times, outs, read, extra) in got.items():
        run = bench.summarize(ctx, name, (times, outs, read, dict(extra)), reference, None)
        assert run["identical_to_copy"] is True and run["outputs_finite"] is True, name
        assert len(times) == 8 and run["layers_timed"] == 6
    unions = [len(ctx.union(i)) for i in range(8)]
    assert got["copy"][2] == unions and got["mapped_synced"][2] == unions
    assert got["zero_copy"][2] == [ctx.cap] * 8 == [min(8, 2 * batch)] * 8  # padded to the most a batch selects
    timed = sum(unions[2:]) / 6
    hit = got["prefetch_hit"][3]
    assert (hit["hits_per_layer"], hit["misses_per_layer"], hit["wasted_per_layer"]) == (timed, 0, 0)
    assert got["prefetch_hit"][2][1:] == unions[1:] and got["prefetch_hit"][2][0] == unions[0]
    miss = got["prefetch_miss"][3]  # 8 experts leave room for predictions outside a union of at most 4
    assert miss["hits_per_layer"] == 0 and miss["misses_per_layer"] == timed and miss["wasted_per_layer"] > 0
    predicted = [len({e for chosen in layer for e in chosen}) for layer in ctx.miss_sets]
    assert got["prefetch_miss"][2][2:] == [p + u for p, u in zip(predicted[2:], unions[2:])]


def test_choice_and_break_even(bench) -> None:
    """The fastest strategy identical to copy is chosen; prefetch's break-even hit rate solves
    hit*t_hit + (1-hit)*t_miss = t_copy."""
    assert bench.break_even(4.0, 10.0, 5.0) == pytest.approx(5 / 6)
    assert bench.break_even(4.0, 4.5, 5.0) == 0.0 and bench.break_even(5.5, 10.0, 5.0) is None
    def run(name: str, ms: float, identical: bool = True) -> dict:
        return {"strategy": name, "batch": 1, "median_ms": ms, "identical_to_copy": identical, "outputs_finite": True}

    runs = [run("copy", 5.0), run("zero_copy", 4.5), run("mapped_synced", 3.0, identical=False),  # not identical: out
            {"strategy": "zero_copy_triton", "batch": 1, "error": "RuntimeError('no triton')"},
            run("prefetch_hit", 4.0), run("prefetch_miss", 10.0)]
    chosen = bench.choose(runs, 1)
    assert chosen["strategy"] == "zero_copy"
    assert chosen["prefetch_break_even_hit_rate"] == pytest.approx(5 / 6)
    assert chosen["prefetch_break_even_hit_rate_vs_chosen"] == pytest.approx(5.5 / 6)
    assert "0.83" in chosen["why"] and "0.92" in chosen["why"] and "not measured" in chosen["why"]
