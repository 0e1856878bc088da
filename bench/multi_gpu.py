"""A pipeline over layers on 1, 2 or 4 GPUs (issue 18): greedy decode of one random-weight shape with
each GPU's budget capped so layers stream, at batch 1 and batch 32.

Per GPU count, `overspill.runtime.launch.spawn` starts that many ranks (NCCL, NCCL_NVLS_ENABLE=0); each loads
its span with `overspill.load(pipeline=True, gpu_memory=BUDGET)` (the same per-GPU budget whatever the
count) and decodes every batch alike; rank 0 times it. Recorded per GPU count: every rank's span,
resident and streamed layers, bytes over its own link per step, planned and peak GPU memory, hidden-state
bytes sent; per batch: decode tok/s (first token excluded), prefill seconds, the serial link floor
(a step waits for every rank's link in turn: batch / sum_r(streamed_r / h2d_r)), the planner's
prediction for the split, the first row's tokens and whether they equal the smallest GPU count's;
speedup_vs_1_gpu where this call ran 1 GPU (or `--baseline` names an earlier record: labelled so).
Micro-batches are not implemented (`planning/pipeline.py` says why they buy nothing while ranks
are link-bound); batch 32 runs as one pass per step. A 70B load takes most of a call, so one GPU
count per call is the usual use:

    python bench/multi_gpu.py --model llama-3-70b --budget 24GiB --gpus 1
    python bench/multi_gpu.py --model llama-3-70b --budget 24GiB --gpus 2 --baseline bench/results/multi-gpu-llama-3-70b-24GiB-1gpu-*.json
    python bench/multi_gpu.py --smoke     # tiny model, gloo ranks on the CPU: checks the script only
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

import provenance  # noqa: E402 - after the path
from smoke import SMOKE_CONFIG, sync  # noqa: E402

SMOKE_LAYERS = 16
SMOKE_BUDGET = 1_470_000  # bytes per rank: 1 rank keeps 1 of 16 layers resident, 2 ranks 2 and 3 of 8 (float32, depth 1)


def decode(model, ids, new_tokens: int) -> dict:
    """Greedy decode of `ids` [batch, prompt]: tokens of the first row, decode tok/s over the batch with the
    first token (the prompt's pass) excluded, prefill seconds."""
    import torch

    from overspill.run import TimingStreamer

    streamer = TimingStreamer(None)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer)
    sync()
    t, batch = streamer.times, ids.shape[0]
    tok_s = batch * (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else None
    return {"batch": batch, "decode_tok_s": tok_s, "prefill_s": t[0] - start if t else None,
            "tokens": out[0, ids.shape[1]:].tolist()}


def bench_rank(load_kwargs: dict, batches: list[int], prompt_tokens: int, new_tokens: int) -> dict:
    """One rank: load its span, decode each batch (a short warm-up first), report its facts."""
    import torch
    from dataclasses import asdict

    import overspill
    from overspill.runtime.launch import model_stage
    from overspill.runtime.loader import placement_of

    t0 = time.perf_counter()
    model, _ = overspill.load(pipeline=True, progress=False, **load_kwargs)
    load_s = time.perf_counter() - t0
    stage, placement = model_stage(model), placement_of(model)
    plan, dev = placement.plan, placement.device
    vocab = model.config.get_text_config().vocab_size
    runs = []
    for batch in batches:
        ids = torch.randint(2, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(batch)).to(dev)
        decode(model, ids, 2)  # warm-up: kernels, allocator, the ring's first cycle
        runs.append(decode(model, ids, new_tokens))
    h2d = None
    if dev.type == "cuda":
        from overspill.runtime.hardware import probe

        h2d = probe(device=dev).h2d_bytes_s  # cached by load's probe
    span = stage.span
    return {
        "rank": stage.rank, "device": str(dev), "load_s": round(load_s, 1), "start": span.start, "stop": span.stop,
        "layers": span.layers, "streamed_layers": len(plan.streamed_layers), "resident_layers": span.resident_layers,
        "streamed_bytes_per_step": plan.streamed_bytes_per_step + plan.kv_host_bytes,
        "planned_device_bytes": plan.device_bytes, "budget_bytes": plan.budget_bytes, "h2d_bytes_s": h2d,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        "predicted": asdict(plan.prediction) if plan.prediction else None,
        "hidden_bytes_sent": stage.links.sent, "split": stage.split.summary(), "runs": runs,
    }


def summarize(ranks: list[dict], first: dict | None, baseline: dict | None) -> dict:
    """One GPU count's record: ranks, and per batch rank 0's timing against the serial link floor and the baselines."""
    lead = ranks[0]
    runs = []
    for run in lead["runs"]:
        entry = {k: run[k] for k in ("batch", "decode_tok_s", "prefill_s", "tokens")}
        links = [r["streamed_bytes_per_step"] / r["h2d_bytes_s"] for r in ranks if r["h2d_bytes_s"]]
        serial = sum(links) if len(links) == len(ranks) else None
        entry["link_floor_tok_s"] = run["batch"] / serial if serial else None
        entry["fraction_of_link_floor"] = (run["decode_tok_s"] / entry["link_floor_tok_s"]
                                           if serial and run["decode_tok_s"] else None)
        predicted = [r["predicted"]["decode_step_s"] for r in ranks if r["predicted"]]
        entry["predicted_tok_s"] = (run["batch"] / sum(predicted) if len(predicted) == len(ranks) else None)
        for label, ref in (("1_gpu", first), ("baseline", baseline)):
            base = next((b for b in (ref or {}).get("runs", []) if b["batch"] == run["batch"]), None)
            if base and base["decode_tok_s"] and run["decode_tok_s"]:
                entry[f"speedup_vs_{label}"] = run["decode_tok_s"] / base["decode_tok_s"]
                entry[f"tokens_identical_to_{label}"] = base["tokens"] == run["tokens"]
        runs.append(entry)
    return {"gpus": len(ranks), "ranks": [{k: v for k, v in r.items() if k not in ("runs", "split")} for r in ranks],
            "split": lead["split"], "runs": runs}


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in record["batches"]:
        points = [(g["gpus"], r["decode_tok_s"]) for g in record["results"] for r in g["runs"]
                  if r["batch"] == batch and r["decode_tok_s"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"batch {batch}")
        floors = [(g["gpus"], r["link_floor_tok_s"]) for g in record["results"] for r in g["runs"]
                  if r["batch"] == batch and r.get("link_floor_tok_s")]
        if floors:
            ax.plot(*zip(*floors), linestyle="--", color="k", alpha=0.5)
    ax.set_xlabel("GPUs (pipeline ranks)")
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"{record['model']} at {record['budget']} per GPU (dashed: serial link floor)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def smoke_model(out_dir: Path) -> Path:
    """The smoke llama with 16 layers (so each of 2 ranks streams through a 2-slot ring beside a resident layer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = {**SMOKE_CONFIG, "num_hidden_layers": SMOKE_LAYERS}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d), dtype=torch.float32)
    path = Path(out_dir) / "smoke-model-16"
    model.save_pretrained(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-70b", help="shipped config name (random weights)")
    p.add_argument("--budget", default="24GiB", help="gpu_memory of every GPU (small enough that layers stream)")
    p.add_argument("--gpus", default=None, help="GPU counts to run, one load each, e.g. 1 or 1,2,4 (default 1,2,4; "
                   "smoke: 1,2 gloo ranks)")
    p.add_argument("--batches", default=None, help="batch sizes decoded on each load (default 1,32; smoke: 1,2)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--baseline", default=None, help="an earlier record of this script (1 GPU): ratios against it, labelled")
    p.add_argument("--smoke", action="store_true", help="tiny float32 model, gloo ranks on the CPU (1 and 2)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()

    from overspill.runtime.launch import spawn
    from overspill.runtime.hardware import machine_facts

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    batches = [int(b) for b in (args.batches or ("1,2" if args.smoke else "1,32")).split(",")]
    gpus = [int(g) for g in (args.gpus or ("1,2" if args.smoke else "1,2,4")).split(",")]
    context = args.prompt_tokens + args.new_tokens + 8
    if args.smoke:
        load_kwargs = dict(model=str(smoke_model(out_dir)), gpu_memory=SMOKE_BUDGET, dtype="float32", context=64,
                           depth=1, batch=max(batches))
        backend, name, budget = "gloo", "smoke", str(SMOKE_BUDGET)
    else:
        load_kwargs = dict(model=args.model, random_weights=True, gpu_memory=args.budget, context=context,
                           depth=args.depth, batch=max(batches))
        backend, name, budget = "nccl", args.model, args.budget
    path = out_dir / f"multi-gpu-{name}-{budget}-{'-'.join(map(str, gpus))}gpu-{stamp}.json"
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    base_runs = next((g for g in baseline["results"] if g["gpus"] == 1), None) if baseline else None
    record = {**provenance.header("multi_gpu", stamp, machine_facts()), "model": name, "budget": budget,
              "backend": backend, "batches": batches, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "micro_batches": 1, "baseline": args.baseline, "results": []}
    first = None
    for count in gpus:
        ranks = spawn(bench_rank, count, (load_kwargs, batches, args.prompt_tokens, args.new_tokens),
                      backend_name=backend)
        result = summarize(ranks, first, base_runs)
        if count == 1:
            first = result
        record["results"].append(result)
        for run in result["runs"]:
            print(f"{count} GPU(s), batch {run['batch']}: {run['decode_tok_s']:.3f} tok/s"
                  + "".join(f", {k} {v:.2f}" for k, v in run.items() if k.startswith("speedup") and v), flush=True)
        path.write_text(json.dumps(record, indent=2))
    plot(record, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
