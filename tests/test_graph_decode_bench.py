"""bench/graph_decode.py's bookkeeping on the CPU, from worker results shaped like bench/decode.py's:
the GPU session should not lose a run to a KeyError in the summary or the chart."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_graph_decode", ROOT / "bench" / "graph_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case(budget: str, tok_s: float, streamed: int, graphs: bool) -> dict:
    layer = 436 * 2**20
    return {"budget": budget, "kind": "overspill", "decode_tok_s": tok_s, "resident_layers": 32 - streamed,
            "streamed_layers": streamed, "streamed_bytes_per_token": streamed * layer, "tokens": [1, 2, 3],
            "plan": {"device_weight_bytes": (32 - streamed) * layer + 2**30},
            **({"graph_replays": 60, "graphs_captured": 3, "graph_capture_on": True} if graphs else {})}


def test_summary_and_chart_from_decode_shaped_results(tmp_path) -> None:
    bench = _load()
    bw = {"hbm_bytes_s": 3.0e12, "pinned_h2d_bytes_s": 54e9}
    cases = {
        mode: [_case("none", 30.0 * (4 if graphs else 1), 0, graphs), _case("6GiB", 4.9, 25, graphs),
               _case("stream:2", 29.5 * (4 if graphs else 1), 2, graphs),
               {"budget": "stream:8", "kind": "overspill", "error": "RuntimeError: boom"}]
        for mode, graphs in (("eager", False), ("graphs", True))
    }
    summary = bench.summarize(cases, bw)
    rows = {r["budget"]: r for r in summary["graphs"]["rows"]}
    assert rows["none"]["fraction_of_hbm_floor"] > 0 and rows["6GiB"]["fraction_of_link_floor"] > 0.9
    assert "error" in rows["stream:8"] and summary["tokens_match_eager"]["none"] is True
    assert summary["graphs"]["free_streaming"]["max_free_streamed_layers"] == 2
    bench.plot(summary, tmp_path / "chart.png", "test")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
