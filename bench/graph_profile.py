"""Where a graphed decode step's time goes: the graph on the GPU, `generate` on the host, the kernels.

For one placement (8B shape, random weights) with `cuda_graphs=True`, measures per token:
- `generate`'s wall time (greedy, as `bench/graph_decode.py` times it);
- the captured graph alone, replayed back to back (CUDA events): the GPU's share;
- a loop that only advances the fixed buffers and replays, with argmax on the device and no host
  sync per token: what decode costs when the host never waits;
- the top CUDA kernels of one replay (torch profiler).

    python bench/graph_profile.py --budget none
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
from smoke import seconds_per_call


def main() -> None:
    import torch

    import overspill
    from overspill.api import placement_of

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b", help="shipped config name (random weights)")
    p.add_argument("--budget", default="none", help="GPU budget, or none for fully resident")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, _ = overspill.load(args.model, gpu_memory=None if args.budget == "none" else args.budget,
                              random_weights=True, context=args.context, progress=False, cuda_graphs=True)
    placement = placement_of(model)
    graphed = placement.graphs
    ids = decode._prompt(model.config.vocab_size, 16).cuda()
    mask = torch.ones_like(ids)
    model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=args.tokens + 1, min_new_tokens=args.tokens + 1,
                   do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    generate_ms = (time.perf_counter() - t0) * 1e3 / (args.tokens + 1)  # prefill included: an upper bound

    record: dict = {"generate_ms_per_token_incl_prefill": generate_ms, "graphs": len(graphed.graphs),
                    "capture_on": graphed.capture}
    if graphed.graphs and placement.ring is None:
        graph = next(iter(graphed.graphs.values()))[0]
        record["replay_gpu_ms"] = seconds_per_call(graph.replay, 50) * 1e3
        t0 = time.perf_counter()
        for _ in range(50):
            graph.replay()
        record["replay_host_ms"] = (time.perf_counter() - t0) * 1e3 / 50
        torch.cuda.synchronize()

    # A decode loop with no host sync: argmax on the device feeds the next step's buffers.
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    token = ids[:, -1:]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    steps = min(args.tokens, args.context - ids.shape[1] - 4)
    for _ in range(steps):
        graphed._load_inputs(token, None, None)
        token = graphed.run(graphed._body)[:, -1].argmax(-1, keepdim=True)
        graphed.length += 1
    torch.cuda.synchronize()
    record["no_sync_loop_ms_per_token"] = (time.perf_counter() - t0) * 1e3 / steps

    from torch.profiler import ProfilerActivity, profile

    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    for label, capture in (("graphed", graphed.capture), ("eager_fixed_buffers", False)):
        graphed.capture, was = capture, graphed.capture
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
        graphed.capture = was
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        record[f"profile_{label}_4_steps"] = table.splitlines()
        print(label, table, sep="\n")
    record.update(command=provenance.command(), git_commit=provenance.git_commit(),
                  model=args.model, budget=args.budget, context=args.context, device=torch.cuda.get_device_name(),
                  streamed_layers=len(placement.plan.streamed_layers))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"graph-profile-{args.model}-{args.budget}-{stamp}.json"
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if not k.startswith("profile_")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
