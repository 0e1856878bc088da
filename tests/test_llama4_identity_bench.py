"""bench/llama4_identity.py --smoke on the CPU: every way of computing the selected experts, the shipped routed
block among them, equals transformers' Llama 4 MoE block bit for bit here, and the cut Scout decodes the
resident model's tokens with its layers streamed dense and expert by expert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_records_every_way_and_the_whole_model(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "llama4_identity.py"), "--smoke", "--tokens", "1", "8",
                          "--repeats", "1", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = tmp_path.glob("llama4-identity-*.json")
    record = json.loads(path.read_text())
    ways = {(r["reduced_precision_reduction"], r["tokens"], r["way"]) for r in record["results"]}
    names = {"module", "routed", "bmm1", "mm", "bmm2", "bmm4", "bmm8", "bmm16", "entry", "window"}
    assert ways == {(reduced, t, w) for reduced in (True, False) for t in (1, 8) for w in names}
    assert all(r["identical"] and r["max_abs_diff"] == 0 and r["call_s"] > 0 for r in record["results"])
    whole = {(r["way"], r["batch"]): r for r in record["whole"]}
    assert set(whole) == {(w, b) for w in ("resident", "dense", "experts") for b in (1, 8)}
    assert all(r["identical_to_resident"] and len(r["tokens"]) == r["batch"] for r in whole.values())
    assert whole["resident", 1]["streamed_layers"] == 0
    assert whole["dense", 1]["streamed_layers"] > 0 and whole["dense", 1]["moe_streaming"] == "dense"
    assert whole["experts", 1]["streamed_layers"] > 0 and whole["experts", 1]["moe_streaming"] == "experts"
    assert record["command"].startswith("bench/llama4_identity.py --smoke")
