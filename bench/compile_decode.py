"""torch.compile's answer to host-bound decode, measured beside overspill's CUDA graphs.

Plain transformers, fully resident 8B shape (random bf16 weights), batch 1, greedy: `generate`
with the dynamic cache (eager), then with `cache_implementation="static"`, where transformers
compiles the forward itself (`torch.compile`, mode "reduce-overhead": CUDA graphs over Inductor
kernels). Records the first call's wall time (the compile) and steady decode tok/s, to compare
with `bench/graph_decode.py` (overspill's captured graphs, no compile step).

    python bench/compile_decode.py --new-tokens 64
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

import decode
import provenance


def _tok_s(model, ids, new_tokens: int, **kwargs) -> float:
    import torch

    from overspill.run import TimingStreamer, timed_generate

    streamer = TimingStreamer(None)
    timing = timed_generate(model, ids, new_tokens, streamer, attention_mask=torch.ones_like(ids), pad_token_id=0,
                            **kwargs)
    return timing.decode_tokens_per_second


def main() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from overspill.planning.configs import shipped_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b", help="shipped config name (random weights)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(False)  # as overspill.load runs
    d = dict(shipped_config(args.model))
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = decode._prompt(config.vocab_size, 16).cuda()
    record: dict = {}
    _tok_s(model, ids, 8)
    record["eager_tok_s"] = _tok_s(model, ids, args.new_tokens)
    t0 = time.perf_counter()  # the same lengths as the timed call: a new cache length recompiles
    _tok_s(model, ids, args.new_tokens, cache_implementation="static")
    record["compile_first_call_s"] = time.perf_counter() - t0
    _tok_s(model, ids, args.new_tokens, cache_implementation="static")
    record["compiled_static_tok_s_runs"] = [_tok_s(model, ids, args.new_tokens, cache_implementation="static")
                                            for _ in range(2)]
    record.update(command=provenance.command(), git_commit=provenance.git_commit(), device=torch.cuda.get_device_name(), model=args.model,
                  torch=torch.__version__, new_tokens=args.new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"compile-decode-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
