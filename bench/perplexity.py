"""Perplexity of the embedded SmolLM2-135M-Instruct with every decoder layer streamed in each stream format.

The text is bench/data/us_documents.txt (public domain: the Declaration of Independence, the
Gettysburg Address and Lincoln's Second Inaugural Address, typed from the standard transcriptions;
2,872 tokens for SmolLM2's tokenizer), scored in non-overlapping windows of `--window` tokens.
Every decoder layer streams, so every one travels in the format; embeddings and head stay as stored.
SmolLM2 ships as a Q4_1 GGUF: "bf16" streams its weights dequantized (gguf's float32 values, computed in
`--dtype`, float32 by default on the CPU) and "auto" streams the checkpoint's own Q4_1 codes, expanded in
the slot bit for bit to those values, so it must match "bf16" exactly, as lossless must. Every format but
"auto" loads a copy of the dequantized weights, so int4 is the format's own encoder, not the Q4_1 codes. Targets
(issue 15): int8 within +1% of bf16, fp8 within +2%; int4 reported.

    python bench/perplexity.py                       # CPU, all formats, JSON under bench/results/
    python bench/perplexity.py --formats bf16 int8 --window 256
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import provenance  # noqa: E402 - after the path

TEXT = ROOT / "bench" / "data" / "us_documents.txt"
TARGETS = {"int8": 0.01, "fp8": 0.02}  # largest allowed relative rise over bf16


def perplexity(model, ids, window: int) -> tuple[float, int]:
    """exp(mean next-token NLL) over `ids` [1, n] in non-overlapping windows; returns (ppl, tokens scored)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start : start + window].to(model.device)
            if chunk.shape[1] < 2:
                break
            logits = model(chunk).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            total += nll.item()
            count += chunk.shape[1] - 1
    return math.exp(total / count), count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=["bf16", "auto", "lossless", "int8", "fp8", "int4"])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()

    import torch

    import overspill
    from overspill.api import placement_of
    from overspill.planning.placement import streaming_plan
    from overspill.planning.plan import Workload
    from overspill.runtime.hardware import machine_facts
    from overspill.runtime.loader import build_skeleton, decoder_layers, footprint
    from overspill.runtime.sources import resolve

    model_dir = resolve(None).config_dir
    from transformers import AutoConfig, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    skeleton = build_skeleton(AutoConfig.from_pretrained(str(model_dir)), dtype)
    fp = footprint(skeleton, decoder_layers(skeleton)[1], dtype)
    plan = streaming_plan(fp, Workload(args.window, 1, activation_floor=0), len(fp.layer_bytes))  # every layer streams
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(TEXT.read_text(), return_tensors="pt")["input_ids"]

    # Its own format's name (int4 here) streams a quantized checkpoint's codes, so every format but "auto" starts
    # from a copy of the dequantized weights: the formats' own encoders, measured on the same values.
    copy = tempfile.TemporaryDirectory()  # removed at exit
    resident, _ = overspill.load(model_dir, dtype=args.dtype, device="cpu", progress=False)  # the host writes it
    resident.save_pretrained(copy.name)
    del resident
    rows = {}
    for fmt in args.formats:
        start = time.perf_counter()
        model, _ = overspill.load(model_dir if fmt == "auto" else copy.name, dtype=args.dtype, device=args.device,
                                  plan=plan, progress=False, stream_format=fmt)
        loaded = time.perf_counter() - start
        placement = placement_of(model)
        ppl, scored = perplexity(model, ids, args.window)
        rows[fmt] = {"perplexity": ppl, "stream_format": placement.plan.stream_format, "tokens_scored": scored,
                     "streamed_layers": len(placement.plan.streamed_layers),
                     "streamed_bytes_per_step": placement.plan.streamed_bytes_per_step, "load_s": round(loaded, 2)}
        print(f"{fmt:9s} ppl {ppl:.4f}  {placement.plan.streamed_bytes_per_step / 2**20:.1f} MiB a step  "
              f"(load {loaded:.1f} s)", flush=True)
        del model
    base = rows.get("bf16", {}).get("perplexity")
    for fmt, row in rows.items():
        if base:
            row["vs_bf16"] = row["perplexity"] / base - 1
            if fmt in TARGETS:
                row["target"] = f"<= +{TARGETS[fmt]:.0%}"
                row["meets_target"] = row["vs_bf16"] <= TARGETS[fmt]
    for exact in ("auto", "lossless"):  # the checkpoint's own codes, and lossless bytes: bf16's perplexity exactly
        if exact in rows and base:
            rows[exact]["identical_to_bf16"] = rows[exact]["perplexity"] == base

    stamp = time.strftime("%Y%m%d-%H%M%S")
    record = provenance.header("perplexity", stamp, machine_facts())
    record.update(model="SmolLM2-135M-Instruct (embedded Q4_1 GGUF; bf16: dequantized, auto: its own codes)",
                  text=TEXT.name,
                  text_tokens=int(ids.shape[1]), window=args.window, dtype=args.dtype, device=args.device,
                  results=rows)
    out = Path(args.out) / f"perplexity-smollm2-{args.dtype}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    for fmt, row in rows.items():
        if "vs_bf16" in row:
            print(f"{fmt:9s} {row['vs_bf16']:+.3%} vs bf16" + (f" (target {row['target']})" if "target" in row else ""))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
