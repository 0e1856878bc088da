"""Does the plan hold at the use case's scale? One load, then plain `generate` and `pipeline` on the
planned workload (a prompt filling the context), each against the plan's prediction and device total.

The prompt fills the plan: `batch` sequences of `context - new_tokens` tokens, so the KV cache and
activations the plan reserved are really used, and the measured peak is comparable to the planned
device total. Random weights (speed and memory are honest; the tokens are not meaningful); the
pipeline gets a word-level tokenizer over the model's vocabulary ("t0 t1 ..."), one token a word.
A record is written after every entry point, so a run killed by its time limit keeps what it did.

    python bench/plan_truth.py --model llama-3-70b --context 131136 --entries generate pipeline
    python bench/plan_truth.py --model llama-3-70b --budget 80GiB --context 131072 --kv-gpu-memory 24GiB
    python bench/plan_truth.py --model llama-3-70b --budget 80GiB --context 1024 --batch 32
    python bench/plan_truth.py --smoke      # tiny model on the CPU: checks the script, measures nothing useful
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
from smoke import smoke_model, sync as _sync  # noqa: E402

def word(i: int, letters: int = 4) -> str:
    """Token i's word: base-26 letters (words with digits were split by transformers' tokenizer)."""
    out = ""
    for _ in range(letters):
        out = chr(ord("a") + i % 26) + out
        i //= 26
    return out


def word_tokenizer(vocab_size: int):
    """A fast tokenizer whose i-th word is token i: pipeline text of N words is N tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = 4 if vocab_size <= 26**4 else 5
    vocab = {word(i, letters): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=word(0, letters)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=word(0, letters), pad_token=word(0, letters),
                                   eos_token=word(1, letters)), letters


def _predicted_ttft(args, plan, prompt: int) -> float | None:
    """The cost model's time to first token for this run's prompts (`placement.ttft_seconds`), on this
    machine's probe; None for the smoke model or without a GPU."""
    import torch

    if args.smoke or not torch.cuda.is_available():
        return None
    from overspill.planning.configs import shipped_config
    from overspill.planning.placement import ttft_seconds
    from overspill.planning.plan import footprint_from_spec
    from overspill.planning.spec import spec_from_config
    from overspill.runtime.hardware import probe

    fp = footprint_from_spec(spec_from_config(shipped_config(args.model)))
    return ttft_seconds(fp, plan, probe(), prompt, args.batch)


def _memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _timings(start: float, times: list[float], batch: int) -> dict:
    """Time to first token, and decode tokens per second over all `batch` sequences."""
    decode = batch * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None
    return {"ttft_s": times[0] - start if times else None, "decode_tok_s": decode, "steps": len(times)}


def run_generate(model, ids, new_tokens: int) -> dict:
    import torch

    from overspill.run import TimingStreamer

    streamer = TimingStreamer(None)
    _sync()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=streamer)
    _sync()
    return {**_timings(start, streamer.times, ids.shape[0]), "wall_s": time.perf_counter() - start}


def run_pipeline(model, ids, new_tokens: int) -> dict:
    """`transformers.pipeline("text-generation")` on the same prompt, as words of the word tokenizer."""
    from transformers import pipeline

    from overspill.run import TimingStreamer

    tokenizer, letters = word_tokenizer(model.config.vocab_size)
    texts = [" ".join(word(i, letters) for i in row) for row in ids.tolist()]
    if tokenizer(texts[0])["input_ids"] != ids[0].tolist():
        raise RuntimeError("the word tokenizer does not give one token a word here")
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    streamer = TimingStreamer(None)
    _sync()
    start = time.perf_counter()
    out = pipe(texts if len(texts) > 1 else texts[0], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
               do_sample=False, streamer=streamer if len(texts) == 1 else None, return_full_text=False,
               batch_size=len(texts))
    _sync()
    timing = _timings(start, streamer.times, 1) if len(texts) == 1 else {}
    return {**timing, "wall_s": time.perf_counter() - start, "answers": len(out)}


ENTRIES = {"generate": run_generate, "pipeline": run_pipeline}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-70b", help="shipped config name (random weights)")
    p.add_argument("--budget", default="auto", help="gpu_memory for overspill.load (default auto)")
    p.add_argument("--context", type=int, default=131136, help="planned tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="planned and run sequences")
    p.add_argument("--kv-gpu-memory", default=None, help="cap the device KV (the rest in host memory)")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=None, help="default: context - new tokens (fills the plan)")
    p.add_argument("--entries", nargs="+", default=["generate"], choices=sorted(ENTRIES))
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
    path = out_dir / f"plan-truth-{'smoke' if args.smoke else args.model}-{stamp}.json"
    if args.smoke:
        source, random_weights, budget = str(smoke_model(out_dir)), False, None
    else:
        source, random_weights, budget = args.model, True, args.budget
    t0 = time.perf_counter()
    model, _ = overspill.load(source, gpu_memory=budget, context=args.context, batch=args.batch,
                              random_weights=random_weights, kv_gpu_memory=args.kv_gpu_memory, progress=False)
    load_s = time.perf_counter() - t0
    plan = placement_of(model).plan
    print(plan.summary(), flush=True)
    print(f"loaded in {load_s:.0f} s", flush=True)
    prompt = args.prompt_tokens or args.context - args.new_tokens
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (args.batch, prompt), generator=gen).to(placement_of(model).device)
    predicted = plan.prediction.decode_tok_s if plan.prediction else None
    predicted_ttft = _predicted_ttft(args, plan, prompt)
    record = {
        **provenance.header("plan_truth", stamp, machine_facts()),
        "model": args.model, "budget": args.budget, "context": args.context, "batch": args.batch,
        "prompt_tokens": prompt, "new_tokens": args.new_tokens, "load_s": load_s,
        "plan": json.loads(plan.to_json()), "plan_device_bytes": plan.device_bytes,
        "plan_budget_bytes": plan.budget_bytes, "predicted_decode_tok_s": predicted,
        "predicted_ttft_s": predicted_ttft, "entries": {},
    }
    for name in args.entries:
        _reset_peak()
        try:
            result = ENTRIES[name](model, ids, args.new_tokens)
        except torch.OutOfMemoryError as exc:
            result = {"oom": str(exc).splitlines()[0]}
        result.update(_memory())
        if "peak_allocated_bytes" in result:
            result["peak_over_plan"] = result["peak_allocated_bytes"] / plan.device_bytes
            if plan.budget_bytes:
                result["peak_within_budget"] = result["peak_allocated_bytes"] <= plan.budget_bytes
        if predicted_ttft and result.get("ttft_s"):
            result["ttft_over_predicted"] = result["ttft_s"] / predicted_ttft
        if predicted and result.get("decode_tok_s"):
            result["decode_fraction_of_predicted"] = result["decode_tok_s"] / predicted
        record["entries"][name] = result
        path.write_text(json.dumps(record, indent=2))
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}
        print(f"{name}: {shown}", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
