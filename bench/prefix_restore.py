"""Where a prefix restore's time goes: raw pool->GPU copies vs `PrefixCache.start` into a cache.

Llama-3-8B KV shape, no weights: fills a prefix pool with `--tokens` tokens, then times
(a) one span copy per layer from the registered pool into preallocated device memory,
(b) the same from a `pin_memory=True` (cudaHostAlloc) buffer, (c) `PrefixCache.start` into
transformers' `DynamicCache`, each after a device sync, best of `--repeats`.

    python bench/prefix_restore.py --tokens 32768
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768, help="prefix length restored")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each step (best is kept)")
    args = p.parse_args()
    import torch
    from transformers import DynamicCache, LlamaConfig

    from overspill.planning.configs import shipped_config
    from overspill.runtime.prefix import PrefixCache

    config = LlamaConfig(**shipped_config("llama-3-8b"))
    dev = torch.device("cuda")
    pool = PrefixCache(config, capacity_tokens=args.tokens + 256, block_tokens=256, device=dev)
    print(f"pool: {pool.pool_k.is_pinned()=}", flush=True)
    tokens = torch.randint(1, 1000, (args.tokens + 16,)).tolist()
    kv_shape = (1, config.num_key_value_heads, args.tokens + 16, config.hidden_size // config.num_attention_heads)
    source = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        k = torch.randn(kv_shape, device=dev, dtype=torch.bfloat16)
        source.update(k, k, layer)
    lease = pool.start(tokens)
    pool.finish(lease, source, tokens)
    del source
    torch.cuda.synchronize()

    def best(fn) -> float:
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times)

    span = pool.pool_k[0, : args.tokens // 256]
    dst = torch.empty((config.num_hidden_layers, *span.shape), dtype=span.dtype, device=dev)
    nbytes = 2 * dst.numel() * dst.element_size()

    def raw(src_k, src_v):
        for layer in range(config.num_hidden_layers):
            dst[layer].copy_(src_k[layer, : args.tokens // 256], non_blocking=True)
            dst[layer].copy_(src_v[layer, : args.tokens // 256], non_blocking=True)

    registered = best(lambda: raw(pool.pool_k, pool.pool_v))
    hostalloc_k = torch.empty(pool.pool_k.shape, dtype=pool.pool_k.dtype, pin_memory=True)
    hostalloc_v = torch.empty(pool.pool_v.shape, dtype=pool.pool_v.dtype, pin_memory=True)
    hostalloc = best(lambda: raw(hostalloc_k, hostalloc_v))
    del dst

    def start():
        cache = DynamicCache(config=config)
        lease = pool.start(tokens, cache)
        pool.abort(lease)

    started = best(start)
    result = {"tokens": args.tokens, "bytes": nbytes,
              "registered_pool_s": registered, "registered_pool_GBps": nbytes / registered / 1e9,
              "hostalloc_s": hostalloc, "hostalloc_GBps": nbytes / hostalloc / 1e9,
              "start_s": started, "start_GBps": nbytes / started / 1e9}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
