"""Long-context decode with the tiered KV cache, and prefix-hit time to first token.

For each context length, under one GPU budget that cannot hold weights + KV resident:
  - resident:  all weights and KV on the GPU, the process capped at the budget (it may OOM: recorded);
  - offloaded: resident weights + transformers' `cache_implementation="offloaded"`, same cap;
  - overspill: `overspill.load(..., gpu_memory=budget, context=N)`; the plan streams weights and/or
    keeps leading layers' KV in pinned host memory (a TieredCache);
each prefilled in chunks, then batch-1 decode timed. Then a prefix-reuse pass: a 32k-token prompt
cold, and again with a new suffix after its KV blocks went to the prefix pool.

    python bench/long_context.py --budget 24GiB --contexts 16384 65536 131072
    python bench/long_context.py --smoke          # tiny model on CPU: checks the script, times nothing useful
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
from smoke import smoke_model, sync as _sync  # noqa: E402

def _timed_decode(model, ids, new_tokens: int, chunk: int, **kw) -> dict:
    """Prefill (chunked) then decode; returns time to first token and steady decode tok/s."""
    import torch

    from overspill.run import TimingStreamer

    streamer = TimingStreamer(None)
    _sync()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=0, streamer=streamer, prefill_chunk_size=chunk, **kw)
    _sync()
    t = streamer.times
    return {"ttft_s": t[0] - start, "decode_tok_s": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else None,
            "tokens": streamer.tokens}


def _model(args, kind: str, context: int):
    import torch

    import overspill

    if args.smoke:
        source, dtype = str(smoke_model(Path(args.out))), "float32"
    else:
        source, dtype = args.model, "bfloat16"
    random = not args.smoke
    if kind == "overspill":
        return overspill.load(source, gpu_memory=args.budget, context=context, dtype=dtype,
                              random_weights=random, progress=False, kv_gpu_memory=args.kv_gpu_memory)[0]
    return overspill.load(source, gpu_memory=None, dtype=dtype, random_weights=random, progress=False)[0]


def worker(args, kind: str, context: int) -> dict:
    import torch

    from overspill.api import placement_of
    from overspill.planning.units import parse_bytes

    cuda = torch.cuda.is_available()
    if cuda and kind in ("resident", "offloaded"):
        budget = parse_bytes(args.budget)
        torch.cuda.set_per_process_memory_fraction(budget / torch.cuda.get_device_properties(0).total_memory)
    model = _model(args, kind, context)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    device = placement_of(model).device
    ids = torch.randint(1, vocab, (1, context - args.new_tokens), generator=gen).to(device)
    kw = {"cache_implementation": "offloaded"} if kind == "offloaded" else {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        out = _timed_decode(model, ids, args.new_tokens, args.prefill_chunk, **kw)
    except torch.OutOfMemoryError as exc:
        return {"kind": kind, "context": context, "oom": str(exc).splitlines()[0]}
    plan = placement_of(model).plan
    out.update(kind=kind, context=context, streamed_layers=len(plan.streamed_layers),
               kv_host_layers=len(plan.kv_host_layers) if kind == "overspill" else 0,
               peak_gpu_bytes=torch.cuda.max_memory_allocated() if cuda else None)
    return out


def worker_prefix(args) -> dict:
    """Time to first token for a long prompt, cold and then with its prefix in the pool."""
    import torch

    from overspill.api import placement_of
    from overspill.runtime.kv import cache_kwargs
    from overspill.runtime.prefix import PrefixCache

    context = args.prefix_tokens + 64
    model = _model(args, "overspill", context)
    placement = placement_of(model)
    dtype = next(p for p in model.parameters()).dtype
    pool = PrefixCache(model.config, capacity_tokens=args.prefix_tokens + 256, dtype=dtype, device=placement.device)
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(1, model.config.vocab_size, (args.prefix_tokens,), generator=gen).tolist()
    results = {}
    for name in ("cold", "warm"):
        suffix = torch.randint(1, model.config.vocab_size, (16,), generator=gen).tolist()
        tokens = shared + suffix
        cache = placement.new_cache(model.config)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        _sync()
        t0 = time.perf_counter()
        lease = pool.start(tokens, cache)  # copies the cached blocks in: part of the warm TTFT
        _sync()
        restore_s = time.perf_counter() - t0
        ids = torch.tensor([tokens], device=placement.device)
        # transformers' chunked prefill restarts at token 0, ignoring a cache that holds a prefix
        chunk = None if lease.cached_tokens else args.prefill_chunk
        timing = _timed_decode(model, ids, 2, chunk, **cache_kwargs(model, cache))
        pool.finish(lease, cache, tokens)
        results[name] = {"ttft_s": timing["ttft_s"] + restore_s, "restore_s": restore_s,
                         "cached_tokens": lease.cached_tokens}
    results["speedup"] = results["cold"]["ttft_s"] / results["warm"]["ttft_s"]
    return {"kind": "prefix", "prefix_tokens": args.prefix_tokens, **results}


def run(args, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, *extra] + _common(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"args": extra, "error": proc.stderr[-3000:]}
    return json.loads(lines[-1][7:])


def _common(args) -> list[str]:
    out = ["--model", args.model, "--budget", args.budget, "--new-tokens", str(args.new_tokens),
           "--prefill-chunk", str(args.prefill_chunk), "--prefix-tokens", str(args.prefix_tokens), "--out", args.out]
    if args.kv_gpu_memory:
        out += ["--kv-gpu-memory", args.kv_gpu_memory]
    return out + (["--smoke"] if args.smoke else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--budget", default="24GiB", help="GPU budget for every case")
    p.add_argument("--contexts", nargs="*", type=int, default=[16384, 65536, 131072],
                   help="contexts of the decode cases (none: only the prefix pass)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens per prefill call (the planner reserves activations for 2048)")
    p.add_argument("--prefix-tokens", type=int, default=32768,
                   help="shared prompt length of the prefix-reuse TTFT pass (0 skips it)")
    p.add_argument("--kv-gpu-memory", default=None, help="cap device KV for the overspill case (default: the planner decides)")
    p.add_argument("--kinds", nargs="+", default=["resident", "offloaded", "overspill"])
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, short contexts: checks the script")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        kind, _, ctx = args.worker.partition(":")
        result = worker_prefix(args) if kind == "prefix" else worker(args, kind, int(ctx))
        print("RESULT " + json.dumps(result), flush=True)
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.contexts, args.prefix_tokens, args.new_tokens, args.prefill_chunk = [300, 600], 512, 6, 128
        args.budget, args.kv_gpu_memory = "4500KiB", "460KiB"
        args.kinds = [k for k in args.kinds if k != "offloaded"]  # transformers' offloaded cache needs CUDA
    results = []
    for context in args.contexts:
        for kind in args.kinds:
            r = run(args, ["--worker", f"{kind}:{context}"])
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("tokens", "error")}), flush=True)
            if "error" in r:
                print(r["error"], flush=True)
    summary = []
    for context in args.contexts:
        by = {r.get("kind"): r for r in results if r.get("context") == context}
        ours, res, off = by.get("overspill", {}), by.get("resident", {}), by.get("offloaded", {})
        row = {"context": context, "overspill_tok_s": ours.get("decode_tok_s"),
               "resident_tok_s": res.get("decode_tok_s"), "resident_oom": "oom" in res,
               "offloaded_tok_s": off.get("decode_tok_s"), "offloaded_oom": "oom" in off,
               "overspill_peak_gpu_bytes": ours.get("peak_gpu_bytes")}
        if row["overspill_tok_s"] and row["resident_tok_s"]:
            row["fraction_of_resident"] = row["overspill_tok_s"] / row["resident_tok_s"]
            row["tokens_match_resident"] = ours.get("tokens") == res.get("tokens")
        if row["overspill_tok_s"] and row["offloaded_tok_s"]:
            row["speedup_vs_offloaded"] = row["overspill_tok_s"] / row["offloaded_tok_s"]
        summary.append(row)
        print(json.dumps(row), flush=True)
    prefix = run(args, ["--worker", "prefix:"]) if args.prefix_tokens else None
    print(json.dumps(prefix), flush=True)
    from overspill.runtime.hardware import machine_facts

    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {**provenance.header("long_context", stamp, machine_facts()), "budget": args.budget, "summary": summary, "cases": results, "prefix": prefix, "smoke": args.smoke}
    path = Path(args.out) / f"long-context-{'smoke-' if args.smoke else ''}{stamp}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
