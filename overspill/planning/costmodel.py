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
PREFILL_CHUNK = 2048  # `generate` prefills in chunks of this many tokens (`plan.PREFILL_CHUNK_TOKENS`)
# Prefill attention against a long cache runs at this fraction of the profile's dense matmul rate: SDPA with
# the chunk's boolean mask leaves the flash kernel. Fitted to 131072-token prompts (plan_truth, Dec 2026):
# 70B shape on an H100 104 TFLOP/s (TTFT 238.9 s), 8B resident on an H200 112 TFLOP/s (42.7 s), of ~780.
ATTENTION_PREFILL_FRACTION = 0.14


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
    overlapped_gpu_s: float = 0.0  # GPU time per step of every layer up to the last streamed one, expansion
    # included (part of gpu_s): what a link-bound serial verify pass computes while copies still run beside it
    # (`speculation`); with streamed layers spread among the resident ones nearly all of it


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
    streamed_layers: tuple[int, ...] = (),
) -> Prediction:
    """Predicted step time of a placement. Byte counts as in `Plan` and `Footprint`; `streamed_layers` (the
    plan's) only split the GPU's time into what copies can run beside and the resident tail after the last
    streamed layer (`Prediction.overlapped_gpu_s`)."""
    n = len(layer_bytes)
    hbm = profile.hbm_bytes_s or float("inf")
    mm = profile.matmul_flops_s
    kv_layer = kv_bytes_per_token / max(n, 1) * context * batch
    weight_read = sum(layer_active_bytes) / hbm
    kv_read = n * kv_layer / hbm
    compute = sum(2 * (b / dtype_bytes) * batch / mm for b in layer_active_bytes)
    layer_s = [max((b + kv_layer) / hbm, 2 * (b / dtype_bytes) * batch / mm) for b in layer_active_bytes]
    per_layer = sum(layer_s)
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
        overlapped_gpu_s=sum(layer_s[:max(streamed_layers) + 1]) + expand_s if streamed_layers else 0.0,
    )


def prefill_seconds(
    layer_active_bytes: tuple[int, ...],
    head_bytes: int,
    dtype_bytes: int,
    query_width: int,
    streamed_bytes: int,
    profile: Profile,
    prompt_tokens: int,
    kv_host_bytes_per_token: float = 0.0,
    batch: int = 1,
    chunk: int = PREFILL_CHUNK,
) -> float:
    """Predicted time to first token of `batch` prompts of `prompt_tokens` each, prefilled together in
    chunks of `chunk` tokens a sequence (`kv_host_bytes_per_token`: per token of the batch): each chunk is one
    pass that streams every streamed layer (and the host-tier KV written so far) and computes its matmuls
    plus causal attention against all earlier tokens (`query_width` = heads x head_dim per layer; sliding
    windows are not credited, so windowed models are over-predicted), whichever is slower, or the host's
    dispatch."""
    n = len(layer_active_bytes)
    params = sum(layer_active_bytes) / dtype_bytes
    h2d = profile.h2d_bytes_s if profile.h2d_bytes_s > 0 else float("inf")
    host = profile.step_overhead_s + n * profile.layer_overhead_s
    attention_rate = ATTENTION_PREFILL_FRACTION * profile.matmul_flops_s
    total = 0.0
    for start in range(0, prompt_tokens, chunk):
        c = min(chunk, prompt_tokens - start)
        matmul = 2 * params * c * batch / profile.matmul_flops_s
        attention = 4 * query_width * n * c * (start + (c + 1) / 2) * batch / attention_rate
        link = (streamed_bytes + kv_host_bytes_per_token * (start + c) * batch) / h2d
        total += max(link, matmul + attention, host)
    head = 2 * (head_bytes / dtype_bytes) * batch / profile.matmul_flops_s  # logits of the last positions only
    return total + head
