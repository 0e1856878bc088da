"""NVIDIA's GH200 recipe with overspill's safety check: unified memory, then plain `transformers`.

    python examples/unified_memory_pipeline.py [--model PATH] [--pool-size 40GiB]

With a CUDA GPU and RMM (`pip install 'overspill[rmm]'`), `enable_unified_memory()` makes every
torch CUDA allocation managed memory and an unmodified `pipeline("text-generation", ...)` loads
the model into it. On a coherent GH200/GB200 the model may exceed GPU memory; elsewhere the pool
is capped at free GPU memory and a larger request is refused. When unified memory is not
available or refused, the example says why and runs the same question through `overspill.load`
instead, which streams layers from pinned host memory (and runs on CPU when there is no GPU).

The default model is the embedded SmolLM2-135M-Instruct (its GGUF is converted once into the
overspill cache).
"""

from __future__ import annotations

import argparse
import sys

QUESTION = "What is the highest mountain in the world?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hugging Face model directory or .gguf file (default: embedded SmolLM2)")
    parser.add_argument("--pool-size", help="most managed memory to use, e.g. 40GiB (default: the platform's)")
    parser.add_argument("--allow-oversubscription", action="store_true",
                        help="on a non-coherent GPU, grant a pool larger than free memory (can hang the GPU)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    from overspill.errors import OverspillError
    from overspill.runtime.unified import enable_unified_memory

    # First, before anything touches CUDA: the allocator can only be swapped before torch's first
    # CUDA allocation.
    try:
        decision = enable_unified_memory(args.pool_size, allow_oversubscription=args.allow_oversubscription)
        print(f"unified memory: {decision.message}", flush=True)
    except OverspillError as exc:
        decision = None
        print(f"unified memory not enabled: {exc}", flush=True)

    import torch
    from transformers import pipeline

    if decision is not None:
        from overspill.runtime.sources import resolve

        try:
            model_dir = str(resolve(args.model).config_dir)  # a .gguf or the default: converted once
        except OverspillError as exc:
            print(f"error: {exc}", flush=True)
            return 2
        pipe = pipeline("text-generation", model=model_dir, dtype=torch.bfloat16, device="cuda:0")
    else:
        import overspill

        print("falling back to overspill.load (streams layers from pinned host memory; runs on CPU without a GPU)", flush=True)
        model, tokenizer = overspill.load(args.model, progress=False)
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)

    messages = [{"role": "user", "content": QUESTION}]
    out = pipe(messages, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"Q: {QUESTION}")
    print(f"A: {out[0]['generated_text'][-1]['content'].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
