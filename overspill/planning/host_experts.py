"""Which missing routed experts the host computes instead of copying them over the link. Pure Python.

Under expert streaming (`planning.moe`) a routed expert missing from the GPU cache crosses the link
(Mixtral-8x7B: 352 MB, 6.5 ms at 54 GB/s). The host already holds it in pinned memory and multiplies bf16
weights at 35-38 G params/s while the link copies at full speed (measured on the lent H200), so one token
through a Mixtral expert (176 M params) takes it ~4.9 ms. As llama.cpp's `--n-cpu-moe` and KTransformers
do, the host can compute some experts while the link brings the others, and the layer waits for the
slower of the two instead of the sum of the copies.

Modes (`load(cpu_experts=...)`, `--cpu-experts`):
- "off": every missing expert is copied (the default until GPU runs have measured the gain);
- "on": every missing expert is computed on the host once the cache's free slots are filled (the first
  misses still fill them, so the cache holds what it can; later no routed expert crosses the link);
- "auto": per layer, the misses routed to the fewest tokens go to the host while that shortens the layer:
  k of n misses cost max(host time of those k, link time of the other n - k); `host_count` picks the
  k with the least cost. Host time counts each token as one matrix-vector pass over the expert
  (the host's GEMV rate), an upper bound for several tokens, which batch into a GEMM.
"""

from __future__ import annotations

import math

CPU_EXPERTS = ("off", "auto", "on")
HOST_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "llama4", "llama4_text")


def supported(model_type: str) -> bool:
    """Whether the host computes this architecture's routed experts (`runtime.experts.enable_host_experts`)."""
    return model_type in HOST_MODEL_TYPES


def check_mode(mode: str) -> str:
    """The mode, or ValueError naming the choices."""
    if mode not in CPU_EXPERTS:
        raise ValueError(f"cpu_experts must be one of {', '.join(CPU_EXPERTS)}, got {mode!r}")
    return mode


def host_count(tokens: list[int], expert_bytes: int, expert_params: int, link_bytes_s: float,
               host_params_s: float) -> int:
    """How many of the missing experts (routed `tokens` each, ascending) the host computes: the first k,
    for the k that minimises max(host seconds of the first k, link seconds of the rest). 0 without rates."""
    if not tokens or link_bytes_s <= 0 or host_params_s <= 0:
        return 0
    link = expert_bytes / link_bytes_s
    best, best_cost, host = 0, len(tokens) * link, 0.0
    for k, n in enumerate(tokens, start=1):
        host += n * expert_params / host_params_s
        cost = max(host, (len(tokens) - k) * link)
        if cost < best_cost:
            best, best_cost = k, cost
    return best


def layer_split(misses: float, tokens_per_miss: float, expert_bytes: int, expert_params: int,
                link_bytes_s: float, host_params_s: float, mode: str = "auto") -> tuple[float, float]:
    """(experts the host computes, seconds the layer waits), expected, for a streamed MoE layer's `misses`
    expected missing experts, each routed to `tokens_per_miss` tokens: all copied ("off"), all computed on
    the host ("on"), or the split `host_count` picks ("auto"). A fractional expectation is priced as the
    split of its ceiling scaled down, so neither the host's share nor the wait exceeds what is expected;
    without a host rate everything is copied."""
    if misses <= 0 or link_bytes_s <= 0:
        return 0.0, 0.0
    n = math.ceil(misses)
    link = expert_bytes / link_bytes_s
    if host_params_s <= 0 or mode == "off":
        return 0.0, misses * link
    host = tokens_per_miss * expert_params / host_params_s
    k = n if mode == "on" else host_count([max(1, round(tokens_per_miss))] * n, expert_bytes, expert_params,
                                          link_bytes_s, host_params_s)
    scale = misses / n
    return k * scale, max(k * host, (n - k) * link) * scale


CODED = "experts that cross as a checkpoint's codes have no host copy to compute on"
DENSE_NOTE = "MoE layers stream whole"  # how `moe.choose` begins each note saying why


def why_dense(notes: tuple[str, ...], moe_streaming: str, pipeline: bool = False,
              dense_option: str = "moe_streaming='dense'") -> str | None:
    """Why a MoE model's layers stream whole under this plan (a pipeline rank, the `dense_option` the user
    passed, or the planner's note), for a refusal that names it; None if no reason is known."""
    if pipeline:
        return "pipeline ranks stream MoE layers whole"
    if moe_streaming == "dense":
        return f"{dense_option} streams MoE layers whole"
    return next((n for n in notes if n.startswith(DENSE_NOTE)), None)


def refusal(mode: str, model_type: str, is_moe: bool, experts_streamed: bool, why_dense: str | None,
            coded: bool = False) -> str | None:
    """Why `cpu_experts=mode` cannot apply to this plan, as one line (None where it can, or mode is not "on";
    "auto" turns itself off instead). `why_dense` says why MoE layers stream whole, where they do; `coded`: the
    streamed experts cross as a checkpoint's codes (`Plan.expert_codes`), so the host holds no copy to compute on.
    `load` and `overspill plan` both ask here, so they refuse the same plans in the same words."""
    if mode != "on":
        return None
    if not is_moe:
        why = "the model has no routed experts"
    elif not supported(model_type):
        why = f"{model_type}'s experts are not computed on the host yet"
    elif not experts_streamed:
        why = why_dense or "no layer streams its experts (every MoE layer is resident)"
    elif coded:
        why = CODED
    else:
        return None
    return refused(why)


def refused(why: str) -> str:
    """The one-line refusal of cpu_experts='on' for `why`."""
    return f"cpu_experts='on' (--cpu-experts on): {why}; use 'off' or 'auto'"
