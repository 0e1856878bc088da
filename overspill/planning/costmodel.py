"""Predicted decode and prefill speed of a placement on a measured machine. Pure Python.

Derivation (decode, one step = one token for each of `batch` sequences):

- The link: every streamed layer crosses the host->GPU link once per step, whatever the batch:
      t_link = streamed_bytes / h2d_bandwidth
- The GPU: each layer reads its (active) weights once from HBM, reads its KV cache, and does
  2 FLOPs per active parameter per sequence. Reads and math overlap within a kernel, so per layer
      t_layer = max((active_bytes + kv_bytes_per_token * context * batch) / hbm_bandwidth,
                    2 * active_params * batch / matmul_rate)
  and t_gpu is the sum over layers plus the LM head (read once, 2 * vocab * hidden * batch FLOPs),
  plus the time to expand streamed layers that travel encoded (`overspill.planning.formats`), which
  runs on the GPU beside compute while the link brings the next layers.
  `hbm_bandwidth` is the probe's device copy rate (bytes read + written); a weight read streams
  at about the same bytes/s.
- The host: HF eager decode dispatches every layer's kernels from Python; the probe measures the
  per-layer and per-step host time on tiny models, where the GPU is idle:
      t_host = step_overhead + layers * layer_overhead
- The executor overlaps all three (the copy stream runs `depth` layers ahead with no host sync;
  measured copy-engine busy 99.98% at 6 GiB on the H100), so
      t_step = max(t_link, t_gpu, t_host)      decode tok/s = batch / t_step
  and the bottleneck is the largest term ("kv" when KV reads dominate t_gpu).

Prefill of a P-token prompt is one pass: t = max(t_link, 2 * active_params * P / matmul_rate, t_host).

The CPU alone would decode at 1 / (active_params / cpu_gemv_params_s + t_host) tokens/s (host
GEMV over all weights, plus the same dispatch); a streaming plan no faster than that gets a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from .profile import Profile

PREFILL_TOKENS = 2048


@dataclass(frozen=True)
class Prediction:
    decode_step_s: float
    decode_tok_s: float  # tokens/s over the whole batch
    link_s: float
    gpu_s: float
    kv_s: float
    host_s: float
    bottleneck: str  # "link", "hbm", "kv", "compute" or "host dispatch"
    link_floor_tok_s: float | None  # batch / t_link, None when nothing streams
    prefill_tok_s: float  # at a PREFILL_TOKENS-token prompt, batch 1
    cpu_only_tok_s: float
    expand_s: float = 0.0  # GPU time per step expanding encoded streamed layers (part of gpu_s)


def predict(
    layer_bytes: tuple[int, ...],
    layer_active_bytes: tuple[int, ...],
    streamed_bytes: int,
    head_bytes: int,
    kv_bytes_per_token: int,
    dtype_bytes: int,
    profile: Profile,
    batch: int,
    context: int,
    expand_s: float = 0.0,
) -> Prediction:
    """Predicted step time of a placement. Byte counts as in `Plan` and `Footprint`."""
    n = len(layer_bytes)
    hbm = profile.hbm_bytes_s or float("inf")
    mm = profile.matmul_flops_s
    kv_layer = kv_bytes_per_token / max(n, 1) * context * batch
    weight_read = sum(layer_active_bytes) / hbm
    kv_read = n * kv_layer / hbm
    compute = sum(2 * (b / dtype_bytes) * batch / mm for b in layer_active_bytes)
    per_layer = sum(
        max((b + kv_layer) / hbm, 2 * (b / dtype_bytes) * batch / mm) for b in layer_active_bytes
    )
    head = max(head_bytes / hbm, 2 * (head_bytes / dtype_bytes) * batch / mm)
    gpu = per_layer + head + expand_s
    if streamed_bytes and profile.h2d_bytes_s <= 0:
        raise ValueError(f"profile {profile.name!r} has no host->GPU link to stream over")
    link = streamed_bytes / profile.h2d_bytes_s if streamed_bytes else 0.0
    host = profile.step_overhead_s + n * profile.layer_overhead_s
    step = max(link, gpu, host)
    if step == link and link > 0:
        bottleneck = "link"
    elif step == host:
        bottleneck = "host dispatch"
    elif compute >= weight_read + kv_read:
        bottleneck = "compute"
    else:
        bottleneck = "kv" if kv_read > weight_read else "hbm"
    active_params = sum(layer_active_bytes) / dtype_bytes + head_bytes / dtype_bytes
    prefill = max(link, 2 * active_params * PREFILL_TOKENS / mm, host)
    return Prediction(
        decode_step_s=step,
        decode_tok_s=batch / step,
        link_s=link,
        gpu_s=gpu,
        kv_s=kv_read,
        host_s=host,
        bottleneck=bottleneck,
        link_floor_tok_s=batch / link if link else None,
        prefill_tok_s=PREFILL_TOKENS / prefill,
        cpu_only_tok_s=1 / (active_params / profile.cpu_gemv_params_s + host),
        expand_s=expand_s,
    )
