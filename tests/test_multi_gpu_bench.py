"""bench/multi_gpu.py --smoke on the CPU: 1 and 2 gloo ranks of a 16-layer tiny llama under the same
per-rank budget, batches 1 and 2: each rank streams part of its span, the tokens of 2 ranks equal
1 rank's, and the record carries the spans, bytes and ratios (the timings measure nothing on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_records_one_and_two_ranks(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "multi_gpu.py"), "--smoke", "--new-tokens", "6",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.glob("multi-gpu-smoke-*-1-2gpu-*.json")
    assert path.with_suffix(".png").exists()
    record = json.loads(path.read_text())
    assert record["command"].startswith("bench/multi_gpu.py --smoke") and record["backend"] == "gloo"
    one, two = record["results"]
    assert [one["gpus"], two["gpus"]] == [1, 2]
    assert [(r["start"], r["stop"]) for r in two["ranks"]] == [(0, two["ranks"][1]["start"]), (two["ranks"][1]["start"], 16)]
    for result in (one, two):
        for rank in result["ranks"]:
            assert 0 < rank["resident_layers"] < rank["layers"] and rank["streamed_bytes_per_step"] > 0
    assert one["ranks"][0]["hidden_bytes_sent"] == 0 and all(r["hidden_bytes_sent"] > 0 for r in two["ranks"])
    assert [r["batch"] for r in two["runs"]] == [1, 2]
    for run in two["runs"]:
        assert run["tokens_identical_to_1_gpu"] is True and run["speedup_vs_1_gpu"] > 0 and len(run["tokens"]) == 6
