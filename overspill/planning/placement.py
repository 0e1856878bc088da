"""Placement rules: from a `Footprint`, a `Workload` and a GPU budget to a `Plan`.

Pure Python (no torch). The sizing of the workspace (KV cache, activations, sampling) and of the
largest batch, the search for host-tier KV, the cost model's annotation and the streaming mode
choice live here; the records they produce are in `overspill.planning.plan`.

The rule here is greedy and simple; it is written so the cost-model planner can replace
`greedy_plan` without touching the loader or the executor:

1. Everything resident if it fits (embeddings included).
2. Else the input embedding moves to host memory (a row lookup per token costs nothing on the
   link; its table can be ~1 GB for a 128k vocabulary) unless it is tied to the LM head.
3. Else `depth + 1` ring slots are reserved (the layer computing plus `depth` being copied; `ring_slots`
   says why encoded layers need one fewer), and as many decoder layers as fit stay resident: the *last*
   ones. Streaming the first layers means the copy engine prefetches the next step's first layers while
   the GPU runs the resident tail, the LM head and sampling, so the link never waits on the CPU between
   tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from ..errors import OverspillError
from .costmodel import predict, prefill_seconds
from .formats import NATIVE, plan_expand_seconds
from .plan import (
    DEFAULT_DEPTH,
    PREFILL_CHUNK_TOKENS,
    STREAMING,
    Footprint,
    Plan,
    Tier,
    Workload,
)
from .profile import Profile
from .units import format_bytes, parse_bytes


def kv_layer_bytes(fp: Footprint, workload: Workload) -> int:
    """KV of one layer for the whole workload (layers are taken as equal; windows are ignored)."""
    return fp.kv_bytes_per_token * workload.context * workload.batch // max(len(fp.layer_bytes), 1)


AUTO_MARGIN_BYTES = 1536 * 2**20  # kept free by an "auto" budget: CUDA context, cuBLAS workspaces, fragmentation
SAMPLING_BYTES_PER_LOGIT = 32  # float32 logits, probabilities, sorted values and int64 indices
ENGINE_PREFILL_CHUNK = 512  # prompt tokens (padding included) per serving-engine iteration


def serving_pass_tokens(max_batch: int, prefill_chunk: int = ENGINE_PREFILL_CHUNK) -> int:
    """The most tokens one serving-engine pass holds: a prefill chunk, or one per decoding sequence."""
    return max(prefill_chunk, max_batch)


def pass_tokens(workload: Workload) -> int:
    """Tokens in flight in one forward pass: `generate` prefills a whole batch at once, in chunks of
    `PREFILL_CHUNK_TOKENS` at most; the serving engine bounds every pass by its prefill chunk and
    decodes one token per sequence, and says so in `Workload.pass_tokens`."""
    return workload.pass_tokens or min(workload.context, PREFILL_CHUNK_TOKENS) * workload.batch


RUNTIME_SLACK_BYTES = 32 * 2**20  # small temporaries the tensor count below does not name (see workspace_bytes)
MAX_BATCH_SEARCHED = 2**20  # the most `max_batch` counts (a tiny model on a large budget)


def attention_transient_bytes(fp: Footprint, workload: Workload) -> int:
    """Peak extra bytes of one layer's attention while a prompt chunk is prefilled against a long cache.

    transformers' SDPA path with a mask expands the grouped KV heads (`repeat_kv`: `gqa_group` x the
    layer's KV) and builds a boolean chunk x context mask, which SDPA converts to one of the compute
    dtype. The KV itself is allocated once per call (`PresizedLayer`), so no concatenation copy.
    On the H200 the 70B shape at 128k peaked at 99.6% of the previous count (one more layer of KV,
    no boolean mask), which is 224 MiB more than this one; this count is not yet measured there.
    """
    mask = pass_tokens(workload) * workload.context * (fp.dtype_bytes + 1)
    return fp.gqa_group * kv_layer_bytes(fp, workload) + mask


def workspace_bytes(fp: Footprint, workload: Workload, kv_host: int = 0, depth: int = DEFAULT_DEPTH) -> int:
    """GPU bytes kept free for the KV cache and activations of the workload.

    With `kv_host` layers' KV in host memory, the device keeps the other layers' KV plus staging
    slots that the host layers' KV visits `depth` layers ahead. Prompts are taken to be prefilled
    in chunks of `PREFILL_CHUNK_TOKENS`.
    """
    n = len(fp.layer_bytes)
    kv = kv_layer_bytes(fp, workload) * (n - kv_host + min(depth + 1, kv_host))
    act = fp.activation_bytes_per_token * pass_tokens(workload)
    if workload.pass_tokens:  # serving samples every row each step: logits, probabilities, a sort
        act += SAMPLING_BYTES_PER_LOGIT * fp.vocab_size * workload.batch
    # The slack: on the H200 a 1024-hidden, 16-layer shape at 16k tokens peaked 19.4 MiB past the previous
    # count, which lacked the boolean mask (16 MiB there); 32 MiB also covers a cuBLAS workspace for a new stream.
    slack = RUNTIME_SLACK_BYTES if workload.activation_floor else 0  # a GPU's; the CPU path only emulates a budget
    if workload.graphs:  # graphed decode steps: one token per sequence, each gathering its experts' weights
        act += fp.gathered_expert_bytes_per_token * workload.batch
    transient = act + attention_transient_bytes(fp, workload) + slack
    return kv + max(transient, workload.activation_floor)


def _embed_on_device(fp: Footprint) -> bool:
    return fp.tied_embeddings or not fp.host_embedding_ok


def ring_slots(depth: int, streamed: int, encoded: bool) -> int:
    """Ring slots for `streamed` layers copied `depth` ahead: the layer computing plus `depth` copies, or for
    encoded layers (a stream format other than the compute dtype) `depth` and at least two. Their copies land in
    the `STAGING_BUFFERS` staging buffers, not in the slots, so the staging already bounds the copies in flight:
    with two slots one layer computes while the next expands (~1.5 ms of a 5.3 ms lossless copy of an 8B layer
    on the H100). The slot saved is a whole layer in the compute dtype, which stays resident instead (8B at
    6 GiB: 416 MiB, one layer fewer on the link, ~4% of a lossless step). The cost: the ring issues copies
    `slots - 1` layers ahead, so across a step boundary (the resident tail, sampling, the host's sync) two
    encoded copies are queued instead of three (lossless 8B: 10.4 ms of link work); unmeasured on a GPU."""
    if encoded:
        return min(max(depth, 2), streamed)
    return min(depth + 1, streamed)


def _make_plan(
    fp: Footprint, tiers: list[Tier], embed_tier: Tier, depth: int, budget: int | None, workload: Workload,
    kv_host: int = 0,
) -> Plan:
    """Fill in the ring and byte counts implied by a choice of tiers."""
    streamed = [b for b, t in zip(fp.layer_bytes, tiers) if t is Tier.PINNED]
    wire = fp.encoded_layer_bytes
    # Encoded layers send fewer bytes; they land in staging buffers beside the slots (`expand_bytes`).
    sent = streamed if wire is None else [w for w, t in zip(wire, tiers) if t is Tier.PINNED]
    slots = ring_slots(depth, len(streamed), encoded=wire is not None and fp.stream_format != NATIVE)
    device_w = fp.head_bytes + fp.other_bytes + sum(b for b, t in zip(fp.layer_bytes, tiers) if t is Tier.DEVICE)
    if embed_tier is Tier.DEVICE:
        device_w += fp.embed_bytes
    return Plan(
        layer_tiers=tuple(tiers),
        embed_tier=embed_tier,
        head_tier=Tier.DEVICE,
        depth=depth if streamed else 0,
        slots=slots,
        slot_bytes=max(streamed, default=0),
        budget_bytes=budget,
        workspace_bytes=workspace_bytes(fp, workload, kv_host, depth),
        device_weight_bytes=device_w,
        streamed_bytes_per_step=sum(sent),
        stream_format=fp.stream_format if streamed else "bf16",
        expand_bytes=fp.expand_scratch_bytes if streamed else 0,
        workload=workload,
        kv_host_layers=tuple(range(kv_host)),
        kv_host_bytes=kv_host * kv_layer_bytes(fp, workload),
    )


def streaming_plan(
    fp: Footprint, workload: Workload, streamed: int, depth: int = DEFAULT_DEPTH, budget: int | None = None,
    kv_host: int = 0,
) -> Plan:
    """The plan that streams exactly `streamed` layers (`streamed_tiers`: the first ones, or spread
    among the resident ones with `workload.spread`) and keeps the rest resident.

    `greedy_plan` picks among these; benchmarks use it directly to time a given number of streamed
    layers (also counts the greedy rule never picks, such as fewer layers than ring slots).
    """
    n = len(fp.layer_bytes)
    if not 0 <= streamed <= n:
        raise OverspillError(f"cannot stream {streamed} of {n} layers")
    tiers = streamed_tiers(n, streamed, workload.spread and not kv_host)
    embed_tier = Tier.DEVICE if streamed == 0 or _embed_on_device(fp) else Tier.HOST
    return _make_plan(fp, tiers, embed_tier, depth, budget, workload, kv_host)


LAYOUTS = ("auto", "prefix", "spread")  # load(layout=...), --layout: which layers stream


def spreads(layout: str, speculate: str | None) -> bool:
    """Whether a `layout` spreads the streamed layers: "auto" does where drafts are verified (`speculate`), since
    a serial verify pass runs each resident layer once per token and a resident tail after the last copy has no
    copy to hide it (70B at 76 GiB on an H100, the first 37 of 80 layers streamed: ~25 ms a token on a 1145 ms
    pass); plain decoding keeps the prefix. Refuses an unknown layout in one line."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    return layout == "spread" or (layout == "auto" and speculate is not None)


def streamed_tiers(n: int, streamed: int, spread: bool) -> list[Tier]:
    """Tiers of `n` layers of which `streamed` stream: the first ones, or with `spread` layer (i * n) // streamed
    for each i, evenly among the resident ones.

    Why spread: a step copies streamed layers while the GPU computes, and the ring queues only `depth`
    copies ahead; streaming the first layers leaves the resident ones as one run at the end of each step
    with the link idle once those few copies are done. Where resident layers cost time the link does not
    cover (a serial verify pass runs each resident layer once per drafted token; expert-streamed MoE layers
    wait for their experts) spreading lets the copies run beside them. Host-tier KV keeps the prefix: its
    layers are the leading ones (`kv_host_choices`)."""
    if not spread or streamed in (0, n):
        return [Tier.PINNED] * streamed + [Tier.DEVICE] * (n - streamed)
    chosen = {(i * n) // streamed for i in range(streamed)}
    return [Tier.PINNED if i in chosen else Tier.DEVICE for i in range(n)]


def kv_host_choices(fp: Footprint, workload: Workload, kv_device_bytes: int | None, depth: int) -> list[int]:
    """The counts of leading layers whose KV goes to host memory, in the order a plan tries them: the fewest
    that `kv_device_bytes` allows, then (if nothing fits) more. Counts up to `depth + 1` save nothing (their
    staging slots weigh as much), so the search goes on from `depth + 2`."""
    first = _kv_host_needed(fp, workload, kv_device_bytes, depth)
    return [first] + list(range(max(first, depth + 2), len(fp.layer_bytes) + 1))


def least_plan(fp: Footprint, workload: Workload, depth: int = DEFAULT_DEPTH, budget: int | None = None) -> Plan:
    """The smallest whole-layer plan: every layer streamed, every layer's KV in host memory."""
    n = len(fp.layer_bytes)
    return streaming_plan(fp, workload, n, depth, budget, n)


def at_least(need: int) -> str:
    """`need` as `format_bytes` writes it, rounded up, so that a budget of that size holds `need` bytes."""
    if need < 2**10:
        return format_bytes(need)
    scale = next(s for s in (2**40, 2**30, 2**20, 2**10) if need >= s)
    value = need / scale
    step = 0.01 if value < 10 else 0.1 if value < 100 else 1
    steps = math.ceil(value / step)
    text = format_bytes(steps * step * scale)
    if parse_bytes(text) < need:  # float rounding of a size that lies on a step
        text = format_bytes((steps + 1) * step * scale)
    return text


def below_minimum(fp: Footprint, budget_bytes: int | None, minimum: Plan, how: str = "") -> OverspillError:
    """The refusal of `budget_bytes` where `minimum` is the smallest plan that fits (`how` names how it
    streams): what it holds and a budget to ask for, rounded up so that asking for it is enough."""
    w = minimum.workload
    parts = [f"{label} {format_bytes(b)}"
             for label, b in (("lm_head", fp.head_bytes), ("embeddings", fp.embed_bytes if _embed_on_device(fp) else 0))
             if b]
    parts.append(f"{minimum.slots} ring slots x {format_bytes(minimum.slot_bytes)}")
    if minimum.expert_slots:
        parts.append(f"an expert cache of {minimum.expert_slots} x {format_bytes(minimum.expert_slot_bytes)}")
    need = at_least(minimum.device_bytes)  # one figure, rounded up, in both places: asking for it is enough
    tokens = f"{w.context} token{'s' * (w.context != 1)}"
    context = "" if w.context == 1 else " or lower --context" + (
        " (this already counts every layer's KV in host memory)" if minimum.kv_host_layers else "")
    return OverspillError(
        f"GPU budget {format_bytes(budget_bytes)} is below this model's minimum working set of "
        f"{need}{how} ({', '.join(parts)}, workspace {format_bytes(minimum.workspace_bytes)} for "
        f"{tokens} x batch {w.batch}); raise --gpu-memory to at least {need}{context}"
    )


def _kv_host_needed(fp: Footprint, workload: Workload, kv_device_bytes: int | None, depth: int) -> int:
    """Fewest layers whose KV must live in host memory for the rest (and staging) to fit `kv_device_bytes`."""
    n = len(fp.layer_bytes)
    if kv_device_bytes is None:
        return 0
    per_layer = kv_layer_bytes(fp, workload)
    for k in range(n + 1):
        if per_layer * (n - k + min(depth + 1, k)) <= kv_device_bytes:
            return k
    raise OverspillError(
        f"--kv-gpu-memory {format_bytes(kv_device_bytes)} cannot hold even the staging for host KV "
        f"({min(depth + 1, n)} x {format_bytes(per_layer)} at {workload.context} tokens x batch {workload.batch}); "
        f"raise it or lower --context"
    )


def greedy_plan(
    fp: Footprint,
    budget_bytes: int | None,
    workload: Workload = Workload(),
    depth: int = DEFAULT_DEPTH,
    kv_device_bytes: int | None = None,
) -> Plan:
    """Place layers under `budget_bytes` of GPU memory (None: no limit, all resident).

    KV stays on the device first; weights yield first. Only when even streaming every layer leaves
    no room for the workload's KV do leading layers' KV move to pinned host memory. An explicit
    `kv_device_bytes` caps the device KV from the start.

    Raises:
        OverspillError: if the budget is below the minimum working set; the message gives it.
    """
    if depth < 1:
        raise OverspillError(f"prefetch depth must be at least 1, got {depth}")
    n = len(fp.layer_bytes)
    all_device = [Tier.DEVICE] * n
    for kv_host in kv_host_choices(fp, workload, kv_device_bytes, depth):
        full = _make_plan(fp, all_device, Tier.DEVICE, depth, budget_bytes, workload, kv_host)
        if budget_bytes is None or full.device_bytes <= budget_bytes:
            return full
        if not _embed_on_device(fp):
            host_embed = _make_plan(fp, all_device, Tier.HOST, depth, budget_bytes, workload, kv_host)
            if host_embed.device_bytes <= budget_bytes:
                return host_embed
        # Stream the fewest leading layers that fit; ring slots are sized by the largest streamed layer.
        for streamed in range(1, n + 1):
            candidate = streaming_plan(fp, workload, streamed, depth, budget_bytes, kv_host)
            if candidate.device_bytes <= budget_bytes:
                return candidate
    raise below_minimum(fp, budget_bytes, least_plan(fp, workload, depth, budget_bytes))


def device_kv_workload(fp: Footprint, budget_bytes: int | None, workload: Workload,
                       depth: int = DEFAULT_DEPTH, kv_device_bytes: int | None = None) -> Workload:
    """`workload` with the largest batch (at most its own) whose greedy plan keeps every layer's KV on
    the GPU (within `kv_device_bytes` where given); batch 1 when even one sequence needs host KV (host-tier
    KV serves one at a time); unchanged without a budget or a KV cap.

    For serving: a batch of sequences shares one device cache, while host-tier KV (a `TieredCache`)
    serves one sequence at a time, so more planned sequences can mean less throughput. The batch
    found is what the engine's KV admission then shares among any number of shorter requests.
    """
    if budget_bytes is None and kv_device_bytes is None:
        return workload

    def device_only(w: Workload) -> bool:
        try:
            return not greedy_plan(fp, budget_bytes, w, depth, kv_device_bytes).kv_host_layers
        except OverspillError:
            return False

    return largest_batch(workload, device_only)


def largest_batch(workload: Workload, fits: Callable[[Workload], bool]) -> Workload:
    """`workload` with the largest batch, at most its own, that `fits`; batch 1 when none does.
    More sequences never fit better, so a bisection finds it."""
    if fits(workload):
        return workload
    if not fits(replace(workload, batch=1)):
        return replace(workload, batch=1)
    low, high = 1, workload.batch  # fits at low, not at high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(replace(workload, batch=mid)) else (low, mid)
    return replace(workload, batch=low)


def place(
    fp: Footprint,
    budget_bytes: int | None,
    workload: Workload,
    depth: int = DEFAULT_DEPTH,
    kv_device_bytes: int | None = None,
    fit_batch: bool = False,
) -> Plan:
    """The placement rule `load` carries out and `overspill plan` shows, so the two agree.

    Args:
        fit_batch: plan for the largest batch up to `workload.batch` whose KV stays on the GPU, within
            `kv_device_bytes` where given (`device_kv_workload`; serving).

    Raises:
        OverspillError: if the budget is below the minimum working set.
    """
    if fit_batch:
        workload = device_kv_workload(fp, budget_bytes, workload, depth, kv_device_bytes)
    return greedy_plan(fp, budget_bytes, workload, depth, kv_device_bytes)


def budget_for(fp: Footprint, workload: Workload, resident: int, depth: int = DEFAULT_DEPTH) -> int:
    """The smallest budget under which `greedy_plan` keeps exactly `resident` decoder layers on the GPU.

    Used by tests and benchmarks to ask for "k layers resident" instead of a byte count.

    Raises:
        ValueError: for counts the greedy rule never picks (streaming no more layers than there are
            ring slots costs as much memory as keeping them; use `streaming_plan` to time those).
    """
    n = len(fp.layer_bytes)
    if resident >= n:
        return _make_plan(fp, [Tier.DEVICE] * n, Tier.DEVICE, depth, None, workload).device_bytes
    plan = streaming_plan(fp, workload, n - resident, depth)
    if greedy_plan(fp, plan.device_bytes, workload, depth).layer_tiers != plan.layer_tiers:
        raise ValueError(f"greedy_plan never keeps exactly {resident} of {n} layers resident at depth {depth}")
    return plan.device_bytes


def max_batch(fp: Footprint, plan: Plan) -> int:
    """Sequences of `plan.workload.context` tokens whose KV (all on the GPU) and workspace fit beside the placed
    weights: the largest batch at which `workspace_bytes`, the reserve a plan for that batch would make, fits the
    budget (so a `--serve --batch B` plan that fits reports at least B). 0 where not even one fits."""
    if plan.budget_bytes is None:
        return 0
    fixed = plan.device_bytes - plan.workspace_bytes

    def fits(workload: Workload) -> bool:
        return fixed + workspace_bytes(fp, workload) <= plan.budget_bytes

    if not fits(replace(plan.workload, batch=1)):
        return 0
    return largest_batch(replace(plan.workload, batch=MAX_BATCH_SEARCHED), fits).batch


def with_prediction(fp: Footprint, plan: Plan, profile: Profile) -> Plan:
    """The plan annotated with the cost model's prediction, the largest batch and warnings."""
    head = fp.embed_bytes if fp.tied_embeddings else fp.head_bytes
    if plan.streaming == "mapped" and profile.managed_bytes_s > 0:  # streamed bytes are read in place
        profile = replace(profile, h2d_bytes_s=profile.managed_bytes_s)
    pred = predict(
        layer_bytes=fp.layer_bytes,
        layer_active_bytes=fp.layer_active_bytes or fp.layer_bytes,
        streamed_bytes=plan.streamed_bytes_per_step + plan.kv_host_bytes,
        head_bytes=head,
        kv_bytes_per_token=fp.kv_bytes_per_token,
        dtype_bytes=fp.dtype_bytes,
        profile=profile,
        batch=plan.workload.batch,
        context=plan.workload.context,
        expand_s=plan_expand_seconds(fp, plan.stream_format, plan.streamed_layers, profile.hbm_bytes_s,
                                     profile.decode_bytes_s),
        streamed_layers=plan.streamed_layers,
    )
    notes = list(plan.notes)
    if plan.streamed_bytes_per_step and pred.decode_tok_s <= pred.cpu_only_tok_s:
        notes.append(
            f"this plan is no faster than the CPU alone ({pred.decode_tok_s:.2f} vs {pred.cpu_only_tok_s:.2f} "
            f"tok/s predicted): the link is too slow for the bytes streamed per token"
        )
    return replace(plan, prediction=pred, max_batch=max_batch(fp, plan), notes=tuple(notes))


def ttft_seconds(fp: Footprint, plan: Plan, profile: Profile, prompt_tokens: int, batch: int = 1) -> float:
    """Predicted time to first token of `batch` prompts of `prompt_tokens` tokens each under `plan`
    (`costmodel.prefill_seconds`); the query width per layer comes from the KV width and the GQA group."""
    n = len(fp.layer_bytes)
    kv_width = fp.kv_bytes_per_token / (2 * fp.dtype_bytes * n) if n else 0
    kv_host = plan.kv_host_bytes / (plan.workload.context * plan.workload.batch) if plan.kv_host_bytes else 0.0
    return prefill_seconds(fp.layer_active_bytes or fp.layer_bytes, fp.embed_bytes if fp.tied_embeddings
                           else fp.head_bytes, fp.dtype_bytes, int(kv_width * fp.gqa_group),
                           plan.streamed_bytes_per_step, profile, prompt_tokens, kv_host, batch)


def plan_for(
    fp: Footprint,
    profile: Profile,
    workload: Workload = Workload(),
    budget_bytes: int | None = None,
    depth: int = DEFAULT_DEPTH,
    margin_bytes: int = AUTO_MARGIN_BYTES,
    kv_device_bytes: int | None = None,
    streaming: str = "auto",
    fit_batch: bool = False,
) -> Plan:
    """Place `fp` on the machine `profile` describes (`place`) and predict its speed.

    Args:
        budget_bytes: GPU bytes to use; None means the profile's free memory minus `margin_bytes`,
            as `load`'s "auto" budget.
        streaming: how streamed layers move (`choose_streaming`): managed prefetch where the profile
            measured it faster than pinned copies.
        fit_batch: the largest batch up to `workload.batch` whose KV stays on the GPU (serving).

    Raises:
        OverspillError: when the budget is below the minimum working set (the message gives it).
    """
    if budget_bytes is None:
        budget_bytes = profile.auto_budget(margin_bytes)
    plan = place(fp, budget_bytes, workload, depth, kv_device_bytes, fit_batch)
    plan = replace(plan, streaming=choose_streaming(streaming, profile.managed_wins))
    return with_prediction(fp, plan, profile)


def choose_streaming(requested: str, managed_wins: bool) -> str:
    """How streamed layers move: "auto" reads managed memory in place ("mapped") where the probe
    measured that faster than pinned copies (`Profile.managed_bytes_s`), else copies. On the lent
    H100 copies won (54 vs 49 GB/s; prefetching and evicting managed layers: 13-18 GB/s), so auto
    copies there. "managed" and "mapped" on request: on PCIe within half the free GPU memory only."""
    if requested not in STREAMING:
        raise OverspillError(f"streaming must be one of {', '.join(STREAMING)}, got {requested!r}")
    if requested == "auto":
        return "mapped" if managed_wins else "copy"
    return requested
