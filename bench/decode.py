"""Batch-1 decode speed: overspill vs accelerate device_map vs the link floor vs fully resident.

One invocation runs the whole matrix (each case in its own process so GPU memory starts clean) and
writes JSON + PNG under bench/results/. All cases use the same seeded random weights, so the
generated tokens must agree; the JSON records whether they do.

    python bench/decode.py --model llama-3-8b --budgets 6GiB 12GiB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import provenance  # noqa: E402 - after the path


def _prompt(vocab: int, length: int):
    import torch

    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (1, length), generator=gen)


def _decode(model, ids, new_tokens: int, repeats: int) -> dict:
    """Warm up, then time greedy generation `repeats` times; decode speed is the median run's.

    Prefill is timed separately (time to the first new token). In the CPU-bound regime single runs
    vary by tens of percent, hence the repeats.
    """
    import statistics

    import torch

    from overspill.run import TimingStreamer, timed_generate

    mask = torch.ones_like(ids)
    model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    runs, tokens = [], None
    for _ in range(repeats):
        streamer = TimingStreamer(None)
        runs.append(timed_generate(model, ids, new_tokens, streamer, attention_mask=mask, pad_token_id=0))
        tokens = tokens or streamer.tokens
    return {
        "new_tokens": runs[0].new_tokens,
        "prefill_s": statistics.median(r.prefill_seconds for r in runs),
        "decode_tok_s": statistics.median(r.decode_tokens_per_second for r in runs),
        "decode_tok_s_runs": [r.decode_tokens_per_second for r in runs],
        "tokens": tokens,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
    }


def worker_overspill(args) -> dict:
    import overspill
    from overspill.api import placement_of

    budget = None if args.budget == "none" else args.budget
    plan = _plan_streaming(args, int(args.budget.split(":")[1])) if args.budget.startswith("stream:") else None
    model, _ = overspill.load(args.model, gpu_memory=budget if plan is None else None, random_weights=True,
                              depth=args.depth, context=args.context, progress=False, plan=plan,
                              cuda_graphs=args.cuda_graphs, streaming=args.streaming)
    plan = placement_of(model).plan
    ids = _prompt(model.config.vocab_size, args.prompt_len).cuda()
    out = _decode(model, ids, args.new_tokens, args.repeats)
    out.update(
        resident_layers=len(plan.resident_layers), streamed_layers=len(plan.streamed_layers),
        streamed_bytes_per_token=plan.streamed_bytes_per_step, plan=json.loads(plan.to_json()),
        ring_restarts=placement_of(model).ring.restarts if placement_of(model).ring else 0,
        cuda_graphs=args.cuda_graphs, streaming=plan.streaming,
    )
    graphs = placement_of(model).graphs
    if graphs is not None:
        out.update(graph_replays=graphs.replays, graph_eager_steps=graphs.eager_steps, graphs_captured=len(graphs.graphs),
                   graph_capture_on=graphs.capture)
    return out


def _plan_streaming(args, streamed: int):
    """A plan streaming exactly the first `streamed` layers (the greedy rule never streams fewer
    layers than it has ring slots; the free-streaming sweep needs those counts too)."""
    import torch
    from transformers import AutoConfig

    from overspill.planning.configs import shipped_config
    from overspill.planning.placement import streaming_plan
    from overspill.planning.plan import Workload
    from overspill.runtime.loader import build_skeleton, decoder_layers, footprint

    d = dict(shipped_config(args.model))
    skeleton = build_skeleton(AutoConfig.for_model(d.pop("model_type"), **d), torch.bfloat16)
    fp = footprint(skeleton, decoder_layers(skeleton)[1], torch.bfloat16)
    return streaming_plan(fp, Workload(args.context, 1), streamed, args.depth)


def worker_accelerate(args) -> dict:
    """accelerate's big-model inference: weights on CPU (pageable), hooks copy each layer per forward."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from overspill.planning.configs import shipped_config
    from overspill.runtime.checkpoint import RandomWeights

    d = dict(shipped_config(args.model))
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    source = RandomWeights(0, getattr(config, "initializer_range", 0.02), device=torch.device("cuda"))
    for name, param in list(model.named_parameters()):
        value = torch.empty(param.shape, dtype=param.dtype)
        source.fill(name, value)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    model.eval()
    device_map = infer_auto_device_map(
        model, max_memory={0: args.budget, "cpu": "120GiB"}, no_split_module_classes=model._no_split_modules
    )
    model = dispatch_model(model, device_map=device_map)
    ids = _prompt(config.vocab_size, args.prompt_len).cuda()
    out = _decode(model, ids, args.accelerate_tokens, 1)
    out["gpu_layers"] = sum(1 for k, v in device_map.items() if ".layers." in k and v == 0)
    out["device_map_cpu_entries"] = sum(1 for v in device_map.values() if v == "cpu")
    return out


def worker_bandwidth(args) -> dict:
    import torch

    from overspill.runtime.hardware import machine_facts, measure_h2d, measure_hbm

    dev = torch.device("cuda")
    return {
        "hbm_bytes_s": measure_hbm(dev),
        "pinned_h2d_bytes_s": measure_h2d(dev, pinned=True),
        "pageable_h2d_bytes_s": measure_h2d(dev, iters=3, pinned=False),
        "machine": machine_facts(),
    }


WORKERS = {"overspill": worker_overspill, "accelerate": worker_accelerate, "bandwidth": worker_bandwidth}


def run_case(kind: str, args, budget: str, log) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--budget", budget] + _common(args)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write(proc.stderr[-4000:])
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"  {kind} {budget}: FAILED (rc={proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
        return {"kind": kind, "budget": budget, "error": proc.stderr[-2000:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(kind=kind, budget=budget, wall_s=time.time() - t0)
    print(f"  {kind:10s} {budget:6s} decode {result.get('decode_tok_s', 0):7.2f} tok/s", flush=True)
    return result


def _common(args) -> list[str]:
    return ["--model", args.model, "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len),
            "--depth", str(args.depth), "--repeats", str(args.repeats), "--context", str(args.context), "--accelerate-tokens", str(args.accelerate_tokens),
            "--streaming", getattr(args, "streaming", "auto")] + (["--cuda-graphs"] if args.cuda_graphs else [])


def summarize(results: list[dict], bw: dict) -> list[dict]:
    """One row per budget: the ratios the issue asks for, all from this run."""
    resident = next((r for r in results if r["kind"] == "overspill" and r["budget"] == "none"), None)
    rows = []
    for r in results:
        if r["kind"] != "overspill" or r["budget"] == "none" or "error" in r:
            continue
        acc = next((a for a in results if a["kind"] == "accelerate" and a["budget"] == r["budget"]), None)
        floor = bw["pinned_h2d_bytes_s"] / r["streamed_bytes_per_token"] if r["streamed_bytes_per_token"] else None
        row = {
            "budget": r["budget"],
            "resident_layers": r["resident_layers"],
            "streamed_layers": r["streamed_layers"],
            "overspill_tok_s": r["decode_tok_s"],
            "link_floor_tok_s": floor,
            "fraction_of_link_floor": r["decode_tok_s"] / floor if floor else None,
            "achieved_link_GB_s": r["decode_tok_s"] * r["streamed_bytes_per_token"] / 1e9,
        }
        if acc and "error" not in acc:
            row["accelerate_tok_s"] = acc["decode_tok_s"]
            row["speedup_vs_accelerate"] = r["decode_tok_s"] / acc["decode_tok_s"]
            n = min(len(acc["tokens"]), len(r["tokens"]))
            row["tokens_match_accelerate"] = acc["tokens"][:n] == r["tokens"][:n]
        if resident and "error" not in resident:
            row["resident_tok_s"] = resident["decode_tok_s"]
            row["fraction_of_resident"] = r["decode_tok_s"] / resident["decode_tok_s"]
            row["tokens_match_resident"] = resident["tokens"] == r["tokens"]
        rows.append(row)
    return rows


def free_streaming(sweep: list[dict], resident: dict, bw: dict) -> dict:
    """Streamed-layer counts whose decode stays within 3% of fully resident."""
    if "error" in resident:
        return {}
    points = [
        {"streamed_layers": r["streamed_layers"], "tok_s": r["decode_tok_s"],
         "fraction_of_resident": r["decode_tok_s"] / resident["decode_tok_s"],
         "link_floor_tok_s": bw["pinned_h2d_bytes_s"] / r["streamed_bytes_per_token"] if r["streamed_bytes_per_token"] else None}
        for r in sweep if "error" not in r
    ]
    free = [p["streamed_layers"] for p in points if p["fraction_of_resident"] >= 0.97]
    return {"resident_tok_s": resident["decode_tok_s"], "points": points, "max_free_streamed_layers": max(free, default=0)}


def bar_chart(path: Path, groups: list[str], series: list[tuple[str, list[float]]], title: str, fmt: str = "%.2f",
              label_size: float | None = None) -> None:
    """Grouped bars of decode tok/s: one group per x label, one bar per series in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for j, (label, values) in enumerate(series):
        bars = ax.bar([i + j * width for i in range(len(groups))], values, width, label=label)
        ax.bar_label(bars, fmt=fmt, fontsize=7)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=label_size)
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(rows: list[dict], path: Path, title: str) -> None:
    series = [("accelerate_tok_s", "accelerate device_map"), ("overspill_tok_s", "overspill"),
              ("link_floor_tok_s", "link floor"), ("resident_tok_s", "fully resident")]
    groups = [f"{r['budget']}\n{r['resident_layers']} resident / {r['streamed_layers']} streamed" for r in rows]
    bar_chart(path, groups, [(label, [r.get(key) or 0 for r in rows]) for key, label in series], title)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="shipped config name (random weights)")
    p.add_argument("--budgets", nargs="+", default=["6GiB", "12GiB"], help="GPU budgets to compare")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens timed per overspill/resident case")
    p.add_argument("--accelerate-tokens", type=int, default=8, help="tokens timed for accelerate (it is slow)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per overspill case; the median is reported")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--skip-accelerate", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true", help="load overspill cases with cuda_graphs=True")
    p.add_argument("--streaming", default="auto", choices=["auto", "copy", "managed", "mapped"],
                   help="how overspill cases stream layers (overspill.load's streaming)")
    p.add_argument("--free-sweep", nargs="*", type=int, default=[],
                   help="also time plans streaming exactly these numbers of layers, to find how many stream at no cost")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--budget", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = open(out / f"decode-{args.model}-{stamp}.log", "w")
    print("measuring link bandwidth", flush=True)
    bw = run_case("bandwidth", args, "none", log)
    results = [run_case("overspill", args, "none", log)]
    for budget in args.budgets:
        results.append(run_case("overspill", args, budget, log))
        if not args.skip_accelerate:
            results.append(run_case("accelerate", args, budget, log))
    sweep = [run_case("overspill", args, f"stream:{s}", log) for s in args.free_sweep]
    rows = summarize(results, bw)
    record = {
        **provenance.header("decode", stamp, bw.get("machine")),
        "pinned_h2d_GB_s": bw.get("pinned_h2d_bytes_s", 0) / 1e9,
        "pageable_h2d_GB_s": bw.get("pageable_h2d_bytes_s", 0) / 1e9,
        "model": args.model,
        "summary": rows,
        "free_streaming": free_streaming(sweep, results[0], bw),
        "cases": results,
    }
    stem = out / f"decode-{args.model}-{stamp}"
    Path(f"{stem}.json").write_text(json.dumps(record, indent=2))
    plot(rows, Path(f"{stem}.png"), f"{args.model} bf16 batch-1 decode, pinned H2D {record['pinned_h2d_GB_s']:.1f} GB/s")
    print(json.dumps(rows, indent=2))
    print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
    main()
