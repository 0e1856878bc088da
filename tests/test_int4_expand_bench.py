"""bench/int4_expand.py --smoke on the CPU: the record of the 8B layer's seven matrices (at tiny sizes, torch
path only). Beside it, where Triton is installed, the int4 kernel in Triton's CPU interpreter gives the
torch path's bits (the GPU's check is tests/test_gpu_formats.py), and the CPU never calls it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from overspill.runtime import int4_kernel, quant

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_records_each_matrix_and_the_layer(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "int4_expand.py"), "--smoke", "--repeats", "2",
                          "--warmup", "1", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = tmp_path.glob("int4-expand-*.json")
    record = json.loads(path.read_text())
    assert record["benchmark"] == "int4_expand" and record["command"].startswith("bench/int4_expand.py --smoke")
    assert "git_commit" in record and record["machine"]["device_name"] == "cpu"
    assert record["device"] == "cpu" and record["dtype"] == "bfloat16" and record["repeats"] == 2
    assert [m["name"] for m in record["matrices"]] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert [m["shape"] for m in record["matrices"]] == [[128, 128], [32, 128], [32, 128], [128, 128], [448, 128],
                                                       [448, 128], [128, 448]]
    for entry in (*record["matrices"], record["layer"]):
        assert entry["torch_ms"] > 0 and entry["torch_gb_s"] > 0
        assert entry["triton_ms"] is None and entry["triton_gb_s"] is None  # no Triton in the smoke mode
    assert all(m["bitwise_equal"] is None for m in record["matrices"])
    # bytes moved: half a byte a code, a bf16 scale and zero per group, two bytes written a weight
    q = record["matrices"][0]
    assert q["bytes"] == 128 * 64 + 2 * 2 * 128 + 128 * 128 * 2
    assert record["layer"]["bytes"] == sum(m["bytes"] for m in record["matrices"])
    assert record["layer"]["sum_of_matrices_torch_ms"] > 0
    assert record["bitwise_equal"] is None and record["speedup_vs_torch"] is None and record["triton"] is False


def test_the_cpu_expands_int4_without_the_kernel(monkeypatch) -> None:
    monkeypatch.setattr(int4_kernel, "expand_int4", lambda *a: pytest.fail("the Triton path ran on the CPU"))
    w = (torch.randn(8, 256) * 0.02).to(torch.bfloat16)
    parts = [torch.empty(s, dtype=d) for s, d in quant.part_shapes("int4", (8, 256))]
    quant.encode("int4", w.clone(), parts)
    out = torch.empty_like(w)
    quant.expand("int4", parts, out)
    assert (out.float() - w.float()).abs().max() < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_in_triton_interpreter_equals_the_torch_path(dtype: torch.dtype, monkeypatch) -> None:
    # the kernel's tiling and indexing on the CPU: odd row counts, partial tiles, groups of 32, 64, 128, 256,
    # a 3-D fused expert tensor, codes and scales across magnitudes (ties, fp16 overflow to inf)
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel = int4_kernel.build()
    gen = torch.Generator().manual_seed(0)
    for shape, group in [((37, 256), 128), ((5, 4, 192), 64), ((33, 96), 32), ((17, 1024), 256), ((3, 640), 128)]:
        rows, cols = quant.rows_cols(shape)
        packed = torch.randint(0, 256, (rows, cols // 2), generator=gen, dtype=torch.uint8)
        e = torch.randint(-30, 14, (rows, cols // group, 1), generator=gen).float()
        scale = (torch.rand(e.shape, generator=gen) * 2**e).to(torch.bfloat16)
        zero = (torch.randn(e.shape, generator=gen) * 2 ** (e + 2)).to(torch.bfloat16)
        want = torch.empty(rows, cols, dtype=dtype)
        quant._expand_int4_torch(packed, scale, zero, want, None)
        got = torch.full((rows, cols), 7.0, dtype=dtype)
        assert int4_kernel.launch(kernel, packed, scale, zero, got)
        assert torch.equal(got, want), (shape, group)
