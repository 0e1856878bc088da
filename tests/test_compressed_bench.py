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


def test_bf16_from_an_earlier_run(tmp_path: Path) -> None:
    """The 70B shape's formats take more than one device call: --bf16-json takes bf16's speed and tokens
    from the earlier run's JSON, so speedup_vs_bf16 and tokens_identical_to_bf16 still hold."""
    def bench(out: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "bench" / "compressed.py"), "--smoke", "--new-tokens", "4",
                               "--out", str(out), *args], capture_output=True, text=True, cwd=ROOT, timeout=600)

    first = bench(tmp_path / "bf16", "--formats", "bf16")
    assert first.returncode == 0, first.stderr[-2000:]
    (bf16_path,) = (tmp_path / "bf16").glob("compressed-smoke-*.json")
    (bf16,) = json.loads(bf16_path.read_text())["runs"]
    second = bench(tmp_path / "lossless", "--formats", "lossless", "--bf16-json", str(bf16_path))
    assert second.returncode == 0, second.stderr[-2000:]
    (record_path,) = (tmp_path / "lossless").glob("compressed-smoke-*.json")
    record = json.loads(record_path.read_text())
    (lossless,) = record["runs"]
    assert record["baseline_from"]["path"] == bf16_path.name
    assert lossless["tokens_identical_to_bf16"] is True and lossless["tokens"] == bf16["tokens"]
    assert lossless["speedup_vs_bf16"] == lossless["decode_tok_s"] / bf16["decode_tok_s"]
