"""Real acceptance on the embedded SmolLM2-135M-Instruct (the one real model we ship): how many
tokens a verify pass yields for each draft source, chain length and tree budget, and whether the
output is plain greedy's. CPU is enough: acceptance does not depend on the device.

The prompt asks for a summary of a bundled public-domain text (the opening of the US Declaration
of Independence, bench/data/declaration.txt), the case prompt lookup is for.

    python bench/speculative_acceptance.py                       # ngram: chains 4, 8, 16, auto; trees 32, 64
    python bench/speculative_acceptance.py --sources ngram draft:embedded --trees 32 64
    python bench/speculative_acceptance.py --dtype bfloat16
    python bench/speculative_acceptance.py --sources ngram self --chains 4 8 16 32 64 --trees 32 64
                                                                 # trees against chains of equal budget

A source is any `make_drafter` string; `draft:embedded` drafts with the embedded model itself
(the only real model here, so its drafts are the target's own greedy choices up to rounding).
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

import provenance  # noqa: E402 - after the path

PROMPTS = {
    "summarize": "Summarize the following text in a few sentences, keeping its key phrases:\n\n{text}",
    "quote": "Copy the second paragraph of the following text exactly, then say in one line what it claims:\n\n{text}",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chains", nargs="+", default=["4", "8", "16", "auto"])
    p.add_argument("--sources", nargs="+", default=["ngram"])
    p.add_argument("--trees", nargs="*", type=int, default=[32, 64], help="tree budgets (tokens a pass)")
    p.add_argument("--prompts", nargs="+", default=sorted(PROMPTS), choices=sorted(PROMPTS))
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()

    import torch

    import overspill
    from overspill.runtime import speculative
    from overspill.runtime.drafts import make_drafter
    from overspill.runtime.hardware import machine_facts
    from overspill.runtime.sources import resolve

    text = (ROOT / "bench" / "data" / "declaration.txt").read_text()
    model, tok = overspill.load(None, gpu_memory=None, dtype=args.dtype, device="cpu", progress=False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {**provenance.header("speculative_acceptance", stamp, machine_facts()),
              "model": "SmolLM2-135M-Instruct (embedded GGUF, converted)", "dtype": args.dtype,
              "new_tokens": args.new_tokens, "text": "bench/data/declaration.txt", "runs": []}
    drafters = {source: make_drafter(source.replace("draft:embedded", f"draft:{resolve(None).config_dir}"), model)
                for source in args.sources}
    shapes = [("chain", chain) for chain in args.chains] + [("tree", str(budget)) for budget in args.trees]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"speculative-acceptance-smollm2-{args.dtype}-{stamp}.json"
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
    for prompt_name in args.prompts:
        chat = [{"role": "user", "content": PROMPTS[prompt_name].format(text=text)}]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        speculative.enable(model, None)
        t0 = time.perf_counter()
        want = model.generate(ids, **gen)
        plain_s = time.perf_counter() - t0
        print(f"{prompt_name}: plain {want.shape[1] - ids.shape[1]} tokens in {plain_s:.1f} s:",
              repr(tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)[:160]), flush=True)
        for source in args.sources:
            for mode, size in shapes:
                chain = None if mode == "tree" or size == "auto" else int(size)
                speculative.enable(model, drafters[source], chain=chain, tree=int(size) if mode == "tree" else None,
                                   adapt_tree=False)  # trees against chains at equal, fixed budgets
                t0 = time.perf_counter()
                got = model.generate(ids, **gen)
                seconds = time.perf_counter() - t0
                stats = model.speculation_stats
                run = {"prompt": prompt_name, "prompt_tokens": ids.shape[1], "source": source, "mode": mode,
                       "size": size,
                       "identical": torch.equal(got, want), "new_tokens": got.shape[1] - ids.shape[1],
                       "verify_passes": stats.passes, "tokens_per_pass": stats.tokens_per_pass,
                       "drafted": stats.drafted, "accepted": stats.accepted,
                       "acceptance_of_drafted": stats.acceptance, "serial": stats.serial,
                       "mean_drafted_per_pass": stats.drafted / max(stats.passes, 1),
                       "tree_rank_rates": stats.ranks.rates if mode == "tree" else None,
                       "draft_seconds": stats.draft_seconds, "plain_seconds": plain_s, "seconds": seconds}
                record["runs"].append(run)
                out.write_text(json.dumps(record, indent=2))  # kept if the run is cut short
                print(f"  {source} {mode} {size}: {run['tokens_per_pass']:.2f} tokens/pass, "
                      f"{stats.accepted}/{stats.drafted} drafted accepted, identical={run['identical']}", flush=True)
        speculative.enable(model, None)
    record["tree_gain_over_chain"] = tree_gains(record["runs"])
    out.write_text(json.dumps(record, indent=2))
    print("tree over chain at equal drafted tokens a pass:", record["tree_gain_over_chain"])
    print(f"wrote {out}")


def tree_gains(runs: list[dict]) -> list[dict]:
    """Tokens per pass of a tree over a chain drafting as many tokens a pass (the issue's equal budget),
    per prompt and source, wherever both ran."""
    chains = {(r["prompt"], r["source"], r["size"]): r for r in runs if r["mode"] == "chain"}
    gains = []
    for r in runs:
        chain = chains.get((r["prompt"], r["source"], r["size"])) if r["mode"] == "tree" else None
        if chain and chain["tokens_per_pass"]:
            gains.append({"prompt": r["prompt"], "source": r["source"], "budget": int(r["size"]),
                          "tree_tokens_per_pass": r["tokens_per_pass"], "chain_tokens_per_pass": chain["tokens_per_pass"],
                          "tree_over_chain": r["tokens_per_pass"] / chain["tokens_per_pass"]})
    return gains


if __name__ == "__main__":
    main()
