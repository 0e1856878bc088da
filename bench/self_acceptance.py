"""Real acceptance of the `self` draft (the model's own layers in int4) on the embedded
SmolLM2-135M-Instruct: tokens a verify pass yields at each chain length and share of drafted layers,
on the prompts of bench/speculative_acceptance.py, with the output checked against plain greedy.

Also the per-token acceptance each run implies (the `a` whose expected tokens per pass at that chain,
`(1 - a^(k+1)) / (1 - a)`, equal the measured ones): the prior `overspill.planning.self_draft` plans on.

    python bench/self_acceptance.py                                 # every layer, chains 4, 8, 16
    python bench/self_acceptance.py --shares 1 0.5 --chains 8
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
from speculative_acceptance import PROMPTS  # noqa: E402


def implied_acceptance(tokens_per_pass: float, chain: int) -> float:
    """The per-token acceptance whose expected tokens per pass at `chain` are `tokens_per_pass`."""
    from overspill.planning.speculation import expected_tokens

    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if expected_tokens(mid, chain) < tokens_per_pass else (low, mid)
    return (low + high) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chains", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--shares", nargs="+", type=float, default=[1.0], help="fractions of the layers drafted")
    p.add_argument("--prompts", nargs="+", default=sorted(PROMPTS), choices=sorted(PROMPTS))
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()

    import torch

    import overspill
    from overspill.planning.self_draft import spread_layers
    from overspill.runtime import speculative
    from overspill.runtime.hardware import machine_facts
    from overspill.runtime.self_draft import draft_device_bytes, make_self_drafter

    text = (ROOT / "bench" / "data" / "declaration.txt").read_text()
    model, tok = overspill.load(None, gpu_memory=None, dtype=args.dtype, device="cpu", progress=False)
    n = model.config.num_hidden_layers
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {**provenance.header("self_acceptance", stamp, machine_facts()),
              "model": "SmolLM2-135M-Instruct (embedded GGUF, converted)", "dtype": args.dtype,
              "draft": f"int4 groups of {args.group}, torch's int4 weight-only matmul, bfloat16 activations",
              "new_tokens": args.new_tokens, "text": "bench/data/declaration.txt", "runs": []}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"self-acceptance-smollm2-{args.dtype}-{stamp}.json"
    drafters = {share: make_self_drafter(model, spread_layers(n, max(1, round(share * n))), args.group)
                for share in args.shares}
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
    for prompt_name in args.prompts:
        chat = [{"role": "user", "content": PROMPTS[prompt_name].format(text=text)}]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        speculative.enable(model, None)
        t0 = time.perf_counter()
        want = model.generate(ids, **gen)
        plain_s = time.perf_counter() - t0
        print(f"{prompt_name}: plain {want.shape[1] - ids.shape[1]} tokens in {plain_s:.1f} s", flush=True)
        for share, drafter in drafters.items():
            for chain in args.chains:
                drafter.reset()
                speculative.enable(model, drafter, chain=chain)
                t0 = time.perf_counter()
                got = model.generate(ids, **gen)
                seconds = time.perf_counter() - t0
                stats = model.speculation_stats
                run = {"prompt": prompt_name, "prompt_tokens": ids.shape[1], "source": "self",
                       "layers": len(drafter.model.self_draft_layers), "of_layers": n, "chain": chain,
                       "draft_bytes": draft_device_bytes(drafter.model),
                       "identical": torch.equal(got, want), "new_tokens": got.shape[1] - ids.shape[1],
                       "verify_passes": stats.passes, "tokens_per_pass": stats.tokens_per_pass,
                       "drafted": stats.drafted, "accepted": stats.accepted,
                       "acceptance_of_drafted": stats.acceptance,
                       "implied_per_token_acceptance": implied_acceptance(stats.tokens_per_pass, chain),
                       "draft_share_of_time": stats.draft_share, "plain_seconds": plain_s, "seconds": seconds}
                record["runs"].append(run)
                out.write_text(json.dumps(record, indent=2))  # kept if the run is cut short
                print(f"  {run['layers']}/{n} layers, chain {chain}: {run['tokens_per_pass']:.2f} tokens/pass "
                      f"(per-token {run['implied_per_token_acceptance']:.2f}), {stats.accepted}/{stats.drafted} "
                      f"accepted, identical={run['identical']}, {seconds:.0f} s (plain {plain_s:.0f} s)", flush=True)
    speculative.enable(model, None)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
