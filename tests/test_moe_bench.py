"""bench/moe.py --smoke on the CPU: a record per mode and batch, expert-aware tokens equal dense streaming's,
fewer link bytes per step, the expert cache's counters, and the chart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_records_dense_and_experts(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "moe.py"), "--smoke", "--new-tokens", "6",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (record_path,) = tmp_path.glob("moe-smoke-*.json")
    assert record_path.with_suffix(".png").exists()
    record = json.loads(record_path.read_text())
    runs = {(r["mode"], r["batch"]): r for r in record["runs"]}
    assert set(runs) == {("dense", 1), ("dense", 8), ("experts", 1), ("experts", 8)}
    for batch in (1, 8):
        dense, experts = runs["dense", batch], runs["experts", batch]
        assert experts["moe_streaming"] == "experts" and dense["moe_streaming"] == "dense"
        assert experts["tokens_identical_to_dense"] is True and experts["speedup_vs_dense"] > 0
        assert experts["link_bytes_per_step"] < dense["link_bytes_per_step"]
        assert experts["hits"] + experts["misses"] > 0 and 0 <= experts["hit_rate"] <= 1
        assert dense["expert_bytes"] == 0
        # re-predicted from measured routing: bytes for expert streaming; no tok/s without a GPU probe
        assert experts["predicted_link_bytes_per_token_measured_routing"] > 0
        assert dense["predicted_link_bytes_per_token_measured_routing"] is None
        assert experts["predicted_tok_s_measured_routing"] is None
    # a batch of 8 selects more experts per layer than one sequence
    assert runs["experts", 8]["expert_bytes"] / runs["experts", 8]["steps"] > \
        runs["experts", 1]["expert_bytes"] / runs["experts", 1]["steps"]
    assert record["command"].startswith("bench/moe.py --smoke") and "uniform" in record["routing"]


def run_bench(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "moe.py"), "--smoke", "--new-tokens", "4",
                           "--batches", "1", "2", "--out", str(out), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_dense_from_an_earlier_run(tmp_path: Path) -> None:
    """A shape whose two loads do not fit one device call: dense in one run, experts in the next with
    --dense-json, which gives speedup_vs_dense and compares tokens with the earlier run's (recorded)."""
    first = run_bench(tmp_path / "dense", "--modes", "dense")
    assert first.returncode == 0, first.stderr[-2000:]
    (dense_path,) = (tmp_path / "dense").glob("moe-smoke-*.json")
    dense = {r["batch"]: r for r in json.loads(dense_path.read_text())["runs"]}
    assert all(len(r["tokens"]) == b and len(r["tokens"][0]) == 4 for b, r in dense.items())
    second = run_bench(tmp_path / "experts", "--modes", "experts", "--dense-json", str(dense_path))
    assert second.returncode == 0, second.stderr[-2000:]
    (record_path,) = (tmp_path / "experts").glob("moe-smoke-*.json")
    record = json.loads(record_path.read_text())
    assert record["baseline_from"]["path"] == dense_path.name
    for run in record["runs"]:
        assert run["tokens_identical_to_dense"] is True
        assert run["speedup_vs_dense"] == run["decode_tok_s"] / dense[run["batch"]]["decode_tok_s"]
    other = json.loads(dense_path.read_text())
    other["model"] = "mixtral-8x7b"
    (tmp_path / "other.json").write_text(json.dumps(other))
    refused = run_bench(tmp_path / "refused", "--modes", "experts", "--dense-json", str(tmp_path / "other.json"))
    assert refused.returncode != 0 and "pass a baseline run of this shape and budget on this GPU" in refused.stderr


def test_depth_sets_the_ring(tmp_path: Path) -> None:
    """--depth reaches load: dense streaming of the smoke model (every layer streamed) has depth + 1 ring slots,
    and the record says which depth ran."""
    out = run_bench(tmp_path, "--modes", "dense", "--depth", "4")
    assert out.returncode == 0, out.stderr[-2000:]
    (record_path,) = tmp_path.glob("moe-smoke-*.json")
    record = json.loads(record_path.read_text())
    assert record["depth"] == 4
    assert {r["ring_slots"] for r in record["runs"]} == {5}


def test_spread_layers_interleaves_the_streamed_ones() -> None:
    """--spread's plan streams layer (i * N) // n of N for each of the n streamed layers, keeps every byte count,
    and is refused where layers differ in size or KV lives in host memory."""
    sys.path.insert(0, str(ROOT / "bench"))
    from smoke import spread_layers

    from overspill.planning.placement import streaming_plan
    from overspill.planning.plan import Footprint, Workload

    fp = Footprint(layer_bytes=(100,) * 12, embed_bytes=10, head_bytes=10, other_bytes=0, tied_embeddings=False,
                   kv_bytes_per_token=1, activation_bytes_per_token=1)
    plan = streaming_plan(fp, Workload(64, 1, activation_floor=0), 4)
    assert plan.streamed_layers == (0, 1, 2, 3)
    spread = spread_layers(plan, [100] * 12)
    assert spread.streamed_layers == (0, 3, 6, 9)
    assert (spread.device_bytes, spread.streamed_bytes_per_step, spread.slots) == \
        (plan.device_bytes, plan.streamed_bytes_per_step, plan.slots)
    assert spread_layers(plan, [100] * 11 + [50]) is None
    host_kv = streaming_plan(fp, Workload(64, 1, activation_floor=0), 4, kv_host=4)
    assert spread_layers(host_kv, [100] * 12) is None


def test_spread_runs_load_the_plan_again(tmp_path: Path) -> None:
    """--spread loads each mode's plan a second time (as a caller's plan) and labels those runs MODE@spread; their
    tokens equal dense streaming's."""
    out = run_bench(tmp_path, "--modes", "dense", "experts", "--spread")
    assert out.returncode == 0, out.stderr[-2000:]
    (record_path,) = tmp_path.glob("moe-smoke-*.json")
    runs = {(r["mode"], r["batch"]): r for r in json.loads(record_path.read_text())["runs"]}
    for b in (1, 2):
        spread = runs["experts@spread", b]
        assert spread["layout"] == "spread" and spread["moe_streaming"] == "experts"
        assert spread["streamed_layers"] == runs["experts", b]["streamed_layers"]
        assert spread["tokens_identical_to_dense"] is True
