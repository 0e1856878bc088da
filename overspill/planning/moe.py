"""Expert-aware streaming of mixture-of-experts layers: what moves per token, and the plan. Pure Python.

A streamed MoE layer moved whole carries every routed expert across the link to use `k` of `E`.
With expert-aware streaming the ring carries only the layer's other tensors (attention, router,
norms, shared expert); its routed experts stay in pinned host memory, one block per expert, and
after the router runs only the experts the batch selected cross, into a GPU cache of expert slots
shared by every streamed MoE layer (`overspill.runtime.experts`).

Bytes per decode step, uniform routing prior: a batch of b tokens, each picking k of E experts,
selects on average
    D(b) = E * (1 - (1 - k/E) ** b)
distinct experts per layer (one token picks a given expert with probability k/E). The cache holds
at least one whole layer's experts (a prefill chunk selects them all); every slot beyond that keeps
a frequently routed expert, so under the uniform prior a fraction h = extra / (streamed experts)
of the selections hit, and a step moves
    ring bytes + sum over streamed MoE layers of D(b) * (1 - h) * expert bytes.
Random weights route about uniformly; real models route unevenly, so a frequency-aware cache hits
more than h there. Measured routing (`planning.routing.RoutingStats`, counted online by
`ExpertCache`) replaces the prior where a caller passes `stats`: per-expert selection probabilities,
shrunk toward k/E while few tokens are seen, give each layer's distinct experts and which experts the
hot slots keep (`routing.traffic`); `runtime.routing.measured_moe_plan` re-predicts a loaded plan so.
Plans are still placed under the prior (nothing is measured before the first load).

A checkpoint whose experts keep their codes (a converted GGUF's fused experts, `planning.prequantized`) sends
those bytes per miss (`with_codes`: Q4_K's 0.75 bytes a weight where bf16 sends 2), and the GPU expands them
into the slot, which still holds the expert in the compute dtype; the staging that expansion reads from is
planned beside the ring's (`Plan.expand_bytes`).

Time per step: the copies of a layer's experts start only once its router has run (the host reads
the selected experts: one sync per layer) and its experts compute only once they land, so expert
copies, the GPU's compute and one sync per streamed MoE layer add up (resident Llama 4 MoE layers sync too
at small batches: `MoeLayers.synced_layers`), while the ring's copies overlap them:
    t_step = max(t_link(all bytes), t_gpu + t_link(expert bytes) + synced layers * SYNC_S, t_host)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import OverspillError
from .costmodel import Prediction
from .formats import INT4_CHUNK_CODES, NATIVE, int4_scratch_bytes
from .host_experts import DENSE_NOTE, layer_split
from .placement import (below_minimum, kv_host_choices, largest_batch, least_plan, max_batch, place,
                        streaming_plan, with_prediction)
from .plan import MANAGED_MODES, Footprint, Plan, Workload
from .profile import Profile
from .routing import RoutingStats, traffic
from .spec import ModelSpec

MOE_STREAMING = ("auto", "dense", "experts")
# Host time per streamed MoE layer to read the router's choice (a device sync) and issue the expert
# copies: ASSUMED until bench/moe.py measures it.
SYNC_S = 60e-6
# Under expert streaming a resident Llama 4 MoE block computes expert by expert (a sync to read its router's
# choice) up to this many (token, expert) pairs a pass, as transformers' block does above it
# (`runtime.experts.Llama4RoutedMoe`): one Scout-sized block took 0.95 ms that way against the module's 1.46 ms
# at 1 token, 1.62 against 1.49 at 8 (H100, a sync per call included:
# bench/results/llama4-identity-20261206-233527.json, ways bmm2 and module).
RESIDENT_ROUTED_PAIRS = 4
_RESIDENT_ROUTED = frozenset({"llama4_text"})  # model types whose resident MoE blocks are so replaced


@dataclass(frozen=True)
class MoeLayers:
    """Per decoder layer: bytes that ride the ring with expert-aware streaming (everything but the routed
    experts), one routed expert's bytes (in the compute dtype: its cache slot), experts per layer and experts
    each token picks (0: a dense layer). Where the experts cross as a checkpoint's codes (`with_codes`),
    `link_bytes` holds one expert's bytes over the link and `code_staging_bytes` the GPU buffers its copy
    lands in and expands through. `resident_routed`: whether resident MoE layers also sync on their router's
    choice under expert streaming (Llama 4, up to `RESIDENT_ROUTED_PAIRS` pairs a pass)."""

    ring_bytes: tuple[int, ...]
    expert_bytes: tuple[int, ...]
    num_experts: tuple[int, ...]
    active: tuple[int, ...]
    link_bytes: tuple[int, ...] = ()
    code_staging_bytes: int = 0
    resident_routed: bool = False

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "MoeLayers":
        return cls(
            ring_bytes=tuple(layer.total_bytes - layer.num_experts * layer.expert_bytes for layer in spec.layers),
            expert_bytes=tuple(layer.expert_bytes for layer in spec.layers),
            num_experts=tuple(layer.num_experts for layer in spec.layers),
            active=tuple(layer.active_experts for layer in spec.layers),
            resident_routed=spec.model_type in _RESIDENT_ROUTED,
        )

    @property
    def is_moe(self) -> bool:
        return any(self.num_experts)

    @property
    def coded(self) -> bool:
        """Whether routed experts cross as a checkpoint's codes (the host cannot compute them then)."""
        return bool(self.link_bytes)

    def synced_layers(self, streamed: tuple[int, ...], batch: int) -> int:
        """MoE layers whose pass waits on the host reading its router's choice at `batch` tokens: every streamed
        one, and the resident ones where their blocks compute expert by expert (`resident_routed`)."""
        layers = sum(1 for i in streamed if self.num_experts[i])
        if self.resident_routed:
            kept = set(streamed)
            layers += sum(1 for i, n in enumerate(self.num_experts)
                          if n and i not in kept and batch * self.active[i] <= RESIDENT_ROUTED_PAIRS)
        return layers

    def sent(self, layer: int) -> int:
        """Bytes one routed expert of `layer` sends over the link on a miss."""
        return self.link_bytes[layer] if self.link_bytes else self.expert_bytes[layer]


def with_codes(moe: MoeLayers, link_bytes: tuple[int, ...], dtype_bytes: int) -> MoeLayers:
    """`moe` with its routed experts crossing as `link_bytes` each (a checkpoint's codes), staged on the GPU in
    one buffer of the largest expert's codes plus the int4 expansion's scratch for one expert's weights."""
    params = max(moe.expert_bytes, default=0) // dtype_bytes
    staging = max(link_bytes, default=0) + int4_scratch_bytes(min(params, INT4_CHUNK_CODES))
    return replace(moe, link_bytes=link_bytes, code_staging_bytes=staging)


def expected_distinct(experts: int, active: int, tokens: int) -> float:
    """Expected distinct experts a batch of `tokens` tokens selects when each picks `active` of `experts`
    uniformly: E * (1 - (1 - k/E) ** b)."""
    if experts <= 0 or tokens <= 0:
        return 0.0
    return experts * (1.0 - (1.0 - min(active, experts) / experts) ** tokens)


def min_cache_slots(moe: MoeLayers, streamed: tuple[int, ...]) -> int:
    """Fewest expert slots that serve any pass: every expert of the largest streamed MoE layer (a
    prefill chunk selects them all, and they must sit on the GPU together)."""
    return max((moe.num_experts[i] for i in streamed), default=0)


def streamed_experts(moe: MoeLayers, streamed: tuple[int, ...]) -> int:
    return sum(moe.num_experts[i] for i in streamed)


def hit_fraction(moe: MoeLayers, streamed: tuple[int, ...], slots: int) -> float:
    """Share of selected experts found in a cache of `slots` slots under the uniform prior: the slots
    beyond one layer's working set, over all streamed experts."""
    total = streamed_experts(moe, streamed)
    if not total:
        return 0.0
    return min(1.0, max(slots - min_cache_slots(moe, streamed), 0) / total)


def expert_bytes_per_step(moe: MoeLayers, streamed: tuple[int, ...], slots: int, batch: int,
                          stats: RoutingStats | None = None) -> int:
    """Expected routed-expert bytes copied per decode step of `batch` sequences: under the uniform prior,
    or under measured routing `stats` (`routing.traffic`; the same number for `RoutingStats.uniform`)."""
    return round(sum(misses * moe.sent(i) for i, _, misses in _layer_traffic(moe, streamed, slots, batch, stats)))


def expected_hit_rate(moe: MoeLayers, streamed: tuple[int, ...], slots: int, batch: int,
                      stats: RoutingStats | None = None) -> float:
    """Expected share of selected experts found in the cache (`ExpertCache.hit_rate` at decode): the
    uniform prior's `hit_fraction`, or under measured routing `stats` higher where routing is uneven."""
    if stats is None:
        return hit_fraction(moe, streamed, slots)
    layers = _layer_traffic(moe, streamed, slots, batch, stats)
    distinct = sum(d for _, d, _ in layers)
    return 1.0 - sum(m for _, _, m in layers) / distinct if distinct else 0.0


def ring_bytes(moe: MoeLayers, fp: Footprint, layer: int) -> int:
    """What a streamed layer sends through the ring: all of it for a dense layer, else all but its experts."""
    return moe.ring_bytes[layer] if moe.num_experts[layer] else fp.layer_bytes[layer]


def _least_cache(plan: Plan, fp: Footprint, moe: MoeLayers) -> Plan | None:
    """The expert-aware form of a plan's tiers with the least expert cache (one layer's experts): ring
    slots sized for the streamed layers without their experts. None where no streamed layer is MoE or
    the streamed layers are not bf16."""
    streamed = tuple(i for i in plan.streamed_layers if moe.num_experts[i])
    if not streamed or plan.stream_format != "bf16":
        return None
    return replace(plan, slot_bytes=max(ring_bytes(moe, fp, i) for i in plan.streamed_layers),
                   expert_slots=min_cache_slots(moe, streamed),
                   expert_slot_bytes=max(moe.expert_bytes[i] for i in streamed), moe_streaming="experts",
                   expand_bytes=plan.expand_bytes + moe.code_staging_bytes, expert_codes=moe.coded)


def to_experts(plan: Plan, fp: Footprint, moe: MoeLayers, budget: int | None) -> Plan | None:
    """The expert-aware form of a plan's tiers: ring slots sized for the streamed layers without their
    experts, an expert cache of at least one layer's experts plus whatever budget is left over (hot
    experts), and the expected bytes per step at the plan's batch. None when it does not fit `budget`
    or no streamed layer is MoE."""
    base = _least_cache(plan, fp, moe)
    if base is None or budget is not None and base.device_bytes > budget:
        return None
    streamed = tuple(i for i in plan.streamed_layers if moe.num_experts[i])
    extra = streamed_experts(moe, streamed) - base.expert_slots
    if budget is not None:
        extra = min(extra, (budget - base.device_bytes) // base.expert_slot_bytes)
    slots = base.expert_slots + extra
    ring = sum(ring_bytes(moe, fp, i) for i in plan.streamed_layers)
    sent = ring + expert_bytes_per_step(moe, streamed, slots, plan.workload.batch)
    return replace(base, expert_slots=slots, streamed_bytes_per_step=sent)


def experts_plan(fp: Footprint, moe: MoeLayers, budget: int | None, workload: Workload, depth: int,
                 kv_host: int = 0) -> Plan | None:
    """The expert-aware plan that keeps the most layers resident within `budget` (the first layers
    stream, as `greedy_plan`'s do); None when nothing needs to stream or nothing fits.

    Under the uniform prior a resident layer saves more link bytes per GPU byte than cached experts
    (its ring part too), so layers go resident first and the cache takes what is left."""
    if budget is None:
        return None
    for streamed in range(1, len(fp.layer_bytes) + 1):
        candidate = to_experts(streaming_plan(fp, workload, streamed, depth, budget, kv_host), fp, moe, budget)
        if candidate is not None:
            return candidate
    return None


def least_experts_plan(fp: Footprint, moe: MoeLayers, workload: Workload, depth: int) -> Plan | None:
    """The smallest expert-aware plan `experts_plan` can find for `workload`: every layer's KV in host
    memory, the least expert cache, and the number of leading layers streamed that needs the fewest GPU
    bytes. None where no layer can stream its experts."""
    n = len(fp.layer_bytes)
    plans = (_least_cache(streaming_plan(fp, workload, s, depth, None, n), fp, moe) for s in range(1, n + 1))
    return min((p for p in plans if p is not None), key=lambda p: p.device_bytes, default=None)


def _experts_search(fp: Footprint, moe: MoeLayers, budget: int | None, workload: Workload, depth: int,
                    kv_device_bytes: int | None) -> Plan | None:
    """The expert-aware plan found as `placement.greedy_plan` searches: the fewest leading layers' KV in
    host memory first (`kv_host_choices`), then the most layers resident; None when none fits. A whole-layer
    plan's host KV is not inherited: smaller ring slots may leave room for all of it on the GPU."""
    for kv_host in kv_host_choices(fp, workload, kv_device_bytes, depth):
        plan = experts_plan(fp, moe, budget, workload, depth, kv_host)
        if plan is not None:
            return plan
    return None


def _experts_only(fp: Footprint, moe: MoeLayers, budget: int | None, workload: Workload, depth: int,
                  kv_device_bytes: int | None, fit_batch: bool) -> Plan:
    """The expert-aware plan where no whole-layer plan fits `budget`, searched as `placement.place` searches
    (the fewest layers' KV in host memory first; with `fit_batch`, the largest batch whose KV stays on
    the GPU).

    Raises:
        OverspillError: quoting the smallest budget at which some plan, expert-aware or whole-layer, fits.
    """
    if fit_batch:
        workload = largest_batch(workload, lambda w: _device_kv(fp, moe, budget, w, depth, kv_device_bytes))
    plan = _experts_search(fp, moe, budget, workload, depth, kv_device_bytes)
    if plan is not None:
        return plan
    dense, experts = least_plan(fp, workload, depth), least_experts_plan(fp, moe, workload, depth)
    if experts is None or dense.device_bytes <= experts.device_bytes:
        raise below_minimum(fp, budget, dense)
    raise below_minimum(fp, budget, experts, " with expert streaming")


def _device_kv(fp: Footprint, moe: MoeLayers, budget: int | None, workload: Workload, depth: int,
               kv_device_bytes: int | None) -> bool:
    """Whether an expert-aware plan keeps every layer's KV on the GPU (within `kv_device_bytes`) at `workload`."""
    try:
        return kv_host_choices(fp, workload, kv_device_bytes, depth)[0] == 0 and \
            experts_plan(fp, moe, budget, workload, depth) is not None
    except OverspillError:  # the cap cannot even hold the staging KV at this batch
        return False


def experts_prediction(pred: Prediction, plan: Plan, moe: MoeLayers, h2d_bytes_s: float,
                       stats: RoutingStats | None = None) -> Prediction:
    """`costmodel.predict`'s prediction for an expert-aware plan with the serial expert fetch added
    (module docstring): each streamed MoE layer's expert copies wait for its router and hold up its
    experts' compute, plus one sync. `stats`: measured routing instead of the uniform prior."""
    streamed = tuple(i for i in plan.streamed_layers if moe.num_experts[i])
    expert_bytes = expert_bytes_per_step(moe, streamed, plan.expert_slots, plan.workload.batch, stats)
    expert_link = expert_bytes / h2d_bytes_s if h2d_bytes_s else 0.0
    return _with_expert_wait(pred, plan, expert_link, moe.synced_layers(streamed, plan.workload.batch), pred.link_s)


def _with_expert_wait(pred: Prediction, plan: Plan, wait_s: float, layers: int, link_s: float) -> Prediction:
    serial = pred.gpu_s + wait_s + layers * SYNC_S
    step = max(link_s, serial, pred.host_s)
    bottleneck = "expert fetch" if step == serial and serial > max(link_s, pred.host_s) else pred.bottleneck
    return replace(pred, decode_step_s=step, decode_tok_s=plan.workload.batch / step, bottleneck=bottleneck,
                   link_s=link_s)


def _layer_traffic(moe: MoeLayers, streamed: tuple[int, ...], slots: int, batch: int,
                   stats: RoutingStats | None) -> list[tuple[int, float, float]]:
    """(layer, expected distinct experts, expected misses) per streamed MoE layer: uniform prior or `stats`."""
    if stats is not None:
        extra = slots - min_cache_slots(moe, streamed)
        return [(t.layer, t.distinct, t.misses) for t in traffic(moe, streamed, extra, batch, stats)]
    miss = 1.0 - hit_fraction(moe, streamed, slots)
    return [(i, d, d * miss) for i in streamed for d in (expected_distinct(moe.num_experts[i], moe.active[i], batch),)]


def with_host_experts(plan: Plan, moe: MoeLayers, profile: Profile, mode: str, dtype_bytes: int = 2,
                      stats: RoutingStats | None = None) -> Plan:
    """An expert-aware plan whose host computes a share of each streamed MoE layer's expected misses
    (`planning.host_experts`): fewer bytes cross per step, and each layer waits for the slower of the
    host's share and the link's. Each miss is assumed routed to batch x active / distinct tokens.
    `stats`: measured routing instead of the uniform prior."""
    if mode == "off" or plan.prediction is None or plan.moe_streaming != "experts" or moe.coded:
        return plan
    streamed = tuple(i for i in plan.streamed_layers if moe.num_experts[i])
    batch = plan.workload.batch
    wait, saved = 0.0, 0.0
    for i, distinct, misses in _layer_traffic(moe, streamed, plan.expert_slots, batch, stats):
        if distinct <= 0:
            continue
        k, seconds = layer_split(misses, batch * moe.active[i] / distinct, moe.expert_bytes[i],
                                 moe.expert_bytes[i] // dtype_bytes, profile.h2d_bytes_s, profile.cpu_gemv_params_s,
                                 mode)
        wait += seconds
        saved += k * moe.expert_bytes[i]
    pred = plan.prediction
    link_s = max(0.0, pred.link_s - saved / profile.h2d_bytes_s)
    pred = replace(_with_expert_wait(pred, plan, wait, moe.synced_layers(streamed, batch), link_s),
                   link_floor_tok_s=batch / link_s if link_s > 0 else pred.link_floor_tok_s)
    return replace(plan, streamed_bytes_per_step=max(0, round(plan.streamed_bytes_per_step - saved)), prediction=pred)


def blocker(stream_format: str, streaming: str, cuda_graphs: bool, speculate: str | None) -> str | None:
    """What rules expert streaming out for a load (`choose` then keeps whole layers), or None; `overspill plan`
    asks the same."""
    if stream_format != NATIVE:
        return f"stream format {stream_format}"
    if streaming in MANAGED_MODES:
        return f"streaming={streaming!r}"
    if cuda_graphs:
        return "CUDA graphs"
    if speculate not in (None, "auto"):  # auto drafts nothing beside expert streaming (`auto_source`)
        return "speculative decoding"
    return None


def _check_mode(mode: str) -> None:
    if mode not in MOE_STREAMING:
        raise OverspillError(f"moe_streaming must be one of {', '.join(MOE_STREAMING)}, got {mode!r}")


def choose(dense: Plan, fp: Footprint, moe: MoeLayers, budget: int | None, requested: str, depth: int,
           blocker: str | None = None, profile: Profile | None = None,
           kv_device_bytes: int | None = None) -> tuple[Plan, str | None]:
    """(plan, note) for `load(moe_streaming=...)` and `overspill plan`: "experts" takes the expert-aware
    plan, "auto" takes it where it is predicted faster than `dense` (with a profile; else where it moves
    fewer bytes per step), "dense" keeps `dense`. `blocker` names what rules expert streaming out
    (a stream format, managed memory, CUDA graphs), refused for "experts" and noted for "auto".
    `kv_device_bytes` caps the expert-aware plan's device KV as it capped `dense`'s.

    Raises:
        OverspillError: for an unknown mode, or "experts" where it cannot apply.
    """
    _check_mode(requested)
    if requested == "dense" or not moe.is_moe or not any(moe.num_experts[i] for i in dense.streamed_layers):
        return dense, None
    if blocker is not None:
        if requested == "experts":
            raise OverspillError(f"expert streaming does not combine with {blocker} yet: use moe_streaming='dense'")
        return dense, f"{DENSE_NOTE} (dense): expert streaming does not combine with {blocker} yet"
    candidate = _experts_search(fp, moe, budget, dense.workload, depth, kv_device_bytes)
    if candidate is None:
        if requested == "experts":
            raise OverspillError("no expert-aware plan fits this budget (it needs one layer's experts as a GPU cache)")
        return dense, f"{DENSE_NOTE} (dense): no expert-aware plan fits the budget"
    if profile is not None:
        expert_tok_s = predict(fp, candidate, moe, profile).prediction.decode_tok_s
        gain = expert_tok_s > with_prediction(fp, dense, profile).prediction.decode_tok_s
    else:
        gain = candidate.streamed_bytes_per_step < dense.streamed_bytes_per_step
    if requested == "auto" and not gain:
        return dense, f"{DENSE_NOTE} (dense): expert streaming is not predicted faster here"
    return candidate, None


def predict(fp: Footprint, plan: Plan, moe: MoeLayers, profile: Profile, cpu_experts: str = "off",
            stats: RoutingStats | None = None) -> Plan:
    """`placement.with_prediction`, with the serial expert fetch for an expert-aware plan (the host's
    share of it with `cpu_experts`). With measured routing `stats` an expert-aware plan's bytes per step
    are recomputed first (ring bytes + `expert_bytes_per_step` under `stats`), so a loaded plan can be
    re-predicted from what its router did."""
    if stats is not None and plan.moe_streaming == "experts":
        plan = replace(plan, streamed_bytes_per_step=moe_bytes_per_step(fp, plan, moe, stats))
    plan = with_prediction(fp, plan, profile)
    if plan.moe_streaming != "experts" or plan.prediction is None:
        return plan
    # the hot-expert slots take what the workload leaves; a larger batch would take them back
    streamed = tuple(i for i in plan.streamed_layers if moe.num_experts[i])
    least = replace(plan, expert_slots=min_cache_slots(moe, streamed))
    placed = replace(plan, prediction=experts_prediction(plan.prediction, plan, moe, profile.h2d_bytes_s, stats),
                     max_batch=max_batch(fp, least))
    return with_host_experts(placed, moe, profile, cpu_experts, fp.dtype_bytes, stats)


def moe_bytes_per_step(fp: Footprint, plan: Plan, moe: MoeLayers, stats: RoutingStats | None = None,
                       batch: int | None = None) -> int:
    """Link bytes per decode step of an expert-aware plan at `batch` (default: the plan's): its ring bytes
    plus the expected expert copies, under the uniform prior or measured routing `stats`. No host experts."""
    streamed = tuple(i for i in plan.streamed_layers if moe.num_experts[i])
    ring = sum(ring_bytes(moe, fp, i) for i in plan.streamed_layers)
    return ring + expert_bytes_per_step(moe, streamed, plan.expert_slots, batch or plan.workload.batch, stats)


@dataclass(frozen=True)
class Forecast:
    """Predicted decode of one plan at one batch: bytes over the link per step and per token, tok/s."""

    mode: str
    batch: int
    bytes_per_step: int
    tok_s: float
    link_floor_tok_s: float | None

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_per_step / self.batch


def forecasts(fp: Footprint, moe: MoeLayers, budget: int | None, workload: Workload, depth: int,
              profile: Profile, batches: tuple[int, ...] = (1, 8), host_experts: bool = False,
              stats: RoutingStats | None = None) -> list[Forecast]:
    """Dense and expert-aware streaming side by side at each batch (each planned for that batch), and
    with `host_experts` the host computing a share of the misses (--cpu-experts auto). `stats`: predict
    the expert-aware plans under measured routing (they are still placed under the uniform prior)."""
    out = []
    for batch in batches:
        w = replace(workload, batch=batch)
        plans: list[tuple[str, Plan]] = []
        try:
            dense = place(fp, budget, w, depth)
            plans.append(("dense", predict(fp, dense, moe, profile)))
            experts = _experts_search(fp, moe, budget, w, depth, None)
        except OverspillError:  # below the whole-layer minimum, where expert streaming may still fit
            try:
                experts = _experts_only(fp, moe, budget, w, depth, None, False)
            except OverspillError:
                continue
        if experts is not None:
            plans.append(("experts", predict(fp, experts, moe, profile, stats=stats)))
            if host_experts and profile.cpu_gemv_params_s > 0 and not moe.coded:  # --cpu-experts auto's share
                plans.append(("experts+cpu", predict(fp, experts, moe, profile, "auto", stats)))
        for mode, plan in plans:
            p = plan.prediction
            out.append(Forecast(mode, batch, plan.streamed_bytes_per_step + plan.kv_host_bytes, p.decode_tok_s,
                                p.link_floor_tok_s))
    return out


def place_moe(fp: Footprint, moe: MoeLayers, budget: int | None, workload: Workload, depth: int,
              kv_device_bytes: int | None, fit_batch: bool, mode: str, blocker: str | None = None,
              profile: Profile | None = None) -> tuple[Plan, str | None]:
    """`placement.place`, then `choose` between it and expert streaming: what `load` places and
    `overspill plan` shows, both through this one function. Where even streaming every whole layer
    does not fit, the expert-aware plan (smaller ring slots) may still fit, unless `mode` is "dense"
    or something rules it out.

    Raises:
        OverspillError: for an unknown mode, or where no plan fits `budget`, quoting the smallest
            budget at which one fits (expert streaming included where it may apply).
    """
    _check_mode(mode)
    if depth < 1:  # as `greedy_plan` refuses it, before the expert-aware search could take it
        raise OverspillError(f"prefetch depth must be at least 1, got {depth}")
    try:
        dense = place(fp, budget, workload, depth, kv_device_bytes, fit_batch)
    except OverspillError:
        if mode == "dense" or blocker is not None or not moe.is_moe:
            raise
        fallback = _experts_only(fp, moe, budget, workload, depth, kv_device_bytes, fit_batch)
        return fallback, "expert streaming: only its smaller ring slots fit the budget"
    return choose(dense, fp, moe, budget, mode, depth, blocker, profile, kv_device_bytes)
