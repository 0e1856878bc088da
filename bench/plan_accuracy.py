"""Predicted vs measured decode speed for several placements (the planner's cost model, checked).

Each case runs in its own process: load with random weights under a budget (the plan carries the
cost model's prediction from the cached probe), time batch-1 greedy decode, and compare. Also
records peak host RSS against the host tier, the loader's memory contract.

    python bench/plan_accuracy.py --cases llama-3-8b:6GiB llama-3-8b:24GiB llama-3-70b:auto
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import provenance  # noqa: E402 - after the path


def worker(model_name: str, budget: str, tokens: int, repeats: int) -> dict:

    import overspill
    from overspill.api import placement_of
    from overspill.runtime.hardware import probe

    from decode import _decode, _prompt

    profile = probe()
    t0 = time.perf_counter()
    model, _ = overspill.load(model_name, gpu_memory=budget, random_weights=True, progress=False)
    load_s = time.perf_counter() - t0
    placement = placement_of(model)
    plan = placement.plan
    ids = _prompt(model.config.vocab_size, 16).cuda()
    out = _decode(model, ids, tokens, repeats)
    out.pop("tokens")
    pred = plan.prediction
    return {
        "model": model_name,
        "budget": budget,
        "load_s": load_s,
        "resident_layers": len(plan.resident_layers),
        "streamed_layers": len(plan.streamed_layers),
        "predicted_tok_s": pred.decode_tok_s,
        "predicted_bottleneck": pred.bottleneck,
        "predicted_terms_ms": {"link": pred.link_s * 1e3, "gpu": pred.gpu_s * 1e3, "host": pred.host_s * 1e3},
        "measured_tok_s": out["decode_tok_s"],
        "error": pred.decode_tok_s / out["decode_tok_s"] - 1,
        "measured_runs": out["decode_tok_s_runs"],
        "host_tier_bytes": placement.host_bytes,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": out["peak_gpu_bytes"],
        "plan": json.loads(plan.to_json()),
        "profile": json.loads(profile.to_json()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["llama-3-8b:6GiB", "llama-3-8b:24GiB", "llama-3-70b:auto"],
                   help="MODEL:BUDGET pairs (shipped config names, random weights)")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model_name, budget = args.worker.split(":")
        print("RESULT " + json.dumps(worker(model_name, budget, args.tokens, args.repeats)), flush=True)
        return

    from overspill.runtime.hardware import machine_facts

    results = []
    for case in args.cases:
        model_name = case.split(":")[0]
        repeats = 1 if "70b" in model_name else args.repeats
        cmd = [sys.executable, __file__, "--worker", case, "--tokens", str(args.tokens), "--repeats", str(repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{case}: FAILED\n{proc.stderr[-3000:]}", flush=True)
            results.append({"case": case, "error_text": proc.stderr[-3000:]})
            continue
        r = json.loads(lines[-1][7:])
        results.append(r)
        print(f"{case:22s} {r['resident_layers']:3d} resident {r['streamed_layers']:3d} streamed  "
              f"predicted {r['predicted_tok_s']:6.2f} tok/s ({r['predicted_bottleneck']})  measured "
              f"{r['measured_tok_s']:6.2f}  error {r['error'] * 100:+.1f}%  load {r['load_s']:.0f} s  "
              f"host RSS {r['peak_host_rss_bytes'] / 2**30:.1f} GiB (host tier {r['host_tier_bytes'] / 2**30:.1f} GiB)",
              flush=True)
    ok = [r for r in results if "measured_tok_s" in r]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {
        **provenance.header("plan_accuracy", stamp, machine_facts()),
        "max_abs_error": max((abs(r["error"]) for r in ok), default=None),
        "all_within_15pct": bool(ok) and len(ok) == len(results) and all(abs(r["error"]) <= 0.15 for r in ok),
        "cases": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"plan-accuracy-{stamp}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"max |error| {record['max_abs_error']}; all within 15%: {record['all_within_15pct']}; wrote {path}")


if __name__ == "__main__":
    main()
