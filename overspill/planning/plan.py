"""Placement decisions as data: which layers stay on the GPU and which stream from pinned host memory.

Pure Python (no torch): the loader measures a `Footprint`, this module returns a `Plan`, and the
executor carries it out. Nothing below this module decides placement.

The rule here is greedy and simple; it is written so the cost-model planner can replace
`greedy_plan` without touching the loader or the executor:

1. Everything resident if it fits (embeddings included).
2. Else the input embedding moves to host memory (a row lookup per token costs nothing on the
   link; its table can be ~1 GB for a 128k vocabulary) unless it is tied to the LM head.
3. Else `depth + 1` ring slots are reserved (the layer computing plus `depth` being copied), and
   as many decoder layers as fit stay resident: the *last* ones. Streaming the first layers means
   the copy engine prefetches the next step's first layers while the GPU runs the resident tail,
   the LM head and sampling, so the link never waits on the CPU between tokens.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field, replace

from ..errors import OverspillError
from .costmodel import Prediction, predict
from .profile import Profile
from .units import format_bytes

DEFAULT_DEPTH = 2
DEFAULT_CONTEXT = 4096
ACTIVATION_FLOOR_BYTES = 128 * 2**20
PREFILL_CHUNK_TOKENS = 2048  # prompts are prefilled in chunks of this many tokens (activations sized for it)


class Tier(str, enum.Enum):
    """Where a group of weights lives between uses."""

    DEVICE = "device"  # resident in GPU memory
    PINNED = "pinned"  # page-locked host memory, copied into a GPU ring slot before use
    HOST = "host"  # host memory used by the host (embedding lookup), only activations cross the link


@dataclass(frozen=True)
class Footprint:
    """Byte sizes the placement needs, measured from the model or computed from its config."""

    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int  # 0 when tied to the embedding
    other_bytes: int  # final norm, rotary tables, small buffers
    tied_embeddings: bool
    kv_bytes_per_token: int  # one sequence, all layers
    activation_bytes_per_token: int  # peak activations per token in flight
    host_embedding_ok: bool = True  # a plain lookup table (no scaling folded into the module)
    layer_active_bytes: tuple[int, ...] | None = None  # bytes read per token (MoE: routed experts only)
    dtype_bytes: int = 2
    gqa_group: int = 1  # attention heads per KV head
    vocab_size: int = 0  # sampling works on [rows, vocab] float32 logits and their sorted copies


@dataclass(frozen=True)
class Workload:
    """What the placed model must serve: longest sequence and concurrent sequences.

    `activation_floor` is the least workspace kept free for activations and library workspaces
    (cuBLAS, attention); the CPU path, which only emulates a GPU budget, sets it to zero.
    """

    context: int = DEFAULT_CONTEXT
    batch: int = 1
    activation_floor: int = ACTIVATION_FLOOR_BYTES
    pass_tokens: int = 0  # most tokens one forward pass holds; 0: what `generate` needs (see `pass_tokens`)


@dataclass(frozen=True)
class Plan:
    """A placement: one tier per decoder layer plus the ring that streams the pinned ones."""

    layer_tiers: tuple[Tier, ...]
    embed_tier: Tier
    head_tier: Tier
    depth: int
    slots: int
    slot_bytes: int
    budget_bytes: int | None
    workspace_bytes: int
    device_weight_bytes: int
    streamed_bytes_per_step: int
    workload: Workload = field(default_factory=Workload)
    prediction: Prediction | None = None
    max_batch: int | None = None  # most sequences of `workload.context` tokens whose KV fits beside the weights
    notes: tuple[str, ...] = ()
    kv_host_layers: tuple[int, ...] = ()  # layers whose KV lives in pinned host memory (a TieredCache)
    kv_host_bytes: int = 0  # their KV at full context: read over the link every decode step
    streaming: str = "copy"  # how streamed layers move: "copy" (pinned -> slots), "managed" (prefetch), "mapped" (in place)

    @property
    def streamed_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_tiers) if t is Tier.PINNED)

    @property
    def resident_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_tiers) if t is Tier.DEVICE)

    @property
    def device_bytes(self) -> int:
        """Planned GPU bytes: resident weights, ring slots and the workspace reserve."""
        return self.device_weight_bytes + self.slots * self.slot_bytes + self.workspace_bytes

    def link_floor_seconds(self, h2d_bytes_per_second: float) -> float:
        """Lower bound on one decode step: every streamed byte crosses the link once."""
        return self.streamed_bytes_per_step / h2d_bytes_per_second

    def to_json(self) -> str:
        d = asdict(self)
        d["layer_tiers"] = [t.value for t in self.layer_tiers]
        d["embed_tier"] = self.embed_tier.value
        d["head_tier"] = self.head_tier.value
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        d["layer_tiers"] = tuple(Tier(t) for t in d["layer_tiers"])
        d["embed_tier"] = Tier(d["embed_tier"])
        d["head_tier"] = Tier(d["head_tier"])
        d["workload"] = Workload(**d["workload"])
        d["prediction"] = Prediction(**d["prediction"]) if d.get("prediction") else None
        d["notes"] = tuple(d.get("notes", ()))
        d["kv_host_layers"] = tuple(d.get("kv_host_layers", ()))
        return cls(**d)

    def summary(self) -> str:
        n = len(self.layer_tiers)
        streamed = self.streamed_layers
        managed = self.streaming in MANAGED_MODES
        lines = [
            f"layers: {n - len(streamed)}/{n} resident, {len(streamed)} streamed from "
            + ("CUDA managed memory" if managed else "pinned host memory")
            + (f" (layers {_ranges(streamed)})" if streamed else ""),
            f"embeddings: {self.embed_tier.value}, lm_head: {self.head_tier.value}",
        ]
        if streamed and self.streaming == "mapped":
            lines.append("mapped: the GPU reads the streamed layers in place over the link; nothing migrates")
        elif streamed and managed:
            lines.append(f"managed prefetch: at most {self.slots} layers on the GPU, prefetch depth {self.depth}")
        elif streamed:
            lines.append(
                f"ring: {self.slots} slots x {format_bytes(self.slot_bytes)}, prefetch depth {self.depth}"
            )
        if self.kv_host_layers:
            lines.append(
                f"KV cache: {n - len(self.kv_host_layers)} layers on the device, {len(self.kv_host_layers)} in pinned "
                f"host memory (layers {_ranges(self.kv_host_layers)}; {format_bytes(self.kv_host_bytes)} at "
                f"{self.workload.context} tokens, read over the link each step)"
            )
        lines.append(f"bytes over the link per decode step: {format_bytes(self.streamed_bytes_per_step + self.kv_host_bytes)}")
        budget = "unlimited" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        lines.append(
            f"device memory planned: {format_bytes(self.device_bytes)} of {budget} "
            f"(weights {format_bytes(self.device_weight_bytes)}, workspace {format_bytes(self.workspace_bytes)})"
        )
        if self.max_batch is not None:
            lines.append(f"largest batch at {self.workload.context} tokens of context: {self.max_batch}")
        p = self.prediction
        if p is not None:
            floor = f", link floor {p.link_floor_tok_s:.2f} tok/s" if p.link_floor_tok_s else ""
            lines.append(
                f"predicted decode: {p.decode_tok_s:.2f} tok/s at batch {self.workload.batch}{floor}; "
                f"bottleneck: {p.bottleneck} (link {p.link_s * 1e3:.1f} ms, GPU {p.gpu_s * 1e3:.1f} ms, "
                f"host {p.host_s * 1e3:.1f} ms per step); prefill ~{p.prefill_tok_s:.0f} tok/s"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _ranges(indices: tuple[int, ...]) -> str:
    """(0,1,2,5) -> '0-2, 5'."""
    out: list[str] = []
    start = prev = None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ", ".join(out)


def kv_layer_bytes(fp: Footprint, workload: Workload) -> int:
    """KV of one layer for the whole workload (layers are taken as equal; windows are ignored)."""
    return fp.kv_bytes_per_token * workload.context * workload.batch // max(len(fp.layer_bytes), 1)


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


def attention_transient_bytes(fp: Footprint, workload: Workload) -> int:
    """Peak extra bytes of one layer's attention while a prompt chunk is prefilled against a long cache.

    transformers' SDPA path with a mask expands the grouped KV heads (`repeat_kv`: `gqa_group` x the
    layer's KV), the dynamic cache's concatenation holds one more copy of the layer's KV, and the
    mask has chunk x context entries. Without this term, a count of those tensors put a 64k-128k
    context on the 8B shape 1-2.5 GiB past its budget (an estimate, not yet measured on the GPU).
    """
    mask = pass_tokens(workload) * workload.context * fp.dtype_bytes
    return (fp.gqa_group + 1) * kv_layer_bytes(fp, workload) + mask


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
    return kv + max(act + attention_transient_bytes(fp, workload), workload.activation_floor)


def _embed_on_device(fp: Footprint) -> bool:
    return fp.tied_embeddings or not fp.host_embedding_ok


def _make_plan(
    fp: Footprint, tiers: list[Tier], embed_tier: Tier, depth: int, budget: int | None, workload: Workload,
    kv_host: int = 0,
) -> Plan:
    """Fill in the ring and byte counts implied by a choice of tiers."""
    streamed = [b for b, t in zip(fp.layer_bytes, tiers) if t is Tier.PINNED]
    slots = min(depth + 1, len(streamed))
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
        streamed_bytes_per_step=sum(streamed),
        workload=workload,
        kv_host_layers=tuple(range(kv_host)),
        kv_host_bytes=kv_host * kv_layer_bytes(fp, workload),
    )


def streaming_plan(
    fp: Footprint, workload: Workload, streamed: int, depth: int = DEFAULT_DEPTH, budget: int | None = None,
    kv_host: int = 0,
) -> Plan:
    """The plan that streams exactly the first `streamed` layers and keeps the rest resident.

    `greedy_plan` picks among these; benchmarks use it directly to time a given number of streamed
    layers (also counts the greedy rule never picks, such as fewer layers than ring slots).
    """
    n = len(fp.layer_bytes)
    if not 0 <= streamed <= n:
        raise OverspillError(f"cannot stream {streamed} of {n} layers")
    tiers = [Tier.PINNED] * streamed + [Tier.DEVICE] * (n - streamed)
    embed_tier = Tier.DEVICE if streamed == 0 or _embed_on_device(fp) else Tier.HOST
    return _make_plan(fp, tiers, embed_tier, depth, budget, workload, kv_host)


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
    first_kv = _kv_host_needed(fp, workload, kv_device_bytes, depth)
    for kv_host in [first_kv] + list(range(max(first_kv, depth + 2), n + 1)):
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
    minimum = streaming_plan(fp, workload, n, depth, budget_bytes, n)
    parts = ", ".join(
        f"{label} {format_bytes(b)}"
        for label, b in (("lm_head", fp.head_bytes), ("embeddings", fp.embed_bytes if _embed_on_device(fp) else 0))
        if b
    )
    need = minimum.device_bytes
    raise OverspillError(
        f"GPU budget {format_bytes(budget_bytes)} is below this model's minimum working set of "
        f"{format_bytes(need)} ({parts}, {minimum.slots} ring slots x {format_bytes(minimum.slot_bytes)}, "
        f"workspace {format_bytes(minimum.workspace_bytes)} for {workload.context} tokens x batch {workload.batch}); "
        f"raise --gpu-memory to at least {format_bytes(need)} or lower --context"
        + (" (this already counts every layer's KV in host memory)" if minimum.kv_host_layers else "")
    )


def device_kv_workload(fp: Footprint, budget_bytes: int | None, workload: Workload,
                       depth: int = DEFAULT_DEPTH) -> Workload:
    """`workload` with the largest batch (at most its own) whose greedy plan keeps every layer's KV on
    the GPU; batch 1 when even one sequence needs host KV (host-tier KV serves one at a time);
    unchanged without a budget.

    For serving: a batch of sequences shares one device cache, while host-tier KV (a `TieredCache`)
    serves one sequence at a time, so more planned sequences can mean less throughput. The batch
    found is what the engine's KV admission then shares among any number of shorter requests.
    """
    if budget_bytes is None:
        return workload

    def device_only(batch: int) -> bool:
        try:
            return not greedy_plan(fp, budget_bytes, replace(workload, batch=batch), depth).kv_host_layers
        except OverspillError:
            return False

    if device_only(workload.batch):
        return workload
    if not device_only(1):
        return replace(workload, batch=1)
    low, high = 1, workload.batch  # device_only(low) holds, device_only(high) does not: more KV never fits better
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if device_only(mid) else (low, mid)
    return replace(workload, batch=low)


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


def footprint_from_spec(spec, context_dtype_bytes: int | None = None) -> Footprint:
    """A `Footprint` from a `ModelSpec` (config only, no weights), for planning before loading."""
    hidden = spec.hidden_size
    widest = max((l.mlp_bytes + l.active_experts * l.expert_bytes) for l in spec.layers) // max(hidden, 1)
    return Footprint(
        layer_bytes=tuple(l.total_bytes for l in spec.layers),
        embed_bytes=spec.embed_bytes,
        head_bytes=spec.head_bytes,
        other_bytes=spec.final_norm_bytes,
        tied_embeddings=spec.tied_embeddings,
        kv_bytes_per_token=spec.kv_bytes_per_token,
        activation_bytes_per_token=4 * hidden * spec.dtype_bytes + widest,
        layer_active_bytes=tuple(l.active_bytes for l in spec.layers),
        dtype_bytes=context_dtype_bytes or spec.dtype_bytes,
        gqa_group=max(spec.num_attention_heads // max(spec.num_kv_heads, 1), 1),
        vocab_size=spec.vocab_size,
    )


def max_batch(fp: Footprint, plan: Plan) -> int:
    """Sequences of `plan.workload.context` tokens whose KV and activations fit beside the placed weights."""
    if plan.budget_bytes is None:
        return 0
    w = plan.workload
    free = plan.budget_bytes - plan.device_weight_bytes - plan.slots * plan.slot_bytes - w.activation_floor
    n = max(len(fp.layer_bytes), 1)
    # every sequence: its KV, and its share of one layer's attention transient (repeat_kv + concatenation)
    per_seq = fp.kv_bytes_per_token * w.context + (fp.gqa_group + 1) * fp.kv_bytes_per_token * w.context // n
    if w.pass_tokens:  # serving: one bounded pass in flight, whatever the batch; each row is sampled
        free -= fp.activation_bytes_per_token * w.pass_tokens
        per_seq += SAMPLING_BYTES_PER_LOGIT * fp.vocab_size
    else:  # generate prefills every sequence's prompt at once
        per_seq += fp.activation_bytes_per_token * min(w.context, PREFILL_CHUNK_TOKENS)
    return max(free // per_seq, 0) if per_seq else 0


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
    )
    notes = list(plan.notes)
    if plan.streamed_bytes_per_step and pred.decode_tok_s <= pred.cpu_only_tok_s:
        notes.append(
            f"this plan is no faster than the CPU alone ({pred.decode_tok_s:.2f} vs {pred.cpu_only_tok_s:.2f} "
            f"tok/s predicted): the link is too slow for the bytes streamed per token"
        )
    return replace(plan, prediction=pred, max_batch=max_batch(fp, plan), notes=tuple(notes))


def plan_for(
    fp: Footprint,
    profile: Profile,
    workload: Workload = Workload(),
    budget_bytes: int | None = None,
    depth: int = DEFAULT_DEPTH,
    margin_bytes: int = 1536 * 2**20,
    kv_device_bytes: int | None = None,
    streaming: str = "auto",
) -> Plan:
    """Place `fp` on the machine `profile` describes and predict its speed.

    Args:
        budget_bytes: GPU bytes to use; None means the profile's free memory minus `margin_bytes`.
        streaming: how streamed layers move (`choose_streaming`): managed prefetch where the profile
            measured it faster than pinned copies.

    Raises:
        OverspillError: when the budget is below the minimum working set (the message gives it).
    """
    if budget_bytes is None:
        budget_bytes = max(profile.gpu_free_bytes - margin_bytes, 0)
    plan = greedy_plan(fp, budget_bytes, workload, depth, kv_device_bytes)
    plan = replace(plan, streaming=choose_streaming(streaming, profile.managed_bytes_s > profile.h2d_bytes_s))
    return with_prediction(fp, plan, profile)


STREAMING = ("auto", "copy", "managed", "mapped")
MANAGED_MODES = ("managed", "mapped")  # streamed layers in CUDA managed memory


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
