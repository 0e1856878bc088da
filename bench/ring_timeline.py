"""Where does a streamed decode step lose time? Records CUDA events around every ring copy and reports
copy-engine busy time, idle gaps (and at which layer they open), per-copy bandwidth and step time.

    python bench/ring_timeline.py --budget 6GiB --depth 2 [--embed-on-device] [--no-cudnn-sdpa]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import overspill  # noqa: E402
from overspill.api import placement_of  # noqa: E402
from overspill.runtime import loader, streams  # noqa: E402


class TimelineCopier(streams.CudaCopier):
    """CudaCopier that records when each copy starts/ends on the copy stream."""

    def __init__(self, device, slots):
        super().__init__(device, slots)
        self.records = []  # (slot, nbytes, start_event, end_event)

    def copy(self, dst, src, slot):
        if self.done_recorded[slot]:
            self.stream.wait_event(self.done[slot])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        end.record(self.stream)
        self.ready[slot].record(self.stream)
        self.records.append((slot, src.numel(), start, end))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--budget", default="6GiB")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--embed-on-device", action="store_true")
    p.add_argument("--no-cudnn-sdpa", action="store_true")
    args = p.parse_args()
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    streams.CudaCopier = TimelineCopier
    loader.CudaCopier = TimelineCopier
    if args.embed_on_device:
        original = loader.footprint
        loader.footprint = lambda *a, **k: dataclasses.replace(original(*a, **k), host_embedding_ok=False)
    budget = None if args.budget == "none" else args.budget
    model, _ = overspill.load(args.model, gpu_memory=budget, random_weights=True, depth=args.depth, progress=False)
    placement = placement_of(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=3, **kw)
    torch.cuda.synchronize()
    copier = placement.ring.copier if placement.ring else None
    if copier:
        copier.records.clear()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=args.tokens, **kw)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = {"args": vars(args), "resident": len(placement.plan.resident_layers),
           "streamed": len(placement.plan.streamed_layers), "tok_s_incl_prefill": args.tokens / wall}
    if copier and copier.records:
        recs = copier.records
        first = recs[0][2]
        spans = [(first.elapsed_time(s), first.elapsed_time(e), n) for _, n, s, e in recs]
        busy = sum(e - s for s, e, _ in spans)
        total = spans[-1][1] - spans[0][0]
        gaps = [(spans[i + 1][0] - spans[i][1], i + 1) for i in range(len(spans) - 1)]
        n_streamed = len(placement.plan.streamed_layers)
        by_pos: dict[int, float] = {}
        for g, i in gaps:
            by_pos[i % n_streamed] = by_pos.get(i % n_streamed, 0.0) + g
        per_copy_gbs = sorted(n / ((e - s) / 1e3) / 1e9 for s, e, n in spans)
        out.update(
            copies=len(spans), copy_busy_ms=busy, copy_window_ms=total, copy_busy_fraction=busy / total,
            per_copy_GB_s_median=per_copy_gbs[len(per_copy_gbs) // 2], per_copy_GB_s_min=per_copy_gbs[0],
            gap_ms_by_ring_position={k: round(v, 2) for k, v in sorted(by_pos.items(), key=lambda kv: -kv[1])[:6]},
            step_ms=total / (len(spans) / n_streamed),
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
