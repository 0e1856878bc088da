"""bench/cpu_rank.py --smoke on the CPU: plain streaming, then the same placed model split at 0.8
of each streamed layer: identical greedy tokens and logits, only the GPU share in the ring, the
worker's time recorded, the GEMV forms timed, and the chart written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_records_plain_and_split_runs(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_rank.py"), "--smoke", "--new-tokens", "6",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (record_path,) = tmp_path.glob("cpu-rank-smoke-*-bf16-*.json")
    assert record_path.with_suffix(".png").exists()
    record = json.loads(record_path.read_text())
    plain, split = record["runs"]
    assert split["fraction"] == 0.8 and split["share"] == {"kv_heads": 1, "mlp_cols": 127}  # MLP columns first
    assert split["gpu_share_bytes_per_step"] < record["streamed_bytes_per_step"]
    assert split["logits_vs_plain"]["greedy_agreement"] == 1.0 and split["logits_vs_plain"]["max_abs_diff"] < 1e-4
    assert split["joins"] == 2 * 4 * 6 and split["worker_busy_s_per_step"] > 0  # 2 joins x 4 layers x 6 passes
    assert split["speedup_vs_plain"] > 0 and plain["decode_tok_s"] > 0
    assert set(record["gemv_forms_params_s"]) >= {"old_probe", "linear_worker_threads_warm"}
    assert record["command"].startswith("bench/cpu_rank.py --smoke")


def test_smoke_with_int8_host_weights(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_rank.py"), "--smoke", "--new-tokens", "4",
                          "--host-format", "int8", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (record_path,) = tmp_path.glob("cpu-rank-smoke-*-int8-*.json")
    split = json.loads(record_path.read_text())["runs"][1]
    assert split["name"] == "CPU rank (int8)" and split["logits_vs_plain"]["min_cosine"] > 0.99


def test_host_threads_smoke_times_main_and_worker_under_each_wait_policy(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "host_threads.py"), "--smoke", "--threads", "1", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (record_path,) = tmp_path.glob("host-threads-smoke-*.json")
    record = json.loads(record_path.read_text())
    assert set(record["policies"]) == {"default", "PASSIVE", "ACTIVE"}
    for points in record["policies"].values():
        assert "1" in points and all(p["main_g"] > 0 and p["worker_g"] > 0 for p in points.values())
