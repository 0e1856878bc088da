"""Which per-expert GPU kernel reproduces transformers' Llama 4 MoE bit for bit: one Scout-shaped block.

On the H200 at eb8a8ea (bench/results/moe-llama-4-scout-109b-auto-20261206-21*.json) expert-aware greedy
tokens left dense-layer streaming's from the first token at batch 1 (and after the prompt at batch 8),
while Mixtral's matched. `Llama4TextMoe` runs its experts as one bmm over all 16 experts (unselected ones
on zero inputs); `runtime.experts.Llama4RoutedMoe` runs a batch-1 bmm per selected expert on its cache
slot. If cuBLAS picks its kernel by batch count, the two round differently. This script builds one
`Llama4TextMoe` at the shipped Scout config's sizes (bf16, seeded random weights) and, for several token
counts, compares each way of computing the selected experts with the module's own output:

- `routed`: the shipped `Llama4RoutedMoe` over an `ExpertCache` (experts copied from pinned host memory; timed on
  cache hits, after the first call);
- `bmm1`: per selected expert, bmm on batch 1 (what `routed` does, without the cache);
- `mm`: per selected expert, a 2-D mm;
- `bmmN` (N in 2, 4, 8, 16): per selected expert, bmm over N batch entries, the expert's input in entry 0
  and zeros elsewhere, its weights expanded (batch stride 0, unlike the module's) to N entries;
- `entry`: the experts' bmm over all 16 experts, taking only the selected entries (equal to the module by
  construction: checks the harness);
- `window`: the selected experts copied (GPU to GPU) into a zeroed [16, ...] window at their own indices, then
  one bmm over all 16 as the module runs it: the same kernel by construction; its time is the price of
  identity this way (16 experts' reads per call plus the copies).

Each, with bf16 reduced-precision reductions allowed (torch's default) and forbidden (both sides), gives
`identical` (torch.equal on the block's output), `max_abs_diff` and the time of one call (CUDA events).

Then (`--whole-layers N`, 0 to skip) the end-to-end property on a Scout cut to N layers: greedy tokens of
the resident model, of dense-layer streaming and of expert-aware streaming at `--whole-budget`, batch 1
and 8, one process (the same seeded weights), so a mismatch shows without a 109B load.

    python bench/llama4_identity.py --out bench/results          # GPU, ~2 min
    python bench/llama4_identity.py --smoke                      # tiny sizes on the CPU: checks the script only
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import provenance  # noqa: E402 - after the path
from smoke import seconds_per_call  # noqa: E402

SMOKE_SIZES = dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=16)


def build(smoke: bool, device: str):
    """A `Llama4TextMoe` with the shipped Scout config's sizes (or tiny ones), seeded weights of std 0.02."""
    import torch
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    shipped = json.loads((ROOT / "overspill/planning/configs/llama-4-scout-109b.json").read_text())
    keys = ("hidden_size", "intermediate_size", "intermediate_size_mlp", "num_local_experts", "num_experts_per_tok",
            "hidden_act")
    sizes = {k: shipped[k] for k in keys}
    if smoke:
        sizes.update(SMOKE_SIZES)
    config = Llama4TextConfig(**sizes)
    torch.manual_seed(0)
    moe = Llama4TextMoe(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
    return moe.to(device=device, dtype=torch.bfloat16).eval(), config


def routed_module(moe, device):
    """The shipped expert-aware block over a cache of one layer's experts, its experts on pinned host memory."""
    import torch

    from overspill.runtime.experts import ExpertCache, Llama4RoutedMoe

    host = copy.deepcopy(moe)
    experts = host.experts
    pin = device.type == "cuda"
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(experts, name)
        p.data = p.data.cpu().pin_memory() if pin else p.data.cpu()
    shapes = [(tuple(experts.gate_up_proj.shape[1:]), torch.bfloat16), (tuple(experts.down_proj.shape[1:]), torch.bfloat16)]
    cache = ExpertCache(shapes, slots=experts.gate_up_proj.shape[0], device=device)
    return Llama4RoutedMoe(host, 0, cache)


def routed_inputs(moe, x):
    """Each expert's inputs as transformers forms them ([E, T, H]: the tokens times their routing scores, zero
    where unselected) and the experts some token selected."""
    scores, _ = moe.router(x)
    num_experts = scores.shape[1]
    per = (x.repeat(num_experts, 1) * scores.transpose(0, 1).reshape(-1, 1)).view(num_experts, -1, x.shape[-1])
    return per, (scores != 0).sum(dim=0).nonzero().flatten().tolist()


def per_expert(moe, x, compute):
    """The block's output with each selected expert's [1, T, H] output from `compute(inputs, e)`, summed as
    transformers does."""
    import torch

    per, selected = routed_inputs(moe, x)
    routed_out = torch.zeros_like(per)
    for e in selected:
        routed_out[e : e + 1] = compute(per, e)
    out = moe.shared_expert(x)
    out.add_(routed_out.sum(dim=0))
    return out


def windowed(moe, x, window):
    """The block's output with one bmm over a [16, ...] window holding the selected experts at their indices
    (`window`: zeroed tensors shaped like the experts' parameters; other entries keep what they held)."""
    import torch

    per, selected = routed_inputs(moe, x)
    gu, down = window
    for e in selected:
        gu[e].copy_(moe.experts.gate_up_proj[e])
        down[e].copy_(moe.experts.down_proj[e])
    gate, up = torch.bmm(per, gu).chunk(2, dim=-1)
    routed_out = torch.bmm(up * moe.experts.act_fn(gate), down)
    out = moe.shared_expert(x)
    out.add_(routed_out.sum(dim=0))
    return out


def variants(moe):
    """name -> compute(per [E, T, H], e) -> [1, T, H]."""
    import torch

    gu, down, act = moe.experts.gate_up_proj, moe.experts.down_proj, moe.experts.act_fn

    def bmm1(per, e):
        gate, up = torch.bmm(per[e : e + 1], gu[e : e + 1]).chunk(2, dim=-1)
        return torch.bmm(up * act(gate), down[e : e + 1])

    def mm(per, e):
        gate, up = torch.mm(per[e], gu[e]).chunk(2, dim=-1)
        return torch.mm(up * act(gate), down[e]).unsqueeze(0)

    def bmm_n(n):
        def run(per, e):
            inp = torch.zeros((n, *per.shape[1:]), dtype=per.dtype, device=per.device)
            inp[0] = per[e]
            gate, up = torch.bmm(inp, gu[e : e + 1].expand(n, -1, -1)).chunk(2, dim=-1)
            return torch.bmm(up * act(gate), down[e : e + 1].expand(n, -1, -1))[:1]
        return run

    def entry(per, e):
        gate, up = torch.bmm(per, gu).chunk(2, dim=-1)
        return torch.bmm(up * act(gate), down)[e : e + 1]

    return {"bmm1": bmm1, "mm": mm, **{f"bmm{n}": bmm_n(n) for n in (2, 4, 8, 16)}, "entry": entry}


def timed(fn, repeats: int) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    return seconds_per_call(fn, repeats)


def whole(layers: int, budget: str, smoke: bool, rows: list[dict], new_tokens: int = 8) -> None:
    """Greedy tokens of a Scout cut to `layers` layers, resident, with dense-layer and with expert-aware
    streaming, appended to `rows` as they come (a load that fails is recorded and the next one runs)."""
    import gc
    import tempfile

    import torch

    import overspill

    config = json.loads((ROOT / "overspill/planning/configs/llama-4-scout-109b.json").read_text())
    config["num_hidden_layers"] = layers
    config["moe_layers"] = list(range(layers))
    config["no_rope_layers"] = config["no_rope_layers"][:layers]
    if smoke:
        config.update(SMOKE_SIZES, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    folder = Path(tempfile.mkdtemp(prefix="scout-cut-"))
    (folder / "config.json").write_text(json.dumps(config))
    prompts = {b: torch.randint(2, config["vocab_size"], (b, 32), generator=torch.Generator().manual_seed(b))
               for b in (1, 8)}
    ways = {"resident": dict(gpu_memory=None), "dense": dict(gpu_memory=budget, moe_streaming="dense"),
            "experts": dict(gpu_memory=budget, moe_streaming="experts")}
    tokens = {}
    for way, kwargs in ways.items():
        try:
            model, _ = overspill.load(str(folder), random_weights=True, context=64, batch=8, progress=False, **kwargs)
        except Exception as exc:
            rows.append({"way": way, "error": repr(exc)[:500]})
            print(f"whole {layers} layers: {way}: {exc!r}", flush=True)
            continue
        plan = model.overspill.plan
        for b, ids in prompts.items():
            out = model.generate(ids.to(model.overspill.device), max_new_tokens=new_tokens, do_sample=False)
            tokens[way, b] = out[:, ids.shape[1]:].tolist()
            reference = tokens.get(("resident", b))
            row = {"way": way, "batch": b, "streamed_layers": len(plan.streamed_layers),
                   "moe_streaming": plan.moe_streaming, "tokens": tokens[way, b],
                   "identical_to_resident": None if reference is None else tokens[way, b] == reference}
            rows.append(row)
            print(f"whole {layers} layers: {way:8} b={b} streamed={row['streamed_layers']} "
                  f"identical_to_resident={row['identical_to_resident']}", flush=True)
        del model, plan
        gc.collect()  # the placed model holds reference cycles: free its GPU memory before the next load
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare_block(smoke: bool, device, token_counts: list[int], repeats: int) -> dict:
    """The block's sizes and a row per (reduced-precision reductions, tokens, way): bit identity with the
    module's output, the largest difference and the time of one call."""
    import torch

    moe, config = build(smoke, device.type)
    routed = routed_module(moe, device)
    ways = variants(moe)
    window = [torch.zeros_like(moe.experts.gate_up_proj), torch.zeros_like(moe.experts.down_proj)]
    rows = []
    matmul = torch.backends.cuda.matmul
    default_reduction = matmul.allow_bf16_reduced_precision_reduction
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for reduced in (True, False):
            matmul.allow_bf16_reduced_precision_reduction = reduced
            for tokens in token_counts:
                x = torch.randn((tokens, config.hidden_size), generator=gen).to(device, torch.bfloat16)
                want, _ = moe(x)
                calls = {"module": lambda: moe(x)[0], "routed": lambda: routed(x)[0],
                         **{name: (lambda f=f: per_expert(moe, x, f)) for name, f in ways.items()},
                         "window": lambda: windowed(moe, x, window)}
                for name, call in calls.items():
                    got = call()
                    row = {"reduced_precision_reduction": reduced, "tokens": tokens, "way": name,
                           "identical": bool(torch.equal(got, want)),
                           "max_abs_diff": float((got.float() - want.float()).abs().max()),
                           "call_s": timed(call, repeats)}
                    rows.append(row)
                    print(f"reduced={reduced!s:5} tokens={tokens:4} {name:7} identical={row['identical']!s:5} "
                          f"max_abs_diff={row['max_abs_diff']:.3g} call={row['call_s'] * 1e3:.3f} ms", flush=True)
    matmul.allow_bf16_reduced_precision_reduction = default_reduction
    sizes = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_local_experts")}
    return {"sizes": sizes, "results": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32, 256], help="token counts per call")
    p.add_argument("--repeats", type=int, default=10, help="calls timed per variant")
    p.add_argument("--whole-layers", type=int, default=6, help="layers of the cut Scout for the end-to-end check (0: skip)")
    p.add_argument("--whole-budget", default="20GiB", help="GPU budget of the cut Scout's streamed loads")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script only)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for the JSON record")
    args = p.parse_args()

    import torch

    from overspill.runtime.hardware import machine_facts

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = {**provenance.header("llama4_identity", stamp, machine_facts()), "device": str(device)}
    record.update(compare_block(args.smoke, device, args.tokens, args.repeats))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"llama4-identity-{stamp}.json"
    path.write_text(json.dumps(record, indent=1))  # kept if the whole-model check fails
    gc.collect()  # compare_block's frames sit in reference cycles (transformers' import): free the block's tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.whole_layers:
        record["whole"] = []
        try:
            whole(args.whole_layers, "12MiB" if args.smoke else args.whole_budget, args.smoke, record["whole"])
        finally:
            path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
