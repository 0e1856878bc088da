"""bench/managed.py on the CPU: the managed-memory size guard, the parser defaults, the summary and
the chart. bench/ is not a package, so the script is loaded by path; importing it must not import
cuda-python (the CPU CI has none) or touch CUDA."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "managed.py"
GiB = 2**30


def _load():
    spec = importlib.util.spec_from_file_location("bench_managed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


managed = _load()


def test_import_touches_no_cuda() -> None:
    code = f"""
import importlib.util, sys
s = importlib.util.spec_from_file_location("bench_managed", {str(SCRIPT)!r})
s.loader.exec_module(importlib.util.module_from_spec(s))
bad = [m for m in ("cuda", "cuda.bindings", "cupy", "torch") if m in sys.modules]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_managed_bytes_allowed_within_half_of_free() -> None:
    managed.managed_bytes_allowed(2 * GiB, 79 * GiB)
    managed.managed_bytes_allowed(40 * GiB, 80 * GiB)  # exactly half
    managed.managed_bytes_allowed(3 * GiB, 4 * GiB, fraction=0.75)


@pytest.mark.parametrize("total, free", [(40 * GiB + 1, 80 * GiB), (2 * GiB, 3 * GiB), (1, 0)])
def test_managed_bytes_refused_names_both_sizes(total: int, free: int) -> None:
    with pytest.raises(ValueError) as err:
        managed.managed_bytes_allowed(total, free)
    message = str(err.value)
    assert str(total) in message and str(free) in message
    assert f"{total / GiB:.2f} GiB" in message and f"{free / GiB:.2f} GiB" in message
    assert "hang" in message


def test_parser_defaults() -> None:
    args = managed.build_parser().parse_args([])
    assert (args.layers, args.layer_mib, args.depth, args.passes) == (8, 256, 2, 5)
    assert args.modes == ["pinned", "fault", "prefetch", "prefetch_no_evict", "mapped"]
    assert Path(args.out) == ROOT / "bench" / "results"
    picked = managed.build_parser().parse_args(["--modes", "prefetch", "pinned", "--layer-mib", "64"])
    assert picked.modes == ["prefetch", "pinned"] and picked.layer_mib == 64
    with pytest.raises(SystemExit):
        managed.build_parser().parse_args(["--modes", "zero-copy"])


def test_summarize_fraction_target_and_fastest() -> None:
    modes = {"pinned": {"GB_s_median": 50.0}, "fault": {"GB_s_median": 8.0}, "prefetch": {"GB_s_median": 42.0}}
    s = managed.summarize(modes)
    assert s["prefetch_fraction_of_pinned"] == pytest.approx(0.84)
    assert s["target_prefetch_ge_80pct_of_pinned"] is True and s["fastest_mode"] == "pinned"
    assert s["fraction_of_pinned"] == pytest.approx({"pinned": 1.0, "fault": 0.16, "prefetch": 0.84})
    modes["prefetch"] = {"GB_s_median": 30.0}
    assert managed.summarize(modes)["target_prefetch_ge_80pct_of_pinned"] is False
    failed = managed.summarize({"pinned": {"error": "RuntimeError: x"}, "fault": {"GB_s_median": 8.0}})
    assert failed == {"prefetch_fraction_of_pinned": None, "target_prefetch_ge_80pct_of_pinned": None,
                      "fraction_of_pinned": {}, "fastest_mode": "fault"}


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "managed.png"
    managed.plot({"pinned": {"GB_s_median": 50.0}, "fault": {"error": "x"}, "prefetch": {"GB_s_median": 40.0}},
                 path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
