"""Pipeline over layers (issue 18): which contiguous span of decoder layers each rank owns. Pure Python.

Each rank is one GPU with its own host link. It places its own span with the ordinary rule
(`placement.place`) under its own budget: the span's last layers resident, its first ones streamed
through its own ring over its own link. Rank 0 also holds the input embedding, the final norm's
logits and the LM head (one copy even when they are tied), so it gets fewer layers.

Cost of one decode step (derivation; the cost model's vocabulary, `costmodel.predict` per span):

- One forward pass visits the ranks in order: rank r computes its span when rank r-1's hidden
  states arrive, so for a batch that is not split the ranks' times add:
      t_step = sum_r t_r,  t_r = max(link_r, gpu_r, host_r)   (`costmodel.predict` on the span)
  and a pass pays `world` hidden-state hops (the last back to rank 0 for the head), each
  batch x tokens x hidden x dtype bytes: kilobytes at decode, noise against a streamed layer.
- A rank's link is idle while the others compute, except for the `depth` layers its ring prefetches
  for the next step: keeping it busy through the others' turn would need slots for most of its
  streamed layers, i.e. the memory that could have held them resident. So at batch 1 a pipeline
  adds memory (N budgets keep more layers resident, so fewer bytes stream), not link bandwidth.
- With the batch split in micro-batches that follow each other through the ranks, every rank is busy
  at once, but each micro-batch's pass streams the rank's layers again: link-bound ranks gain
  nothing; compute-bound ranks (resident spans, large batches) gain up to `world`x. So the split
  minimises the slowest rank's time (what micro-batches and serving throughput see) and so keeps
  every rank's budget full (what the sum at batch 1 sees).

The balance is exact over contiguous splits: bisection on the slowest rank's time, each rank taking
the most layers whose predicted time stays under it (a rank's time only grows with its span).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from ..errors import OverspillError
from .costmodel import predict
from .placement import place
from .plan import DEFAULT_DEPTH, Plan, Tier, Workload, footprint_from_spec
from .profile import REFERENCE_PROFILES, Profile
from .spec import ModelSpec
from .units import format_bytes

REFERENCE = "h100-pcie5"  # the machine a split is balanced for when no probe is given (links alike per GPU)


@dataclass(frozen=True)
class RankSpan:
    """One rank's part of a pipeline: decoder layers [start, stop) and what its own plan predicts."""

    rank: int
    start: int
    stop: int
    ends: bool  # holds the input embedding, final norm's logits and LM head (rank 0)
    budget_bytes: int | None
    resident_layers: int
    streamed_bytes: int  # over this rank's link per decode step (weights and host-tier KV)
    seconds: float  # predicted time of this rank's part of one decode step

    @property
    def layers(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class PipelineSplit:
    """Every rank's span, balanced on the slowest rank's predicted time. A decision as data."""

    spans: tuple[RankSpan, ...]
    profile: str  # the machine the times are predicted for
    batch: int

    @property
    def world(self) -> int:
        return len(self.spans)

    @property
    def step_seconds(self) -> float:
        """One decode step of an unsplit batch: the ranks run one after another."""
        return sum(s.seconds for s in self.spans)

    @property
    def slowest_seconds(self) -> float:
        """The slowest rank's part of a step. Micro-batches would bring a step down to it only where ranks
        are compute-bound; a link-bound rank streams its layers again for every micro-batch, so there the
        step stays about `step_seconds` (module docstring)."""
        return max(s.seconds for s in self.spans)

    @property
    def streamed_bytes(self) -> int:
        return sum(s.streamed_bytes for s in self.spans)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        lines = [f"pipeline over {self.world} ranks (times predicted for {self.profile}, batch {self.batch}):"]
        for s in self.spans:
            budget = "unlimited" if s.budget_bytes is None else format_bytes(s.budget_bytes)
            lines.append(
                f"  rank {s.rank}: layers {s.start}-{s.stop - 1} ({s.layers}, {s.resident_layers} resident)"
                + (", embeddings + lm_head" if s.ends else "")
                + f"; budget {budget}; {format_bytes(s.streamed_bytes)} over its link per step; "
                f"{s.seconds * 1e3:.1f} ms"
            )
        lines.append(f"  step {self.step_seconds * 1e3:.1f} ms unsplit ({self.batch / self.step_seconds:.2f} tok/s), "
                     f"slowest rank {self.slowest_seconds * 1e3:.1f} ms")
        return "\n".join(lines)


def span_spec(spec: ModelSpec, start: int, stop: int, ends: bool) -> ModelSpec:
    """The `ModelSpec` one rank places: layers [start, stop) numbered from 0, with the embedding and head
    only on the rank that `ends` the pipeline; every rank keeps the final norm and rotary tables."""
    layers = tuple(replace(layer, index=i) for i, layer in enumerate(spec.layers[start:stop]))
    if ends:
        return replace(spec, layers=layers, num_layers=len(layers))
    return replace(spec, layers=layers, num_layers=len(layers), embed_bytes=0, head_bytes=0, tied_embeddings=False)


def rank_plan(spec: ModelSpec, start: int, stop: int, ends: bool, budget: int | None, workload: Workload,
              depth: int = DEFAULT_DEPTH) -> Plan:
    """A rank's own plan of its span (layer indices from 0), by the rule `load` uses."""
    return place(footprint_from_spec(span_spec(spec, start, stop, ends)), budget, workload, depth)


def _seconds(spec: ModelSpec, plan: Plan, start: int, stop: int, ends: bool, profile: Profile) -> float:
    fp = footprint_from_spec(span_spec(spec, start, stop, ends))
    pred = predict(
        layer_bytes=fp.layer_bytes, layer_active_bytes=fp.layer_active_bytes or fp.layer_bytes,
        streamed_bytes=plan.streamed_bytes_per_step + plan.kv_host_bytes,
        head_bytes=fp.embed_bytes if fp.tied_embeddings else fp.head_bytes, kv_bytes_per_token=fp.kv_bytes_per_token,
        dtype_bytes=fp.dtype_bytes, profile=profile, batch=plan.workload.batch, context=plan.workload.context,
    )
    return pred.decode_step_s


def split_layers(
    spec: ModelSpec,
    budgets: list[int | None] | tuple[int | None, ...],
    workload: Workload = Workload(),
    depth: int = DEFAULT_DEPTH,
    profile: Profile | None = None,
) -> PipelineSplit:
    """Contiguous spans of decoder layers, one per budget (rank), that minimise the slowest rank's
    predicted decode time.

    Args:
        spec: the whole model.
        budgets: each rank's GPU bytes (None: no limit), rank 0 first; rank 0 holds embeddings and head.
        workload: what every rank reserves KV and activations for (each for its own layers).
        profile: the machine (one GPU and its link; all ranks alike); default the reference H100.

    Raises:
        OverspillError: more ranks than layers, or budgets too small for any split.
    """
    world, n = len(budgets), len(spec.layers)
    if world < 1:
        raise OverspillError("a pipeline needs at least one rank")
    if world > n:
        raise OverspillError(f"{world} ranks cannot split {n} decoder layers: use at most {n} ranks")
    machine = profile or REFERENCE_PROFILES[REFERENCE]
    memo: dict[tuple[int, int, int], tuple[float, Plan | None]] = {}

    def cost(rank: int, start: int, stop: int) -> tuple[float, Plan | None]:
        key = (rank, start, stop)
        if key not in memo:
            try:
                plan = rank_plan(spec, start, stop, rank == 0, budgets[rank], workload, depth)
                memo[key] = _seconds(spec, plan, start, stop, rank == 0, machine), plan
            except OverspillError:  # below this rank's minimum working set
                memo[key] = float("inf"), None
        return memo[key]

    def assign(limit: float) -> list[tuple[int, int]] | None:
        """Each rank the most layers within `limit` (leaving one per later rank); None if infeasible."""
        spans, start = [], 0
        for rank in range(world):
            last = n - (world - 1 - rank)
            if rank == world - 1:
                stop = n if cost(rank, start, n)[0] <= limit else None
            else:
                lo, hi, stop = start + 1, last, None
                while lo <= hi:  # largest stop with cost <= limit (cost grows with the span)
                    mid = (lo + hi) // 2
                    if cost(rank, start, mid)[0] <= limit:
                        stop, lo = mid, mid + 1
                    else:
                        hi = mid - 1
            if stop is None:
                return None
            spans.append((start, stop))
            start = stop
        return spans

    even = [(n * r // world, n * (r + 1) // world) for r in range(world)]
    high = max(cost(r, a, b)[0] for r, (a, b) in enumerate(even))
    if high == float("inf"):  # even split infeasible: try the largest finite single-rank cost as a bound
        high = max((cost(r, 0, n)[0] for r in range(world)), default=float("inf"))
        high = high if high < float("inf") else 1e9
    if assign(high) is None:
        raise OverspillError(
            f"no split of {n} layers over {world} GPUs fits the budgets "
            f"({', '.join('unlimited' if b is None else format_bytes(b) for b in budgets)}): raise --gpu-memory"
        )
    low = 0.0
    for _ in range(60):  # bisection on the slowest rank's time
        mid = (low + high) / 2
        if assign(mid) is None:
            low = mid
        else:
            high = mid
        if high - low <= 1e-9 * high:
            break
    spans = []
    for rank, (start, stop) in enumerate(assign(high)):
        seconds, plan = cost(rank, start, stop)
        spans.append(RankSpan(rank, start, stop, rank == 0, budgets[rank], len(plan.resident_layers),
                              plan.streamed_bytes_per_step + plan.kv_host_bytes, seconds))
    return PipelineSplit(tuple(spans), machine.name, workload.batch)


def global_plan(plan: Plan, span: RankSpan, num_layers: int) -> Plan:
    """A rank's span plan as the loader places it on the whole model: one tier per decoder layer, the
    layers of other ranks as weightless stand-ins (counted resident, holding nothing), host-tier KV
    indices shifted to the span, and a note naming the span."""
    before, after = span.start, num_layers - span.stop
    tiers = (Tier.DEVICE,) * before + plan.layer_tiers + (Tier.DEVICE,) * after
    note = (f"pipeline rank {span.rank}: decoder layers {span.start}-{span.stop - 1} "
            f"({len(plan.streamed_layers)} streamed over this GPU's link)"
            + ("; embeddings and lm_head" if span.ends else "; embeddings and lm_head on rank 0"))
    return replace(
        plan, layer_tiers=tiers, kv_host_layers=tuple(i + before for i in plan.kv_host_layers),
        embed_tier=plan.embed_tier if span.ends else Tier.DEVICE, notes=plan.notes + (note,),
    )


# --- Tensor parallel over GPUs: a prediction only (not implemented; reasoning from the cost model) ---
#
# Each of N GPUs would hold 1/N of every layer (KV-head groups and MLP columns, as the CPU rank splits
# a layer: `runtime/split_layer.py`) and of the LM head (vocabulary rows), and stream its 1/N of each
# streamed layer over its own link, all N links at once. A layer then costs two joins (all-reduce of
# [batch x tokens, hidden] after attention and after the MLP). So per step:
#     t = max(link / N-way, gpu / N-way, host) + 2 x layers x join(batch)
# The link term is what a pipeline cannot divide: at batch 1 the ranks of a pipeline take turns on
# their links, those of tensor parallelism copy at once.
JOIN_LATENCY_S = 20e-6  # ASSUMED per all-reduce (NCCL, small messages, NVLink); not measured here
JOIN_BYTES_S = 100e9  # ASSUMED all-reduce bus bandwidth for large messages (NVLink); PCIe-only hosts: ~20e9


@dataclass(frozen=True)
class TensorParallelEstimate:
    """Predicted decode step of tensor parallelism over `gpus` GPUs, beside the pipeline's (a prediction
    from assumed join costs; nothing here is measured)."""

    gpus: int
    streamed_bytes_per_gpu: int
    step_seconds: float
    join_seconds: float
    pipeline_step_seconds: float

    @property
    def speedup_vs_pipeline(self) -> float:
        return self.pipeline_step_seconds / self.step_seconds


def shard_spec(spec: ModelSpec, gpus: int) -> ModelSpec:
    """One GPU's 1/`gpus` of every layer, of the embedding and of the head (byte counts divided)."""
    layers = tuple(replace(layer, attention_bytes=layer.attention_bytes // gpus, mlp_bytes=layer.mlp_bytes // gpus,
                           expert_bytes=layer.expert_bytes // gpus, router_bytes=layer.router_bytes,
                           kv_bytes_per_token=layer.kv_bytes_per_token // gpus, padding_bytes=0)
                   for layer in spec.layers)
    return replace(spec, layers=layers, embed_bytes=spec.embed_bytes // gpus, head_bytes=spec.head_bytes // gpus,
                   num_attention_heads=max(spec.num_attention_heads // gpus, 1),
                   num_kv_heads=max(spec.num_kv_heads // gpus, 1))


def tensor_parallel_estimate(spec: ModelSpec, budget: int | None, gpus: int, workload: Workload = Workload(),
                             depth: int = DEFAULT_DEPTH, profile: Profile | None = None,
                             join_latency_s: float = JOIN_LATENCY_S, join_bytes_s: float = JOIN_BYTES_S,
                             ) -> TensorParallelEstimate:
    """Predicted decode step of `gpus`-way tensor parallelism, every GPU under `budget`, against the
    pipeline over the same GPUs (`split_layers`). Raises OverspillError where the shard does not fit."""
    machine = profile or REFERENCE_PROFILES[REFERENCE]
    if spec.num_kv_heads % gpus:
        raise OverspillError(f"{spec.num_kv_heads} KV heads do not split over {gpus} GPUs")
    shard = shard_spec(spec, gpus)
    plan = place(footprint_from_spec(shard), budget, workload, depth)
    compute = _seconds(shard, plan, 0, len(shard.layers), True, machine)
    message = workload.batch * spec.hidden_size * spec.dtype_bytes  # one decode token per sequence
    joins = 2 * len(spec.layers) * (join_latency_s + message / join_bytes_s) if gpus > 1 else 0.0
    pipeline = split_layers(spec, [budget] * gpus, workload, depth, profile)
    return TensorParallelEstimate(gpus, plan.streamed_bytes_per_step + plan.kv_host_bytes, compute + joins, joins,
                                  pipeline.step_seconds)


def comparison_lines(spec: ModelSpec, budget: int | None, gpus: int, workload: Workload = Workload(),
                     depth: int = DEFAULT_DEPTH, profile: Profile | None = None) -> list[str]:
    """`overspill plan --gpus N`: the pipeline's split over N GPUs of `budget` each, its predicted ratio to one
    GPU, and tensor parallelism's prediction beside it (labelled: not implemented)."""
    split = split_layers(spec, [budget] * gpus, workload, depth, profile)
    one = split_layers(spec, [budget], workload, depth, profile)
    lines = split.summary().splitlines()
    lines.append(f"  against one GPU: {one.step_seconds * 1e3:.1f} ms a step ({workload.batch / one.step_seconds:.2f} "
                 f"tok/s): {one.step_seconds / split.step_seconds:.2f}x predicted (the ranks run one after another; "
                 f"more GPUs keep more layers resident, so fewer bytes cross the links)")
    try:
        tp = tensor_parallel_estimate(spec, budget, gpus, workload, depth, profile)
        lines.append(f"  tensor parallel over {gpus} GPUs (not implemented; a prediction with assumed join costs): "
                     f"{tp.step_seconds * 1e3:.1f} ms a step, {tp.speedup_vs_pipeline:.2f}x the pipeline (every link "
                     f"copies its share of each layer at once)")
    except OverspillError as exc:
        lines.append(f"  tensor parallel over {gpus} GPUs: {exc}")
    return lines
