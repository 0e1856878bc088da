"""Expert-aware MoE streaming against dense-layer streaming: one random-weight shape, one budget.

For each mode (`dense`: streamed MoE layers cross whole; `experts`: the ring carries attention, router,
norms and shared experts and only the routed experts the batch selects cross, into a GPU expert cache),
one load planned for the largest batch, then greedy decode at each batch. Recorded per (mode, batch):
decode tok/s (all rows), link bytes per step and per token actually moved during decode (ring bytes of
the streamed layers + expert bytes the cache copied), expert cache hits / misses / hit rate, the floor
(pinned bandwidth from the probe / bytes moved per step) and `fraction_of_floor`, the planner's
prediction, peak GPU memory, and `speedup_vs_dense` with `tokens_identical_to_dense`. Random weights
route about uniformly (every expert equally likely), which is the planner's prior and the cache's worst
case; real checkpoints route unevenly. Issue 17's targets at batch 1: Scout >= 4x dense, Mixtral >= 2.2x,
each >= 85% of its own floor.

    python bench/moe.py --model mixtral-8x7b --budget 24GiB
    python bench/moe.py --model llama-4-scout-109b --budget auto --modes dense --batches 1 8   # H200: host share fits
    python bench/moe.py --model llama-4-scout-109b --budget auto --modes experts --dense-json DENSE.json
    python bench/moe.py --model llama-4-scout-109b --budget auto --modes experts --depth 6 --dense-json DENSE.json
    python bench/moe.py --model llama-4-scout-109b --budget auto --modes experts --spread --dense-json DENSE.json
    python bench/moe.py --smoke     # tiny Mixtral on the CPU: checks the script only
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import provenance  # noqa: E402 - after the path
from smoke import layer_sizes, spread_layers, streamed_plan, sync  # noqa: E402

from overspill.planning.placement import DEFAULT_DEPTH  # noqa: E402

TARGETS = {"mixtral-8x7b": 2.2, "llama-4-scout-109b": 4.0}  # speedup over dense streaming at batch 1
SMOKE_CONFIG = dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
                    num_local_experts=8, num_experts_per_tok=2, initializer_range=0.1)
MODES = {"dense": dict(moe_streaming="dense"), "experts": dict(moe_streaming="experts"),
         "experts+cpu": dict(moe_streaming="experts", cpu_experts="auto")}
HOST_MARGIN = 12 * 2**30  # host memory kept free beside the pinned streamed layers (process, page cache)


class DecodeMeter:
    """A `generate` streamer that timestamps every generated token and snapshots the expert cache's
    counters at the first one, so bytes and hits cover decode steps only (not the prompt's prefill)."""

    def __init__(self, cache):
        self.cache = cache
        self.times: list[float] = []
        self.at_first: tuple[int, int, int, int] | None = None
        self._prompt = True

    def counters(self) -> tuple[int, int, int, int]:
        c = self.cache
        return (c.hits, c.misses, c.bytes_copied, c.host_computed) if c is not None else (0, 0, 0, 0)

    def put(self, value) -> None:
        if self._prompt:
            self._prompt = False
            return
        sync()
        self.times.append(time.perf_counter())
        if self.at_first is None:
            self.at_first = self.counters()

    def end(self) -> None:
        pass


def ring_bytes_per_step(placement) -> int:
    """Bytes the ring copies per step: every streamed layer's ring buffer (whole layers when dense)."""
    ring = placement.ring
    return sum(layer.host.numel() for layer in ring.layers) if ring is not None else 0


def decode(model, ids, new_tokens: int) -> dict:
    """Greedy decode of `ids` [batch, prompt]: tokens, steady tok/s over all rows (first token excluded)
    and the expert cache's counters over those steps."""
    import torch

    placement = model.overspill
    meter = DecodeMeter(placement.experts)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=meter)
    sync()
    steps = len(meter.times) - 1
    elapsed = meter.times[-1] - meter.times[0] if steps > 0 else 0.0
    hits, misses, copied, on_host = (a - b for a, b in zip(meter.counters(), meter.at_first or (0, 0, 0, 0)))
    return {"tokens": out[:, ids.shape[1]:].tolist(), "steps": steps,
            "decode_tok_s": ids.shape[0] * steps / elapsed if elapsed else None,
            "step_s": elapsed / steps if steps else None,
            "hits": hits, "misses": misses, "expert_bytes": copied, "experts_computed_on_host": on_host}


def earlier_dense(path: Path, record: dict, tokens: dict) -> dict[int, float]:
    """Dense tok/s per batch from an earlier run's JSON (`provenance.baseline_runs`), whose tokens join
    `tokens` for the comparison."""
    runs = [r for r in provenance.baseline_runs(path, record) if r.get("mode") == "dense" and r.get("decode_tok_s")]
    for run in runs:
        if run.get("tokens") is not None:
            tokens["dense", run["batch"]] = run["tokens"]
    return {r["batch"]: r["decode_tok_s"] for r in runs}


def smoke_checkpoint(out_dir: Path) -> Path:
    """A seeded tiny Mixtral (8 experts, 2 per token) saved under `out_dir/smoke-moe`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(SMOKE_CONFIG)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d), dtype=torch.float32)
    path = out_dir / "smoke-moe"
    model.save_pretrained(path)
    return path


def host_share_check(model: str, budget: str, depth: int) -> None:
    """Refuse before loading when the host could not hold the streamed share of the model (the loader
    would pin it all): streamed bytes from the planner at this budget against available host memory."""
    import psutil
    import torch

    from overspill.planning.configs import shipped_config
    from overspill.planning.placement import AUTO_MARGIN_BYTES, place
    from overspill.planning.plan import Workload, footprint_from_spec
    from overspill.planning.spec import spec_from_config
    from overspill.planning.units import parse_budget

    fp = footprint_from_spec(spec_from_config(shipped_config(model)))
    value = parse_budget(budget)
    if value == "auto":
        value = torch.cuda.mem_get_info()[0] - AUTO_MARGIN_BYTES if torch.cuda.is_available() else None
    plan = place(fp, value, Workload(4096, 1), depth)
    host = sum(fp.layer_bytes[i] for i in plan.streamed_layers) + (fp.embed_bytes if plan.embed_tier.value == "host" else 0)
    available = psutil.virtual_memory().available
    if host + HOST_MARGIN > available:
        raise SystemExit(f"{model} at {budget}: {host / 2**30:.1f} GiB would live in host memory, "
                         f"{available / 2**30:.1f} GiB is available (keeping {HOST_MARGIN / 2**30:.0f} GiB free): "
                         f"a larger GPU budget or more host memory is needed")


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in record["runs"] if r.get("decode_tok_s")]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(runs))
    ax.bar(x, [r["decode_tok_s"] for r in runs], label="measured")
    floors = [(i, r["floor_tok_s"]) for i, r in enumerate(runs) if r.get("floor_tok_s")]
    if floors:
        ax.scatter([i for i, _ in floors], [f for _, f in floors], color="k", marker="_", s=600, label="floor")
    ax.set_xticks(list(x), [f"{r['mode']}\nbatch {r['batch']}" for r in runs])
    ax.set_ylabel("decode tok/s (all rows)")
    ax.set_title(f"{record['model']} at {record['budget']}: dense vs expert-aware streaming")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixtral-8x7b", help="shipped config name (random weights)")
    p.add_argument("--budget", default="24GiB", help="gpu_memory for overspill.load ('auto': free memory - margin)")
    p.add_argument("--modes", nargs="+", default=["dense", "experts"], choices=list(MODES),
                   help="dense, experts, experts+cpu (expert streaming with --cpu-experts auto)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--dense-json", default=None, metavar="PATH",
                   help="an earlier run's JSON (same model, budget and machine) whose dense runs give "
                        "speedup_vs_dense and tokens_identical_to_dense when dense is not among --modes "
                        "(two loads of a large shape may not fit one call)")
    p.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                   help=f"layers the ring copies ahead (ring slots = depth + 1; default {DEFAULT_DEPTH}). Expert streaming's "
                        "slots are small, so a deeper ring may keep the link busy through a long run of resident layers")
    p.add_argument("--spread", action="store_true",
                   help="after each mode's load, load its plan again with the streamed layers spread evenly among the "
                        "resident ones (runs labelled MODE@spread; layers of one size only)")
    p.add_argument("--smoke", action="store_true", help="tiny Mixtral on the CPU, every layer streamed")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()

    import torch

    import overspill
    from overspill.runtime.hardware import machine_facts
    from overspill.runtime.routing import measured_moe_plan

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = "smoke" if args.smoke else args.model
    path = out_dir / f"moe-{name}-{args.budget}-{stamp}.json"
    context = args.prompt_tokens + args.new_tokens + 8
    batch = max(args.batches)
    if args.smoke:
        source = smoke_checkpoint(out_dir)
        random_weights, budget = False, streamed_plan(source, context, batch, args.depth).device_bytes
    else:
        host_share_check(args.model, args.budget, args.depth)
        source, random_weights, budget = args.model, True, args.budget
    link = None
    if torch.cuda.is_available():
        from overspill.runtime.hardware import probe

        link = probe().h2d_bytes_s
    record = {**provenance.header("moe", stamp, machine_facts()), "model": name, "budget": args.budget,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "depth": args.depth,
              "pinned_h2d_bytes_s": link,
              "routing": "random weights: about uniform over experts", "runs": []}
    tokens: dict[tuple[str, int], list] = {}
    earlier = {}  # dense tok/s per batch from --dense-json, read before loading so a wrong file costs nothing
    if args.dense_json and "dense" not in args.modes:
        earlier = earlier_dense(Path(args.dense_json), record, tokens)
    for mode in args.modes:
        spread_from = None  # the mode's plan, to load again with its streamed layers spread (--spread)
        for layout in ("prefix", "spread") if args.spread else ("prefix",):
            label = mode if layout == "prefix" else f"{mode}@spread"
            if layout == "spread" and spread_from is None:
                record["runs"].append({"mode": label, "error": "no spread plan: the prefix load failed, layers differ "
                                                               "in size, KV lives in host memory or nothing streams"})
                continue
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            given = {} if layout == "prefix" else {"plan": spread_from}
            try:
                model, _ = overspill.load(str(source), gpu_memory=budget, context=context, batch=batch, depth=args.depth,
                                          random_weights=random_weights, progress=False, **MODES[mode], **given)
            except Exception as exc:  # record it and go on to the next mode
                record["runs"].append({"mode": label, "error": repr(exc)[:500]})
                print(f"{label}: {exc!r}", flush=True)
                continue
            load_s = time.perf_counter() - t0
            placement = model.overspill
            plan = placement.plan
            if layout == "prefix" and args.spread:
                spread_from = spread_layers(plan, layer_sizes(model))
            ring = ring_bytes_per_step(placement)
            vocab = model.config.get_text_config().vocab_size
            for b in args.batches:
                ids = torch.randint(2, vocab, (b, args.prompt_tokens), generator=torch.Generator().manual_seed(b))
                got = decode(model, ids.to(placement.device), args.new_tokens)
                tokens[label, b] = got["tokens"]
                per_step = ring + (got["expert_bytes"] / got["steps"] if got["steps"] else 0)
                tok_s = got["decode_tok_s"]
                floor = b * link / per_step if link and per_step else None
                looked = got["hits"] + got["misses"]
                again = measured_moe_plan(model, batch=b) if placement.experts is not None else None  # measured routing
                run = {
                    "mode": label, "batch": b, "load_s": round(load_s, 1), **got,
                    "moe_streaming": plan.moe_streaming, "layout": layout, "streamed": list(plan.streamed_layers),
                    "streamed_layers": len(plan.streamed_layers), "depth": plan.depth, "ring_slots": plan.slots,
                    "expert_slots": plan.expert_slots, "expert_slot_bytes": plan.expert_slot_bytes,
                    "ring_bytes_per_step": ring, "link_bytes_per_step": per_step, "link_bytes_per_token": per_step / b,
                    "hit_rate": got["hits"] / looked if looked else None,
                    "link_bytes_s": per_step * tok_s / b if tok_s else None,
                    "floor_tok_s": floor, "fraction_of_floor": tok_s / floor if floor and tok_s else None,
                    "planned_bytes_per_step": plan.streamed_bytes_per_step,
                    "predicted_tok_s": plan.prediction.decode_tok_s if plan.prediction and b == batch else None,
                    "predicted_tok_s_measured_routing": again.prediction.decode_tok_s
                    if again and again.prediction else None,
                    "predicted_link_bytes_per_token_measured_routing": again.streamed_bytes_per_step / b
                    if again else None,
                    "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                    "planned_device_bytes": plan.device_bytes, "notes": list(plan.notes),
                }
                record["runs"].append(run)
                print(f"{label} b={b}: " + ", ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}"
                                                    for k, v in run.items() if k not in ("notes", "tokens", "streamed")),
                      flush=True)
                path.write_text(json.dumps(record, indent=2))
            del model, placement
    dense = {r["batch"]: r["decode_tok_s"] for r in record["runs"] if r.get("mode") == "dense" and r.get("decode_tok_s")}
    dense = dense or earlier
    for run in record["runs"]:
        if run.get("mode", "dense") != "dense" and run.get("decode_tok_s") and dense.get(run["batch"]):
            run["speedup_vs_dense"] = run["decode_tok_s"] / dense[run["batch"]]
            if ("dense", run["batch"]) in tokens:
                run["tokens_identical_to_dense"] = tokens[run["mode"], run["batch"]] == tokens["dense", run["batch"]]
            if run["batch"] == 1 and args.model in TARGETS and not args.smoke:
                run["target_speedup"] = TARGETS[args.model]
    experts = {r["batch"]: r["decode_tok_s"] for r in record["runs"] if r.get("mode") == "experts" and r.get("decode_tok_s")}
    for run in record["runs"]:  # the host's share of the misses against copying them all
        if run.get("mode") == "experts+cpu" and run.get("decode_tok_s") and experts.get(run["batch"]):
            run["speedup_vs_experts"] = run["decode_tok_s"] / experts[run["batch"]]
            if ("experts", run["batch"]) in tokens:
                a, b = tokens["experts+cpu", run["batch"]], tokens["experts", run["batch"]]
                same = [x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
                run["token_agreement_with_experts"] = sum(same) / len(same) if same else None
    path.write_text(json.dumps(record, indent=2))
    plot(record, path.with_suffix(".png"))
    for run in record["runs"]:
        if "speedup_vs_dense" in run:
            print(f"{run['mode']} batch {run['batch']}: {run['speedup_vs_dense']:.2f}x dense, "
                  f"{run['fraction_of_floor'] or 0:.2f} of its floor" if link else
                  f"{run['mode']} batch {run['batch']}: {run['speedup_vs_dense']:.2f}x dense")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
