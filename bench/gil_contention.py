"""How long the CPU rank's worker waits for the GIL while the Python thread launches GPU work (issue 16).

The worker computes its share through transformers' own modules, a Python-level op at a time, and each op
needs the GIL to start. The Python thread meanwhile launches the GPU's share: short C calls with Python between
them, so it holds the GIL most of the time and, until it blocks at the join, hands it over only when the
worker has waited a full switch interval (Python's default: 5 ms). At 5b57da5 on the H100 the worker was
busy 137 ms a step where the plan said 86. This times one 8B-shaped layer share on the worker (HF's LlamaMLP
with the share's columns, LlamaAttention with the share's heads over a 512-token cache), alone and while
another thread launches tiny torch ops without pause, at several switch intervals; and the MLP share as one
TorchScript call (`mlp_script`), which holds the GIL only to start and finish. No GPU needed.

    python bench/gil_contention.py                 # 8B share at fraction ~0.53: 4 KV heads, 7558 MLP columns
    python bench/gil_contention.py --smoke         # small shapes, checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import provenance  # noqa: E402 - after the path


def modules(hidden: int, kv_heads: int, group: int, cols: int, cache_tokens: int):
    """(mlp, attention, scripted mlp) callables of one rank's share: as the worker runs them (transformers' modules),
    and the MLP as one TorchScript call, which needs the GIL to start and finish rather than for every op."""
    import torch
    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRotaryEmbedding

    head_dim = 128
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=cols, num_attention_heads=kv_heads * group,
                      num_key_value_heads=kv_heads, head_dim=head_dim)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    mlp = LlamaMLP(cfg).to(torch.bfloat16).eval()
    attn = LlamaAttention(cfg, layer_idx=0).to(torch.bfloat16).eval()
    rotary = LlamaRotaryEmbedding(cfg)
    x = torch.randn(1, 1, hidden, dtype=torch.bfloat16)
    cache = DynamicCache()
    prefix = torch.randn(1, kv_heads, cache_tokens, head_dim, dtype=torch.bfloat16)
    cache.update(prefix, prefix.clone(), 0)
    pos = torch.tensor([[cache_tokens]])
    cos_sin = tuple(t.to(torch.bfloat16) for t in rotary(x, pos))

    def attention():
        out = attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=None, past_key_values=cache)[0]
        cache.crop(-1)  # drop the token just added: the next call sees the same cache (5.17 and 5.25 agree)
        return out

    def mlp_share(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(
            torch.nn.functional.silu(torch.nn.functional.linear(h, gate)) * torch.nn.functional.linear(h, up), down)

    scripted = torch.jit.script(mlp_share)  # one call: the interpreter runs its ops without handing back to Python
    weights = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    return (lambda: mlp(x)), attention, (lambda: scripted(x, *weights))


def launcher(stop: threading.Event) -> None:
    """The Python thread's pattern while it launches kernels: short C calls with Python between them."""
    import torch

    t = torch.zeros(1)
    while not stop.is_set():
        for _ in range(50):
            t.add_(1)


def worker_ms(fn, threads: int, busy: bool, interval: float, iters: int) -> float:
    """Median wall ms of `fn` on a worker of `threads` torch threads, with the launcher running or not."""
    import torch

    before = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    stop = threading.Event()
    side = threading.Thread(target=launcher, args=(stop,), daemon=True)
    try:
        def job():
            with torch.no_grad():  # thread-local, as CpuRank's worker runs its jobs
                return fn()

        with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            for _ in range(3):
                pool.submit(job).result()
            if busy:
                side.start()
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                pool.submit(job).result()
                times.append(time.perf_counter() - start)
    finally:
        stop.set()
        if busy:
            side.join()
        sys.setswitchinterval(before)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--intervals", type=float, nargs="+", default=[0.005, 0.0005, 0.0001, 0.00002],
                   help="GIL switch intervals to try, seconds (Python's default first)")
    p.add_argument("--threads", type=int, default=None, help="worker torch threads (default: the CPU rank's)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="small shapes")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()

    from overspill.runtime.cpu_rank import default_threads
    from overspill.runtime.hardware import machine_facts

    threads = args.threads or default_threads()
    shape = dict(hidden=256, kv_heads=1, group=2, cols=512, cache_tokens=32) if args.smoke else \
        dict(hidden=4096, kv_heads=4, group=4, cols=7558, cache_tokens=512)
    mlp, attention, mlp_script = modules(**shape)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {**provenance.header("gil_contention", stamp, machine_facts()), "threads": threads,
              "host_cores": len(os.sched_getaffinity(0)), "shape": shape, "runs": []}
    for name, fn in (("mlp", mlp), ("mlp_script", mlp_script), ("attention", attention)):
        for interval in args.intervals:
            alone = worker_ms(fn, threads, False, interval, args.iters)
            busy = worker_ms(fn, threads, True, interval, args.iters)
            run = {"share": name, "switch_interval_s": interval, "alone_ms": alone, "launcher_busy_ms": busy,
                   "slowdown_busy_vs_alone": busy / alone}
            record["runs"].append(run)
            print(f"{name:9s} interval {interval * 1e3:6.3f} ms: alone {alone:7.3f} ms, while launching {busy:7.3f} ms "
                  f"({busy / alone:.2f}x)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gil-contention-{'smoke' if args.smoke else '8b-share'}-{threads}t-{stamp}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
