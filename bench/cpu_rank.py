"""What the host CPU adds as a second tensor-parallel rank (issue 16): batch-1 decode of one streamed
random-weight shape, plain streaming against the same model with its streamed layers split.

One load per call (a 70B load is most of a call's time): greedy decode with plain streaming, then
`cpu_rank.enable` splits the same placed model's streamed layers at the planner's fraction (or
`--fraction`) and decodes again. Recorded: tok/s of both against the link floor (probed pinned
bandwidth / streamed bytes), `speedup_vs_plain`, `fraction_of_link_floor` (issue 16's target:
>= 1.8), the fraction used and the planner's prediction, the worker's busy time and the Python
thread's wait at joins per step, greedy agreement, and each decode step's logits against plain
streaming's while the tokens agree (the first step is the prompt's pass, computed on the GPU).
It also times the host GEMV the old way and the new way (`runtime.host_probe`) to show which of
the old probe's choices under-measured it.

    python bench/cpu_rank.py --model llama-3-8b --budget 6GiB
    python bench/cpu_rank.py --model llama-3-70b --budget 80GiB --new-tokens 8
    python bench/cpu_rank.py --model llama-3-8b --budget 6GiB --host-format int8
    python bench/cpu_rank.py --smoke     # tiny model on the CPU: checks the script only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import provenance  # noqa: E402 - after the path
from smoke import smoke_model, streamed_plan, sync as _sync  # noqa: E402


def decode(model, ids, new_tokens: int):
    """(tokens, steady decode tok/s with the first token excluded, logits per step [steps, vocab] float32)."""
    import torch

    from overspill.run import TimingStreamer

    streamer = TimingStreamer(None)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer,
                             return_dict_in_generate=True, output_logits=True)
    _sync()
    t = streamer.times
    logits = torch.stack([step[0].float().cpu() for step in out.logits])
    return out.sequences[0, ids.shape[1]:].tolist(), (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else None, logits


def compare_logits(plain, split, tokens_plain: list[int], tokens_split: list[int]) -> dict:
    """Largest difference of the steps both runs reached with the same tokens before them."""
    agree = 0
    while agree < len(tokens_plain) and tokens_plain[agree] == tokens_split[agree]:
        agree += 1
    steps = min(agree + 1, len(tokens_plain))  # step k's logits depend on tokens before k
    diff = (plain[:steps] - split[:steps]).abs()
    scale = plain[:steps].abs().amax(dim=-1, keepdim=True)
    cos = (plain[:steps] * split[:steps]).sum(-1) / (plain[:steps].norm(dim=-1) * split[:steps].norm(dim=-1))
    return {"steps_compared": steps, "max_abs_diff": float(diff.max()),
            "max_diff_over_max_logit": float((diff / scale).max()), "min_cosine": float(cos.min()),
            "greedy_agreement": sum(a == b for a, b in zip(tokens_plain, tokens_split)) / len(tokens_plain),
            "first_divergence": agree if agree < len(tokens_plain) else None}


def probe_forms(threads: int) -> dict:
    """Host bf16 GEMV (14336x4096) in the old probe's form and in the new one's, and the steps between."""
    import torch
    from torch.nn import functional as F

    from overspill.runtime import host_probe as hp

    w = torch.randn(hp.ROWS, hp.COLS).to(torch.bfloat16)
    vec, row = torch.randn(hp.COLS).to(torch.bfloat16), torch.randn(1, hp.COLS).to(torch.bfloat16)
    params = hp.ROWS * hp.COLS
    default = torch.get_num_threads()
    return {
        "torch_default_threads": default,
        "old_probe": hp.old_probe_rate(),  # 1-D w @ x, 1 warm-up, 5 calls, default threads
        "mv_default_threads_warm": params / hp._timed(lambda: w @ vec, 20, 3),
        "linear_default_threads_warm": params / hp._timed(lambda: F.linear(row, w), 20, 3),
        "mv_worker_threads_warm": params / hp.on_threads(threads, lambda: hp._timed(lambda: w @ vec, 20, 3)),
        "linear_worker_threads_warm": hp.linear_rate(torch.bfloat16, threads),
        "worker_threads": threads,
    }


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in record["runs"] if r.get("decode_tok_s")]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(range(len(runs)), [r["decode_tok_s"] for r in runs], color=["tab:gray"] + ["tab:blue"] * (len(runs) - 1))
    ax.set_xticks(range(len(runs)), [r["name"] for r in runs])
    if record.get("link_floor_tok_s"):
        ax.axhline(record["link_floor_tok_s"], color="k", linestyle="--", label="link floor (plain)")
    predicted = [(i, r["predicted_tok_s"]) for i, r in enumerate(runs) if r.get("predicted_tok_s")]
    if predicted:
        ax.scatter([i for i, _ in predicted], [p for _, p in predicted], color="r", marker="_", s=800, label="planned")
    ax.set_ylabel("decode tok/s (batch 1)")
    ax.set_title(f"{record['model']} at {record['budget']}: CPU rank")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="shipped config name (random weights)")
    p.add_argument("--budget", default="6GiB", help="gpu_memory for overspill.load")
    p.add_argument("--fraction", type=float, default=None,
                   help="CPU fraction of each streamed layer (default: the planner's, as cpu_compute='on' picks)")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: the probe's choice)")
    p.add_argument("--host-format", default="bf16", choices=["bf16", "int8"],
                   help="the CPU share's weights on the worker: bf16, or int8 with a scale per row (lossy; issue "
                        "16's target: >= 3x the bf16 link floor)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--also-threads", type=int, nargs="*", default=[],
                   help="decode the split model again with each of these worker thread counts (same split)")
    p.add_argument("--also-switch-interval", type=float, nargs="*", default=[],
                   help="then once more with each sys.setswitchinterval(S): how long the worker waits for the GIL "
                        "while the Python thread launches GPU work (Python's default interval: 0.005 s)")
    p.add_argument("--also-eager", action="store_true",
                   help="then once more with the worker's norm and MLP share run op by op, not as one traced call "
                        "(runtime.host_call: each eager op takes the GIL back while the Python thread launches)")
    p.add_argument("--smoke", action="store_true", help="tiny float32 model on the CPU, every layer streamed, fraction 0.8 (MLP columns "
                        "first: the least that also gives the host a KV head)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()

    import torch

    import overspill
    from overspill.api import placement_of
    from overspill.planning.cpu_rank import batch_table, max_tokens, off_batch, split_at, table_lines
    from overspill.runtime import cpu_rank
    from overspill.runtime.hardware import machine_facts
    from overspill.runtime.loader import decoder_layers, footprint

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = "smoke" if args.smoke else args.model
    path = out_dir / f"cpu-rank-{name}-{args.budget}-{args.host_format}-{stamp}.json"
    context = args.prompt_tokens + args.new_tokens + 8
    profile = None
    if torch.cuda.is_available() and not args.smoke:
        from overspill.runtime.hardware import probe

        profile = probe()
    threads = args.threads or (profile.cpu_threads if profile and profile.cpu_threads else cpu_rank.default_threads())
    record = {**provenance.header("cpu_rank", stamp, machine_facts()), "model": name, "budget": args.budget,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": threads,
              "host_format": args.host_format,
              "host_cores": len(os.sched_getaffinity(0)), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "profile": profile.__dict__ if profile else None,
              "gemv_forms_params_s": probe_forms(threads), "runs": []}
    print("host bf16 GEMV forms (params/s):", {k: f"{v / 1e9:.1f} G" if v > 1000 else v
                                                for k, v in record["gemv_forms_params_s"].items()}, flush=True)

    if args.smoke:
        source, random_weights, budget, dtype = str(smoke_model(out_dir)), False, None, "float32"
    else:
        source, random_weights, budget, dtype = args.model, True, args.budget, "auto"
    t0 = time.perf_counter()
    # bf16 copies, whatever `auto` would pick (lossless once nvCOMP is installed): the CPU rank splits those
    model, _ = overspill.load(source, gpu_memory=budget, dtype=dtype, context=context, random_weights=random_weights,
                              progress=False, plan=streamed_plan(source, context) if args.smoke else None,
                              stream_format="bf16", streaming="copy")
    record["load_s"] = round(time.perf_counter() - t0, 1)
    placement = placement_of(model)
    plan = placement.plan
    streamed = plan.streamed_bytes_per_step
    link = profile.h2d_bytes_s if profile else None
    floor = link / streamed if link and streamed else None
    record.update(streamed_layers=len(plan.streamed_layers), streamed_bytes_per_step=streamed, link_floor_tok_s=floor)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(2, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(placement.device)

    plain_tokens, plain_tok_s, plain_logits = decode(model, ids, args.new_tokens)
    record["runs"].append({"name": "plain streaming", "decode_tok_s": plain_tok_s,
                           "predicted_tok_s": plan.prediction.decode_tok_s if plan.prediction else None,
                           "fraction_of_link_floor": plain_tok_s / floor if floor and plain_tok_s else None})
    print(f"plain: {plain_tok_s:.3f} tok/s (link floor {floor})", flush=True)
    path.write_text(json.dumps(record, indent=2))

    fp = footprint(model, decoder_layers(model)[1], next(model.parameters()).dtype)
    planned = split_at(fp, plan, profile, 1, args.fraction, args.host_format) if profile else None
    fraction = args.fraction if args.fraction is not None else planned.fraction if planned else 0.8
    widest = max_tokens(fp, profile, args.host_format) if profile else 64
    record["off_batch"] = off_batch(fp, plan, profile, args.host_format) if profile else None  # where `auto` stops
    if profile:  # and why: the planner's fraction, link and host time per batch, as `overspill plan` shows them
        record["planner_batches"] = [{**dataclasses.asdict(s), "gain": s.gain}
                                     for s in batch_table(fp, plan, profile, args.host_format)]
        record["off_batch_why"] = table_lines(fp, plan, profile, args.host_format)[-1]
    print(f"the planner turns the CPU share off from batch {record['off_batch']}: {record.get('off_batch_why')}",
          flush=True)
    if not fraction:
        record["runs"].append({"name": f"CPU rank ({args.host_format})", "error": "the planned CPU share is 0"})
        path.write_text(json.dumps(record, indent=2))
        print("CPU rank: the planned CPU share is 0; nothing to split", flush=True)
        return
    rank = cpu_rank.enable(model, dict.fromkeys(plan.streamed_layers, fraction), threads, widest, args.host_format)
    layer = placement.ring.layers[0]
    steps = args.new_tokens + 1
    variants = [(f"CPU rank ({args.host_format})", None, None, True)]
    variants += [(f"CPU rank ({args.host_format}, {n} threads)", n, None, True) for n in args.also_threads]
    variants += [(f"CPU rank ({args.host_format}, GIL switch {s:g} s)", None, s, True)
                 for s in args.also_switch_interval]
    variants += [(f"CPU rank ({args.host_format}, eager host calls)", None, None, False)] if args.also_eager else []
    for name, n, interval, traced in variants:  # one split model; each run its own threads, GIL interval or calls
        rank.set_threads(n or threads)
        rank.reset_counters()
        rank.traced = traced
        before = sys.getswitchinterval()
        if interval:
            sys.setswitchinterval(interval)
        try:
            split_tokens, split_tok_s, split_logits = decode(model, ids, args.new_tokens)
        finally:
            sys.setswitchinterval(before)
        run = {"name": name, "decode_tok_s": split_tok_s, "fraction": fraction, "threads": rank.threads,
               "traced_host_calls": traced,
               "switch_interval_s": interval or before,
               "share": {"kv_heads": layer.share.kv_heads, "mlp_cols": layer.share.mlp_cols},
               "gpu_share_bytes_per_step": sum(layer.host.numel() for layer in placement.ring.layers),
               "predicted_tok_s": planned.tok_s if planned else None, "max_tokens": widest,
               "speedup_vs_plain": split_tok_s / plain_tok_s if split_tok_s and plain_tok_s else None,
               "fraction_of_link_floor": split_tok_s / floor if floor and split_tok_s else None,
               "worker_busy_s_per_step": rank.busy_s / steps, "join_wait_s_per_step": rank.waited_s / steps,
               "worker_input_wait_s_per_step": rank.input_wait_s / steps,
               "worker_queued_s_per_step": rank.queued_s / steps,
               "worker_compute_s_per_step": {k: v / steps for k, v in rank.computed_s.items()},
               "joins": rank.joins,
               "logits_vs_plain": compare_logits(plain_logits, split_logits, plain_tokens, split_tokens)}
        record["runs"].append(run)
        print("CPU rank: " + ", ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in run.items()),
              flush=True)
        path.write_text(json.dumps(record, indent=2))
    plot(record, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
