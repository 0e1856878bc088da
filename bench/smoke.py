"""What the benchmark scripts share: a device sync for timings, and the tiny model their `--smoke`
runs save and load (a CPU check of the script; it measures nothing useful)."""

from __future__ import annotations

from pathlib import Path

SMOKE_CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)


def sync() -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def smoke_model(out_dir: Path) -> Path:
    """Save the seeded tiny float32 llama under `out_dir/smoke-model` and return its path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(SMOKE_CONFIG)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d), dtype=torch.float32)
    path = Path(out_dir) / "smoke-model"
    model.save_pretrained(path)
    return path


def streamed_plan(path: Path, context: int, batch: int = 1, depth: int | None = None, streamed: int | None = None):
    """The plan that streams the first `streamed` (default: every) layers of the saved smoke model at `path`
    (float32, as the CPU loads it), for `context` tokens x `batch`: the smoke runs time streamed layers, which
    the CPU budget alone would not make."""
    import torch
    from transformers import AutoConfig

    from overspill.planning.placement import DEFAULT_DEPTH, streaming_plan
    from overspill.planning.plan import Workload
    from overspill.runtime.loader import build_skeleton, decoder_layers, footprint

    skeleton = build_skeleton(AutoConfig.from_pretrained(str(path)), torch.float32)
    fp = footprint(skeleton, decoder_layers(skeleton)[1], torch.float32)
    workload = Workload(context, batch, activation_floor=0)
    count = len(fp.layer_bytes) if streamed is None else streamed
    return streaming_plan(fp, workload, count, DEFAULT_DEPTH if depth is None else depth)


def seconds_per_call(fn, calls: int) -> float:
    """Mean seconds of `fn()` over `calls` back-to-back calls: CUDA events around them all on a GPU (no sync
    between calls), the wall clock on the CPU."""
    import time

    import torch

    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def spread_layers(plan, layer_sizes: list[int]):
    """`plan` with its streamed layers spread evenly among the resident ones (layer (i * N) // n streams), or
    None where that would change its bytes (layers of different sizes), some KV lives in host memory or nothing
    streams. Streaming the first n layers leaves the resident ones as one run at the end of each step, which
    the ring's few queued copies may not cover when its slots are small (expert streaming)."""
    from dataclasses import replace

    from overspill.planning.placement import streamed_tiers

    n, total = len(plan.streamed_layers), len(plan.layer_tiers)
    if len(set(layer_sizes)) != 1 or plan.kv_host_layers or n == 0:
        return None
    return replace(plan, layer_tiers=tuple(streamed_tiers(total, n, spread=True)), notes=())


def layer_sizes(model) -> list[int]:
    """Parameters per decoder layer of a loaded model."""
    from overspill.runtime.loader import decoder_layers

    return [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)[1]]
