"""Where a load's and a generate's peak GPU memory goes: torch's allocator history replayed to the peak.

    python bench/memory_peak.py --model llama-3-8b --gpu-memory 6GiB --context 256 --stream-format int4

Prints the plan's device total, the peak allocated during load and during generate (each against the
plan), and the largest blocks live at the overall peak with the Python frames that made them. Writes JSON
under --out. For a peak above the plan, this names what the plan does not count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402 - after the path

GIB = 2**30


def _where(frames: list[dict]) -> str:
    """The innermost frames of overspill or transformers that made a block."""
    own = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames
           if "overspill" in f["filename"] or "transformers" in f["filename"]]
    return " <- ".join(own[:3]) or (f"{frames[0]['filename']}:{frames[0]['line']}" if frames else "?")


def live_at_peak(snapshot: dict) -> tuple[int, list[tuple[int, str]]]:
    """(peak bytes seen by the trace, [(bytes, where)] of the blocks live then), replaying alloc/free events."""
    events = [e for trace in snapshot["device_traces"] for e in trace]
    live: dict[int, tuple[int, list]] = {}
    total = peak = peak_index = 0
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            total += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
        if total > peak:
            peak, peak_index = total, i
    live.clear()
    for e in events[: peak_index + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    grouped: Counter[str] = Counter()
    for size, frames in live.values():
        grouped[_where(frames)] += size
    return peak, grouped.most_common(12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3-8b", help="shipped config name or checkpoint path")
    ap.add_argument("--gpu-memory", default="6GiB", help="GPU budget")
    ap.add_argument("--context", type=int, default=256, help="planned context tokens")
    ap.add_argument("--stream-format", default="bf16", help="stream format (bf16, int8, fp8, int4, lossless, auto)")
    ap.add_argument("--moe-streaming", default="auto", help="auto, dense or experts")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt length")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated")
    ap.add_argument("--out", default="bench/results", help="folder for the JSON")
    args = ap.parse_args()

    import torch

    import overspill
    from overspill.api import placement_of

    # Python frames only: C++ stacks made a Mixtral load outlast its 220 s on an H100 (nothing printed)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.time()
    model, _ = overspill.load(args.model, gpu_memory=args.gpu_memory, random_weights=True, progress=False,
                              context=args.context, stream_format=args.stream_format, moe_streaming=args.moe_streaming)
    plan = placement_of(model).plan
    load_peak = torch.cuda.max_memory_allocated() - base
    print(f"loaded in {time.time() - t0:.0f} s: plan {plan.device_bytes / GIB:.3f} GiB, load peak {load_peak / GIB:.3f} GiB, "
          f"budget {plan.budget_bytes / GIB:.3f} GiB", flush=True)
    torch.cuda.reset_peak_memory_stats()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).cuda()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False,
                   pad_token_id=0)
    gen_peak = torch.cuda.max_memory_allocated() - base
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    traced_peak, blocks = live_at_peak(snapshot)
    result = {
        "model": args.model, "gpu_memory": args.gpu_memory, "context": args.context,
        "stream_format": plan.stream_format, "moe_streaming": plan.moe_streaming,
        "plan_device_bytes": plan.device_bytes, "budget_bytes": plan.budget_bytes,
        "load_peak_bytes": load_peak, "generate_peak_bytes": gen_peak,
        "load_peak_over_plan": round(load_peak / plan.device_bytes, 4),
        "generate_peak_over_plan": round(gen_peak / plan.device_bytes, 4),
        "traced_peak_bytes": traced_peak,
        "live_at_peak": [{"bytes": b, "where": w} for w, b in blocks],
        "wall_s": round(time.time() - t0, 1),
    }
    result = {**provenance.header("memory_peak", time.strftime("%Y%m%d-%H%M%S"),
                                  {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}), **result}
    print(f"{args.model} {plan.stream_format} at {args.gpu_memory}: plan {plan.device_bytes / GIB:.3f} GiB, "
          f"load peak {load_peak / GIB:.3f} GiB, generate peak {gen_peak / GIB:.3f} GiB, "
          f"budget {plan.budget_bytes / GIB:.3f} GiB")
    for w, b in blocks:
        print(f"  {b / 2**20:9.1f} MiB  {w}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"memory-peak-{Path(args.model).name}-{plan.stream_format}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    (out / name).write_text(json.dumps(result, indent=2))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
