"""What speculative decoding buys a streamed model: pass cost against tokens per pass, then plain
streaming against speculative decoding with an oracle draft at controlled acceptance.

The oracle proposes plain greedy's own continuation, each token replaced by a wrong one with
probability 1 - acceptance (`overspill.runtime.drafts.OracleDrafter`); the target still decides
every token, so the output must equal plain greedy's, and `identical` says whether it did. One load,
random weights (speed is honest, acceptance is set by the oracle, not by the model).

    python bench/speculative.py --model llama-3-8b --budget 6GiB
    python bench/speculative.py --model llama-3-70b --budget 80GiB --new-tokens 40
    python bench/speculative.py --smoke     # tiny model on the CPU: checks the script only
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
from smoke import SMOKE_CONFIG, layer_sizes, smoke_model, spread_layers, streamed_plan, sync as _sync  # noqa: E402

def pass_costs(model, ids, ks: list[int], repeats: int, serial: bool = False) -> dict[int, float]:
    """Seconds of one forward over k new tokens after the prompt's cache, median of `repeats`;
    `serial`: each layer once per token inside the pass, as serial verification runs it."""
    import contextlib

    import torch

    from overspill.api import placement_of
    from overspill.runtime.drafts import drop_last
    from overspill.runtime.kv import cache_kwarg
    from overspill.runtime.token_serial import serial_tokens

    kwarg = cache_kwarg(model)
    cache = placement_of(model).generate_cache(model.config, 1, ids.shape[1] + max(ks))
    with torch.inference_mode():
        model(input_ids=ids, **{kwarg: cache}, use_cache=True, logits_to_keep=1)
        out = {}
        for k in [ks[0]] + ks:  # the first k twice: a warm-up
            times = []
            for _ in range(repeats):
                step = ids[:, -k:] if k <= ids.shape[1] else ids[:, :1].repeat(1, k)
                _sync()
                t0 = time.perf_counter()
                with serial_tokens(model) if serial else contextlib.nullcontext():
                    model(input_ids=step, **{kwarg: cache}, use_cache=True, logits_to_keep=k)
                _sync()
                times.append(time.perf_counter() - t0)
                drop_last(cache, k)
            out[k] = statistics.median(times)
    return out


def fit(costs: dict[int, float]):
    """A pass over n tokens as `base + per_token * n`: the least-squares line through the measured pass over
    the fewest tokens (the plain step the forecast compares against), its slope floored at 0 (on a link-bound
    pass noise can make it negative). A free intercept went to 0 or below on steep serial costs, and the
    forecast divided by it."""
    from overspill.planning.speculation import PassCost

    n0 = min(costs)
    t0 = costs[n0]
    var = sum((n - n0) ** 2 for n in costs)
    slope = max(0.0, sum((n - n0) * (costs[n] - t0) for n in costs) / var) if var else 0.0
    return PassCost(base_s=t0 - slope * n0, per_token_s=slope)


def timed_generate(model, ids, new_tokens: int) -> tuple[list[int], dict]:
    import torch

    from overspill.run import TimingStreamer

    streamer = TimingStreamer(None)
    _sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer)
    _sync()
    times = streamer.times
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None
    return out[0, ids.shape[1]:].tolist(), {"ttft_s": times[0] - start, "decode_tok_s": decode,
                                            "wall_s": time.perf_counter() - start}


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    graphed = record.get("graphed") or {}
    for key, label, style in (("pass_seconds", "batched", "o-"), ("serial_pass_seconds", "serial", "s-")):
        series = record.get(key)
        if series:
            ks = sorted(int(k) for k in series)
            a.plot(ks, [series[str(k)] * 1e3 for k in ks], style, label=label)
    if graphed.get("verify_pass_seconds"):
        series = graphed["verify_pass_seconds"]
        ks = sorted(int(k) for k in series)
        a.plot(ks, [series[str(k)] * 1e3 for k in ks], "^-", label="serial, graphed")
    a.legend()
    a.set_xscale("log", base=2)
    a.set_xlabel("tokens in one pass")
    a.set_ylabel("ms per pass")
    a.set_title(f"{record['model']} at {record['budget']}: pass cost")
    labels, measured, predicted = [], [], []
    for tag, plain, runs in (("", record.get("plain"), record.get("runs") or []),
                             ("graphed ", graphed.get("plain"), graphed.get("runs") or [])):
        if plain:
            labels.append(f"{tag}plain")
            measured.append(plain["decode_tok_s"])
            predicted.append(None)
        for r in runs:
            if "error" not in r:
                labels.append(f"{tag}{r['verify']} a={r['acceptance']} k={r['chain'] or 'auto'}")
                measured.append(r["decode_tok_s"])
                predicted.append(r["predicted_tok_s"])
    x = range(len(labels))
    b.bar(x, measured, label="measured")
    b.scatter([i for i in x if predicted[i]], [p for p in predicted if p], color="k", zorder=3, label="predicted")
    b.set_xticks(list(x), labels, rotation=30, ha="right")
    b.set_ylabel("decode tok/s")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="shipped config name (random weights)")
    p.add_argument("--budget", default="6GiB", help="gpu_memory for overspill.load")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--pass-k", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="pass-cost sweep")
    p.add_argument("--serial-k", type=int, nargs="+", default=[1, 9, 17],
                   help="pass-cost sweep with serial verification (a chain of c drafts is a pass of c + 1 tokens)")
    p.add_argument("--repeats", type=int, default=2, help="passes per point of the sweep (median)")
    p.add_argument("--points", nargs="+", default=["0.6:8", "0.8:8", "0.8:16", "0.9:8", "0.9:16", "0.8:auto"],
                   help="oracle runs as ACCEPTANCE:CHAIN (auto: the planner adapts the chain)")
    p.add_argument("--verify", nargs="+", default=["serial"], choices=["serial", "batched"],
                   help="serial: one token at a time inside each layer (plain's arithmetic); batched: one k-token pass")
    p.add_argument("--self-draft", action="store_true",
                   help="then load again with speculate='self' (the planner sizes the int4 draft inside the "
                        "budget) and time it against plain decoding of that same plan (random weights: its "
                        "acceptance is meaningless, reported as measured)")
    p.add_argument("--self-only", action="store_true",
                   help="only the --self-draft load (one load of a large model fits a device call)")
    p.add_argument("--spread", action="store_true",
                   help="then load the same plan with its streamed layers spread evenly among the resident ones and "
                        "run plain decoding, the serial pass sweep and the oracle points again (serial verify only)")
    p.add_argument("--layout", choices=["prefix", "spread"], default="prefix",
                   help="which layers the first load streams (overspill.load's layout): spread hides a serial verify "
                        "pass's resident-layer compute under the copies (--smoke places its own plan: ignored)")
    p.add_argument("--graphs", action="store_true",
                   help="after the eager runs, turn CUDA graphs on for the same model (plain steps and verify passes "
                        "graphed: GraphedDecode.verify) and run plain, the graphed verify pass sweep and the oracle "
                        "points again (each point twice: the first captures its graphs; the second is recorded)")
    p.add_argument("--graphs-only", action="store_true",
                   help="--graphs without the eager runs before it (one load of a large model fits a device call); "
                        "the oracle follows graphed plain decoding's tokens")
    p.add_argument("--warmup-tokens", type=int, default=16,
                   help="new tokens of the runs that capture CUDA graphs before the timed ones (graphs are kept per "
                        "pass size and ring phase, so a short run captures them: a 70B plain token is ~1.1 s)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
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
    path = out_dir / f"speculative-{name}-{args.budget}-{stamp}.json"
    context = args.prompt_tokens + args.new_tokens + max(args.pass_k) + 32
    given = {}
    if args.smoke:  # half the layers streamed, so the ring (and --spread) runs
        source, random_weights, budget = str(smoke_model(out_dir)), False, None
        given["plan"] = streamed_plan(Path(source), context, streamed=SMOKE_CONFIG["num_hidden_layers"] // 2)
    else:
        source, random_weights, budget = args.model, True, args.budget
    if args.self_only:
        self_only(source, budget, context, random_weights, args, path, stamp)
        return
    t0 = time.perf_counter()
    # bf16 copies, whatever `auto` would pick (lossless once nvCOMP is installed): the pass costs are bf16 streaming's
    if args.graphs_only and torch.cuda.is_available():  # the plan then holds the graphs' workspace
        given["cuda_graphs"] = True
    model, _ = overspill.load(source, gpu_memory=budget, context=context, random_weights=random_weights,
                              progress=False, stream_format="bf16", streaming="copy", layout=args.layout, **given)
    load_s = time.perf_counter() - t0
    plan = placement_of(model).plan
    print(plan.summary(), flush=True)
    print(f"loaded in {load_s:.0f} s", flush=True)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (1, args.prompt_tokens), generator=gen).to(placement_of(model).device)
    record = {
        **provenance.header("speculative", stamp, machine_facts()),
        "model": args.model if not args.smoke else "smoke", "budget": args.budget, "layout": args.layout,
        "load_s": load_s,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "plan_summary": plan.summary(), "predicted_plain_tok_s": plan.prediction.decode_tok_s if plan.prediction else None,
    }
    planner = planner_pass_cost(model, plan)
    if planner is not None:
        record["planner_pass_cost"] = {"base_s": planner.base_s, "per_token_s": planner.per_token_s,
                                       "dispatch_per_token_s": planner.dispatch_per_token_s}
    if args.graphs_only:
        record["runs"] = []
        record["graphed"] = graphed_run(model, ids, None, None, args, planner, vocab, record, path)
        path.write_text(json.dumps(record, indent=2))
        plot(record, path.with_suffix(".png"))
        print(f"wrote {path}")
        return
    costs = pass_costs(model, ids, args.pass_k, args.repeats)
    record["pass_seconds"] = {str(k): v for k, v in costs.items()}
    print("pass seconds:", {k: round(v * 1e3, 1) for k, v in costs.items()}, flush=True)
    fits = {"batched": fit(costs)}
    if "serial" in args.verify:
        serial_costs = pass_costs(model, ids, args.serial_k, args.repeats, serial=True)
        record["serial_pass_seconds"] = {str(k): v for k, v in serial_costs.items()}
        print("serial pass seconds:", {k: round(v * 1e3, 1) for k, v in serial_costs.items()}, flush=True)
        fits["serial"] = fit(serial_costs)
    record["pass_cost_fit"] = {mode: {"base_s": c.base_s, "per_token_s": c.per_token_s} for mode, c in fits.items()}
    record["pass_cost_fit"]["batched"][f"k{max(args.pass_k)}_over_k{min(args.pass_k)}"] = \
        costs[max(args.pass_k)] / costs[min(args.pass_k)]
    path.write_text(json.dumps(record, indent=2))

    plain_tokens, plain = timed_generate(model, ids, args.new_tokens)
    record["plain"] = plain
    print(f"plain: {plain}", flush=True)
    record["runs"] = []
    oracle_runs(model, ids, plain_tokens, plain, args, args.verify, fits, planner, vocab, record, path, record["runs"])
    if args.graphs:
        record["graphed"] = graphed_run(model, ids, plain_tokens, plain, args, planner, vocab, record, path)
        path.write_text(json.dumps(record, indent=2))
    if args.spread:
        spread = spread_layers(plan, layer_sizes(model))
        del model  # before the same plan loads again
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model = None
        record["spread"] = spread_run(spread, source, context, random_weights, ids, plain_tokens, args, planner, vocab,
                                      record, path)
        path.write_text(json.dumps(record, indent=2))
    if args.self_draft:
        del model
        record["self_draft"] = self_draft_run(source, budget, context, random_weights, ids.cpu(), args.new_tokens)
        path.write_text(json.dumps(record, indent=2))
    plot(record, path.with_suffix(".png"))
    print(f"wrote {path}")


def oracle_runs(model, ids, plain_tokens: list[int], plain: dict, args, verifies: list[str], fits: dict, planner,
                vocab: int, record: dict, path: Path, runs: list, label: str = "",
                new_tokens: int | None = None) -> None:
    """One run per (verify, ACCEPTANCE:CHAIN) point with the oracle draft, against `plain`'s tokens and speed,
    appended to `runs` (a list inside `record`) and written to `path` as each comes; `new_tokens` (default
    --new-tokens) shortens warm-up runs."""
    new_tokens = new_tokens or args.new_tokens
    import torch

    from overspill.planning.speculation import forecast
    from overspill.runtime import speculative
    from overspill.runtime.drafts import OracleDrafter

    for verify, point in [(v, pt) for v in verifies for pt in args.points]:
        acc_s, chain_s = point.split(":")
        acceptance, chain = float(acc_s), None if chain_s == "auto" else int(chain_s)
        drafter = OracleDrafter(torch.tensor(plain_tokens), args.prompt_tokens, acceptance, vocab, seed=1)
        speculative.enable(model, drafter, chain=chain, serial=verify == "serial")
        try:
            tokens, timing = timed_generate(model, ids, new_tokens)
        except Exception as exc:  # record it and go on: one load serves every point
            runs.append({"verify": verify, "acceptance": acceptance, "chain": chain, "error": repr(exc)[:500]})
            print(f"oracle {label}{verify} {point}: {exc!r}", flush=True)
            continue
        finally:
            speculative.enable(model, None)
        stats = model.speculation_stats
        mean_chain = sum(stats.chains) / len(stats.chains) if stats.chains else 0
        # an adaptive chain ("auto") is forecast at the mean chain the run drafted; a fixed one at its length
        drafted = round(mean_chain) if chain is None else chain
        predicted = forecast(fits[verify], acceptance, drafted)
        run = {
            "verify": verify, "serial": stats.serial, "acceptance": acceptance, "chain": chain,
            "identical": tokens == plain_tokens[:new_tokens],
            "first_difference": next((i for i, (a, b) in enumerate(zip(tokens, plain_tokens)) if a != b), None),
            **timing, "passes": stats.passes, "tokens_per_pass": stats.tokens_per_pass,
            "mean_chain": mean_chain, "draft_share": stats.draft_share,
            "speedup_vs_plain": timing["decode_tok_s"] / plain["decode_tok_s"] if timing["decode_tok_s"] else None,
            "predicted_tok_s": predicted.tok_s,
            "predicted_tokens_per_pass": predicted.tokens_per_pass,
        }
        run["measured_over_predicted"] = run["decode_tok_s"] / run["predicted_tok_s"] if run["decode_tok_s"] else None
        # the two factors of that ratio apart: a speculative step's time (draft + verify; decode time over the
        # passes after the first token) against the model at the forecast's chain (step_over_fit), and tokens
        # per pass against expected_tokens (acceptance noise over few passes)
        decode_s = (new_tokens - 1) / timing["decode_tok_s"] if timing["decode_tok_s"] else None
        run["step_s"] = decode_s / stats.passes if decode_s and stats.passes else None
        run["fit_step_s"] = fits[verify].step_seconds(drafted)
        run["step_over_fit"] = run["step_s"] / run["fit_step_s"] if run["step_s"] else None
        run["tokens_per_pass_over_predicted"] = (stats.tokens_per_pass / predicted.tokens_per_pass
                                                 if stats.passes else None)
        if planner is not None and verify == "serial":  # what `overspill plan --speculate` says before any run
            planned = forecast(planner, acceptance, drafted)
            run["planner_tok_s"] = planned.tok_s
            run["measured_over_planner"] = run["decode_tok_s"] / planned.tok_s if run["decode_tok_s"] else None
            run["planner_step_s"] = planner.step_seconds(drafted)
            run["step_over_planner"] = run["step_s"] / run["planner_step_s"] if run["step_s"] else None
        runs.append(run)
        path.write_text(json.dumps(record, indent=2))
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in run.items()}
        print(f"oracle {label}{verify} {point}: {shown}", flush=True)


def spread_run(spread, source, context: int, random_weights: bool, ids, plain_tokens: list[int], args, planner,
               vocab: int, record: dict, path: Path) -> dict:
    """The plan loaded again as `spread` (its streamed layers spread evenly among the resident ones:
    `smoke.spread_layers`, None where it cannot). A serial verify pass adds each resident layer's compute per
    token, which the link hides only where copies run beside it; streaming the first layers leaves the
    resident ones as one run the ring's few slots do not cover. Plain decoding, the serial pass sweep and the
    oracle points (serial verify) again; the planner's figures are the prefix plan's."""
    import overspill

    if spread is None:
        return {"error": "layers differ in size, KV lives in host memory or nothing streams: no spread plan"}
    model, _ = overspill.load(source, plan=spread, context=context, random_weights=random_weights, progress=False,
                              stream_format="bf16", streaming="copy")
    out = {"streamed_layers": list(spread.streamed_layers), "runs": []}
    record["spread"] = out
    plain_tokens_spread, plain = timed_generate(model, ids, args.new_tokens)
    out["plain"] = plain
    out["plain_identical_to_prefix"] = plain_tokens_spread == plain_tokens
    print(f"spread plain: {plain} (identical to prefix: {out['plain_identical_to_prefix']})", flush=True)
    serial_costs = pass_costs(model, ids, args.serial_k, args.repeats, serial=True)
    out["serial_pass_seconds"] = {str(k): v for k, v in serial_costs.items()}
    print("spread serial pass seconds:", {k: round(v * 1e3, 1) for k, v in serial_costs.items()}, flush=True)
    oracle_runs(model, ids, plain_tokens, plain, args, ["serial"], {"serial": fit(serial_costs)}, planner, vocab,
                record, path, out["runs"], "spread ")
    path.write_text(json.dumps(record, indent=2))
    return out


def graphed_run(model, ids, plain_tokens: list[int] | None, eager_plain: dict | None, args, planner, vocab: int,
                record: dict, path: Path) -> dict:
    """The same model with CUDA graphs on (capture only on CUDA; the CPU runs the fixed-buffer steps
    eagerly): plain graphed decoding, graphed verify passes over `--serial-k` tokens, and the oracle
    points, each run twice so the second replays the graphs the first captured. Without eager runs
    (`plain_tokens` None) graphed plain decoding's tokens are the reference."""
    import torch

    from overspill.runtime.graphs import enable_graphs

    from overspill.api import placement_of

    graphed = placement_of(model).graphs or enable_graphs(model, capture=torch.cuda.is_available())
    if graphed is None:
        return {"error": "this plan cannot be graphed (the log says why)"}
    out: dict = {"runs": [], "warmup_runs": [], "warmup_tokens": args.warmup_tokens}
    timed_generate(model, ids, args.warmup_tokens)  # captures the plain steps' graphs (one per ring phase)
    tokens, plain = timed_generate(model, ids, args.new_tokens)
    out["plain"] = plain
    out["plain_identical_to_eager"] = tokens == plain_tokens if plain_tokens is not None else None
    plain_tokens = tokens if plain_tokens is None else plain_tokens
    eager_plain = eager_plain or {}
    out["plain_speedup_vs_eager"] = (plain["decode_tok_s"] / eager_plain["decode_tok_s"]
                                     if plain["decode_tok_s"] and eager_plain.get("decode_tok_s") else None)
    print(f"graphed plain: {plain} (identical to eager: {out['plain_identical_to_eager']})", flush=True)
    costs = graphed_pass_costs(model, graphed, ids, args.serial_k)
    out["verify_pass_seconds"] = {str(k): v for k, v in costs.items()}
    print("graphed verify pass seconds:", {k: round(v * 1e3, 1) for k, v in costs.items()}, flush=True)
    fits = {"serial": fit(costs)}
    planner = planner_pass_cost(model, placement_of(model).plan, graphed=True) if planner is not None else None
    if planner is not None:
        out["planner_pass_cost"] = {"base_s": planner.base_s, "per_token_s": planner.per_token_s,
                                    "dispatch_per_token_s": planner.dispatch_per_token_s}
    oracle_runs(model, ids, plain_tokens, plain, args, ["serial"], fits, planner, vocab, record, path,
                out["warmup_runs"], "graphed (capturing) ", args.warmup_tokens)
    oracle_runs(model, ids, plain_tokens, plain, args, ["serial"], fits, planner, vocab, record, path, out["runs"],
                "graphed ")
    for run in out["runs"]:
        if run.get("decode_tok_s") and eager_plain.get("decode_tok_s"):
            run["speedup_vs_eager_plain"] = run["decode_tok_s"] / eager_plain["decode_tok_s"]
    out["replays"], out["eager_steps"], out["graphs"] = graphed.replays, graphed.eager_steps, len(graphed.graphs)
    return out


def graphed_pass_costs(model, graphed, ids, ks: list[int], repeats: int = 6) -> dict[int, float]:
    """Seconds of one graphed verify pass over k tokens after the prompt's cache: the median of the
    last half of `repeats` passes (the first of each ring phase captures)."""
    import torch

    cache = graphed.fresh_cache(1)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **{graphed.key: cache})
        out = {}
        for k in ks:
            step = ids[:, -k:] if k <= ids.shape[1] else ids[:, :1].repeat(1, k)
            times = []
            for _ in range(repeats):
                _sync()
                t0 = time.perf_counter()
                graphed.verify(step)
                _sync()
                times.append(time.perf_counter() - t0)
                cache.crop(-k)
            out[k] = statistics.median(times[repeats // 2 :])
    return out


def planner_pass_cost(model, plan, graphed: bool = False, draft_per_token_s: float = 0.0):
    """The serial verify pass cost the planner derives from the plan's prediction and the probed
    machine (`planning.speculation.plan_pass_cost`; `graphed`: passes replayed as CUDA graphs), or None
    without a prediction or a GPU."""
    import torch

    from overspill.planning.speculation import plan_pass_cost
    from overspill.runtime.hardware import probe
    from overspill.runtime.loader import decoder_layers, measured_spec

    if plan.prediction is None or not torch.cuda.is_available():
        return None
    spec = measured_spec(model, decoder_layers(model)[1], model.dtype)
    return plan_pass_cost(plan.prediction, spec.active_bytes / spec.dtype_bytes, probe().matmul_flops_s, serial=True,
                          draft_per_token_s=draft_per_token_s, graphed=graphed)


def self_draft_pass_cost(model, plan, draft):
    """The serial verify pass and draft cost `overspill plan --speculate self` charges this plan (None without
    a prediction, a draft or a GPU)."""
    import torch

    from overspill.planning.self_draft import Machine, draft_token_seconds
    from overspill.runtime.hardware import probe
    from overspill.runtime.loader import decoder_layers, footprint

    if draft is None or not torch.cuda.is_available():
        return None
    layers = decoder_layers(model)[1]
    draft_s = draft_token_seconds(footprint(model, layers, model.dtype), draft.weight_bytes, len(draft.layers),
                                  Machine.of(probe()))
    return planner_pass_cost(model, plan, draft_per_token_s=draft_s)


def self_only(source, budget, context: int, random_weights: bool, args, path: Path, stamp: str) -> None:
    """`--self-only`: `self_draft_run` on its own, the prompt drawn from the config's vocabulary."""
    import torch

    from overspill.runtime.hardware import machine_facts
    from overspill.runtime.sources import resolve

    config = resolve(source, random_weights, config_only=True).config()
    vocab = config.get("text_config", config)["vocab_size"]
    ids = torch.randint(2, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    record = {**provenance.header("speculative", stamp, machine_facts()), "model": args.model if not args.smoke
              else "smoke", "budget": args.budget, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    record["self_draft"] = self_draft_run(source, budget, context, random_weights, ids, args.new_tokens)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


def self_draft_run(source, budget, context: int, random_weights: bool, ids, new_tokens: int) -> dict:
    """`speculate='self'` end to end: the planner's draft, then plain decoding of that same plan (the
    draft's bytes push bf16 layers onto the link) against speculative decoding with the draft."""
    import gc

    import torch

    import overspill
    from overspill.api import placement_of
    from overspill.runtime import speculative

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model, _ = overspill.load(source, gpu_memory=budget, context=context, random_weights=random_weights,
                              progress=False, speculate="self")
    load_s = time.perf_counter() - t0
    plan = placement_of(model).plan
    draft = model.self_draft
    print(plan.summary(), flush=True)
    ids = ids.to(placement_of(model).device)
    drafter = model.speculation_drafter  # the one load built inside the plan (a second would not fit)
    speculative.enable(model, None)
    plain_tokens, plain = timed_generate(model, ids, new_tokens)
    out = {"load_s": load_s, "plan_summary": plan.summary(),
           "draft": draft.describe(len(plan.layer_tiers)) if draft is not None else None,
           "plain_same_plan": plain, "runs": []}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    planner = self_draft_pass_cost(model, plan, draft)
    for chain in (4, 8):
        speculative.enable(model, drafter, chain=chain)
        tokens, timing = timed_generate(model, ids, new_tokens)
        stats = model.speculation_stats
        speculative.enable(model, None)
        run = {"chain": chain, "identical": tokens == plain_tokens, **timing, "passes": stats.passes,
               "tokens_per_pass": stats.tokens_per_pass, "draft_share": stats.draft_share,
               "speedup_vs_plain_same_plan": timing["decode_tok_s"] / plain["decode_tok_s"]
               if timing["decode_tok_s"] and plain["decode_tok_s"] else None}
        if planner is not None and stats.passes:
            # the planner at the acceptance this run measured (random weights: meaningless as a forecast of a
            # real model's acceptance, but it checks the pass and draft cost the planner charges)
            from overspill.planning.speculation import forecast

            planned = forecast(planner, stats.acceptance, chain)
            run["planner_tok_s_at_measured_acceptance"] = planned.tok_s
            run["measured_over_planner"] = timing["decode_tok_s"] / planned.tok_s if timing["decode_tok_s"] else None
            run["planner_draft_s_per_token"] = planner.draft_per_token_s
        out["runs"].append(run)
        print(f"self chain {chain}: {run}", flush=True)
    if torch.cuda.is_available():
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["planned_device_bytes"] = plan.device_bytes
    return out


if __name__ == "__main__":
    main()
