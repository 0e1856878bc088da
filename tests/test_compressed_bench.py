"""bench/compressed.py --smoke on the CPU: one record per format, lossless tokens equal bf16's, encoded
formats send fewer bytes per step, and the chart is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_records_every_format(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compressed.py"), "--smoke", "--new-tokens", "6",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (record_path,) = tmp_path.glob("compressed-smoke-*.json")
    assert record_path.with_suffix(".png").exists()
    record = json.loads(record_path.read_text())
    runs = {r["format"]: r for r in record["runs"]}
    assert set(runs) == {"bf16", "lossless", "int8", "fp8", "int4"}
    assert runs["lossless"]["tokens_identical_to_bf16"] is True
    base = runs["bf16"]["streamed_bytes_per_step"]
    for fmt in ("lossless", "int8", "fp8", "int4"):
        assert runs[fmt]["streamed_bytes_per_step"] < base and runs[fmt]["expand_s_per_layer"] > 0
        assert runs[fmt]["speedup_vs_bf16"] > 0
    assert runs["int4"]["streamed_bytes_per_step"] < runs["int8"]["streamed_bytes_per_step"]
    assert record["command"].startswith("bench/compressed.py --smoke")
