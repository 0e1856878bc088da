"""Batch-1 decode with and without CUDA graphs: resident, under budgets, and the free-streaming sweep.

Runs `bench/decode.py`'s overspill worker (one process per case, seeded random weights) eagerly
and with `cuda_graphs=True` for: fully resident, each `--budgets` entry, and plans streaming
exactly k layers (`--free-sweep`). Reports resident tok/s against the HBM floor (weight bytes per
token / measured HBM bandwidth), each budget against its link floor, whether graphed tokens equal
eager ones, and per mode the largest streamed-layer count within 3% of resident.

    python bench/graph_decode.py --budgets 6GiB 12GiB --free-sweep 1 2 4 8 12 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import decode
import provenance


def summarize(cases: dict[str, list[dict]], bw: dict) -> dict:
    """Ratios the issue asks for, from this run's cases."""
    out: dict = {}
    for mode, results in cases.items():
        resident = next(r for r in results if r["budget"] == "none")
        rows = []
        for r in results:
            if "error" in r:
                rows.append({"budget": r["budget"], "error": r["error"][-300:]})
                continue
            weights = r["plan"]["device_weight_bytes"] + r["streamed_bytes_per_token"]
            streamed = r["streamed_bytes_per_token"]
            row = {"budget": r["budget"], "resident_layers": r["resident_layers"], "streamed_layers": r["streamed_layers"],
                   "tok_s": r["decode_tok_s"], "graph_replays": r.get("graph_replays"),
                   "graphs_captured": r.get("graphs_captured"), "graph_capture_on": r.get("graph_capture_on")}
            if streamed:
                floor = bw["pinned_h2d_bytes_s"] / streamed
                row.update(link_floor_tok_s=floor, fraction_of_link_floor=r["decode_tok_s"] / floor)
            else:
                floor = bw["hbm_bytes_s"] / weights
                row.update(hbm_floor_tok_s=floor, fraction_of_hbm_floor=r["decode_tok_s"] / floor)
            if "error" not in resident:
                row["fraction_of_resident"] = r["decode_tok_s"] / resident["decode_tok_s"]
            rows.append(row)
        sweep = [r for r in results if r["budget"].startswith("stream:") and "error" not in r]
        free = decode.free_streaming(sweep, resident, bw) if "error" not in resident else {}
        out[mode] = {"rows": rows, "free_streaming": free}
    eager = {r["budget"]: r for r in cases.get("eager", [])}
    out["tokens_match_eager"] = {
        r["budget"]: r.get("tokens") == eager[r["budget"]].get("tokens")
        for r in cases.get("graphs", []) if r["budget"] in eager and "error" not in r
    }
    return out


def plot(summary: dict, path: Path, title: str) -> None:
    modes = [m for m in ("eager", "graphs") if m in summary]
    budgets = [r["budget"] for r in summary[modes[0]]["rows"]]
    series = []
    for mode in modes:
        by = {r["budget"]: r.get("tok_s", 0) for r in summary[mode]["rows"]}
        series.append((mode, [by.get(b, 0) for b in budgets]))
    groups = [("resident" if b == "none" else b) for b in budgets]
    decode.bar_chart(path, groups, series, title, fmt="%.1f", label_size=8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b", help="shipped config name (random weights)")
    p.add_argument("--budgets", nargs="*", default=["6GiB", "12GiB"], help="GPU budgets besides fully resident")
    p.add_argument("--free-sweep", nargs="*", type=int, default=[1, 2, 4, 8, 12, 16],
                   help="plans streaming exactly this many layers, to find how many stream at no cost")
    p.add_argument("--modes", nargs="+", default=["eager", "graphs"], choices=["eager", "graphs"])
    p.add_argument("--new-tokens", type=int, default=64, help="tokens timed per case")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median is reported")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--context", type=int, default=1024, help="static KV cache length of the graphed cases")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    args.accelerate_tokens = 0
    args.streaming = "auto"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = open(out / f"graph-decode-{args.model}-{stamp}.log", "w")
    args.cuda_graphs = False
    bw = decode.run_case("bandwidth", args, "none", log)
    budgets = ["none", *args.budgets, *[f"stream:{k}" for k in args.free_sweep]]
    cases: dict[str, list[dict]] = {}
    for mode in args.modes:
        args.cuda_graphs = mode == "graphs"
        print(f"{mode}:", flush=True)
        cases[mode] = [decode.run_case("overspill", args, budget, log) for budget in budgets]
    summary = summarize(cases, bw)
    record = {
        **provenance.header("graph_decode", stamp, bw.get("machine")),
        "hbm_GB_s": bw.get("hbm_bytes_s", 0) / 1e9,
        "pinned_h2d_GB_s": bw.get("pinned_h2d_bytes_s", 0) / 1e9,
        "model": args.model,
        "summary": summary,
        "cases": cases,
    }
    stem = out / f"graph-decode-{args.model}-{stamp}"
    Path(f"{stem}.json").write_text(json.dumps(record, indent=2))
    plot(summary, Path(f"{stem}.png"), f"{args.model} bf16 batch-1 decode, eager vs CUDA graphs")
    print(json.dumps({k: v for k, v in summary.items()}, indent=2))
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
