"""What fewer bytes per trip buy a streamed model: decode speed per stream format against bf16 streaming.

For each format, one load of the same random-weight shape under the same budget (the planner places
it: an encoded format's bigger slots may stream a layer or two more), then greedy decode. Recorded
per format: tok/s, bytes over the link per step and the link GB/s that achieves, the format's own
floor (pinned bandwidth from the probe / encoded bytes per step) and the fraction of it reached,
`speedup_vs_bf16`, the GPU time to expand one layer (median, CUDA events), and for lossless whether
the tokens equal bf16's. Issue 15's targets: lossless >= 1.35x bf16 with identical tokens, int8 >= 1.8x,
int4 >= 3x, each >= 90% of its own floor.

    python bench/compressed.py --model llama-3-8b --budget 6GiB
    python bench/compressed.py --model llama-3-70b --budget 80GiB --formats bf16 int4 --new-tokens 8
    python bench/compressed.py --model llama-3-70b --budget 80GiB --formats lossless int8 --bf16-json BF16.json
    python bench/compressed.py --smoke     # tiny model on the CPU: checks the script only
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import provenance  # noqa: E402 - after the path
from smoke import smoke_model, streamed_plan, sync as _sync  # noqa: E402

TARGETS = {"lossless": 1.35, "int8": 1.8, "int4": 3.0}  # speedup over bf16 streaming


def timed_generate(model, ids, new_tokens: int) -> tuple[list[int], float | None]:
    """Greedy tokens and steady decode tok/s (first token excluded)."""
    import torch

    from overspill.run import TimingStreamer

    streamer = TimingStreamer(None)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer)
    _sync()
    t = streamer.times
    return out[0, ids.shape[1]:].tolist(), (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else None


def expand_seconds(placement, repeats: int = 10) -> float | None:
    """Median time to expand the first streamed layer from bytes already in a staging buffer."""
    import torch

    ring = placement.ring
    if ring is None or not ring.layers or ring.layers[0].encoded is None:
        return None
    layer = ring.layers[0]
    buf = ring.slot_buffers[0]
    staging, out = ring.expander.staging[0][: layer.host.numel()], buf[: layer.layout.nbytes]
    ring.copier.synchronize()
    staging.copy_(layer.host)
    times = []
    for _ in range(repeats + 1):
        if buf.is_cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            with ring.expander.on_stream():  # where the ring expands (nvCOMP decodes there), ordered around `begin`/`end`
                layer.encoded.expand(staging, out, ring.expander)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            layer.encoded.expand(staging, out, ring.expander)
            times.append(time.perf_counter() - t0)
    ring.reset()  # the slot's layer was overwritten in place: the next step restarts the ring
    return statistics.median(times[1:])


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in record["runs"] if r.get("decode_tok_s")]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(runs))
    ax.bar(x, [r["decode_tok_s"] for r in runs], label="measured")
    floors = [(i, r["format_floor_tok_s"]) for i, r in enumerate(runs) if r.get("format_floor_tok_s")]
    if floors:
        ax.scatter([i for i, _ in floors], [f for _, f in floors], color="k", marker="_", s=600, label="format floor")
    ax.set_xticks(list(x), [r["format"] for r in runs])
    ax.set_ylabel("decode tok/s (batch 1)")
    ax.set_title(f"{record['model']} at {record['budget']}: stream formats")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="shipped config name (random weights)")
    p.add_argument("--budget", default="6GiB", help="gpu_memory for overspill.load")
    p.add_argument("--formats", nargs="+", default=["bf16", "lossless", "int8", "fp8", "int4"])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--bf16-json", default=None, metavar="PATH",
                   help="an earlier run's JSON (same model, budget and GPU) whose bf16 run gives speedup_vs_bf16 "
                        "and tokens_identical_to_bf16 when bf16 is not among --formats (a 70B load per format "
                        "may not fit one call)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, every layer streamed")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()

    import torch

    import overspill
    from overspill.api import placement_of
    from overspill.runtime.hardware import machine_facts

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = "smoke" if args.smoke else args.model
    path = out_dir / f"compressed-{name}-{args.budget}-{stamp}.json"
    context = args.prompt_tokens + args.new_tokens + 8
    if args.smoke:
        source, random_weights, budget = str(smoke_model(out_dir)), False, None
        plan = streamed_plan(source, context)
    else:
        source, random_weights, budget, plan = args.model, True, args.budget, None
    link = None
    if torch.cuda.is_available():
        from overspill.runtime.hardware import probe

        link = probe().h2d_bytes_s
    record = {**provenance.header("compressed", stamp, machine_facts()), "model": name, "budget": args.budget,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "pinned_h2d_bytes_s": link,
              "runs": []}
    ids = None
    tokens: dict[str, list[int]] = {}
    earlier = None  # bf16's run from --bf16-json, read before loading so a wrong file costs nothing
    if args.bf16_json and "bf16" not in args.formats:
        runs = provenance.baseline_runs(Path(args.bf16_json), record)
        earlier = next((r for r in runs if r.get("format") == "bf16" and r.get("decode_tok_s")), None)
        if earlier is None:
            raise SystemExit(f"{args.bf16_json}: no bf16 run with a decode speed in it")
        if earlier.get("tokens") is not None:
            tokens["bf16"] = earlier["tokens"]
    for fmt in args.formats:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:  # a failure loading or measuring one format is recorded; the next format still runs
            t0 = time.perf_counter()
            model, _ = overspill.load(source, gpu_memory=budget, context=context, random_weights=random_weights,
                                      progress=False, plan=plan, stream_format=fmt)
            load_s = time.perf_counter() - t0
            placement = placement_of(model)
            pl = placement.plan
            if ids is None:
                vocab = model.config.get_text_config().vocab_size
                ids = torch.randint(2, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
            got, tok_s = timed_generate(model, ids.to(placement.device), args.new_tokens)
            tokens[fmt] = got
            sent = pl.streamed_bytes_per_step
            floor = link / sent if link and sent else None
            run = {
                "format": fmt, "load_s": round(load_s, 1), "decode_tok_s": tok_s, "tokens": got,
                "streamed_layers": len(pl.streamed_layers), "streamed_bytes_per_step": sent,
                "layer_bytes": placement.ring.layers[0].layout.nbytes if placement.ring else None,
                "link_bytes_s": sent * tok_s if tok_s else None, "format_floor_tok_s": floor,
                "fraction_of_format_floor": tok_s / floor if floor and tok_s else None,
                "predicted_tok_s": pl.prediction.decode_tok_s if pl.prediction else None,
                "expand_s_per_layer": expand_seconds(placement),
                "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                "notes": list(pl.notes),
            }
            if fmt != "bf16" and "bf16" in tokens:
                run["tokens_identical_to_bf16"] = got == tokens["bf16"]
            record["runs"].append(run)
            print(f"{fmt}: " + ", ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in run.items()
                                         if k not in ("notes", "tokens")), flush=True)
            path.write_text(json.dumps(record, indent=2))
        except Exception as exc:
            record["runs"].append({"format": fmt, "error": repr(exc)[:500]})
            print(f"{fmt}: {exc!r}", flush=True)
            path.write_text(json.dumps(record, indent=2))
        model = placement = None  # freed before the next format's load
    measured = next((r["decode_tok_s"] for r in record["runs"] if r["format"] == "bf16" and r.get("decode_tok_s")), None)
    base = measured if measured is not None else earlier["decode_tok_s"] if earlier else None
    for run in record["runs"]:
        if base and run.get("decode_tok_s"):
            run["speedup_vs_bf16"] = run["decode_tok_s"] / base
            if run["format"] in TARGETS:
                run["target_speedup"] = TARGETS[run["format"]]
    path.write_text(json.dumps(record, indent=2))
    plot(record, path.with_suffix(".png"))
    for run in record["runs"]:
        if "speedup_vs_bf16" in run:
            print(f"{run['format']:9s} {run['speedup_vs_bf16']:.2f}x bf16")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
