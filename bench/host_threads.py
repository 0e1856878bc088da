"""Why the CPU rank's worker thread multiplies bf16 weights at half the main thread's rate (issue 16).

On the H100 host at 5638238 (16 cores), `F.linear` of one token by a 14336x4096 bf16 weight ran at 39.7 G params/s
on the main thread with 16 torch threads and 21.6 G on a fresh worker thread with 15: the worker's share then takes
twice what the plan allowed. This times the same GEMV on the main thread and on one persistent worker thread at
several thread counts, each in a fresh process under each OpenMP wait policy (libgomp's threads spin after a
parallel region unless told to sleep: a worker's pool spinning beside the main one's would halve both). No GPU.

    python bench/host_threads.py                   # 14336x4096, threads 8, 12, 15, 16 (capped at the cores)
    python bench/host_threads.py --smoke           # small shapes, checks the script
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

POLICIES = ("default", "PASSIVE", "ACTIVE")


def measure(rows: int, cols: int, threads: list[int], iters: int) -> dict:
    """G params/s of the GEMV on the main thread and on a persistent worker, per thread count (this process)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from torch.nn import functional as F

    from overspill.runtime import host_probe as hp

    w = torch.randn(rows, cols).to(torch.bfloat16)
    x = torch.randn(1, cols).to(torch.bfloat16)
    out = {}
    with ThreadPoolExecutor(1) as worker:
        for n in threads:
            torch.set_num_threads(n)
            main = rows * cols / hp._timed(lambda: F.linear(x, w), iters, 3)

            def on_worker():
                torch.set_num_threads(n)
                return hp._timed(lambda: F.linear(x, w), iters, 3)

            worker_rate = rows * cols / worker.submit(on_worker).result()
            # the main thread's pool just ran: is the worker's first call slower while that pool still spins?
            F.linear(x, w)
            after_main = rows * cols / worker.submit(lambda: hp._timed(lambda: F.linear(x, w), 1, 0)).result()
            out[str(n)] = {"main_g": main / 1e9, "worker_g": worker_rate / 1e9,
                           "worker_right_after_main_g": after_main / 1e9, "worker_over_main": worker_rate / main}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[8, 12, 15, 16], help="torch threads to try")
    p.add_argument("--iters", type=int, default=20, help="timed calls per point (median)")
    p.add_argument("--smoke", action="store_true", help="a small weight, few calls")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    rows, cols = (512, 256) if args.smoke else (14336, 4096)
    cores = len(os.sched_getaffinity(0))
    threads = sorted({min(n, cores) for n in args.threads})
    if args.child:
        print(json.dumps(measure(rows, cols, threads, 3 if args.smoke else args.iters)))
        return
    from overspill.runtime.hardware import machine_facts

    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {**provenance.header("host_threads", stamp, machine_facts()), "shape": [rows, cols],
              "host_cores": cores, "policies": {}}
    for policy in POLICIES:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        argv = [sys.executable, __file__, "--child", policy, "--threads", *map(str, threads), "--iters", str(args.iters)]
        done = subprocess.run(argv + (["--smoke"] if args.smoke else []), env=env, capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            record["policies"][policy] = {"error": done.stderr[-500:]}
            print(f"{policy}: failed: {done.stderr[-300:]}", flush=True)
            continue
        record["policies"][policy] = json.loads(done.stdout.strip().splitlines()[-1])
        for n, r in record["policies"][policy].items():
            print(f"OMP_WAIT_POLICY={policy:8s} threads {n:>2}: main {r['main_g']:5.1f} G/s, worker {r['worker_g']:5.1f}"
                  f" ({r['worker_over_main']:.2f}x), worker's first call right after main "
                  f"{r['worker_right_after_main_g']:5.1f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"host-threads-{'smoke' if args.smoke else '14336x4096'}-{stamp}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
