"""Measured routing of a loaded expert-streamed model, fed back to the planner.

The `ExpertCache` counts the tokens each streamed MoE layer's router saw and routed to each expert
(`ExpertCache.routing_stats`); `load` keeps what the planner needed (`planning.routing.MoeBasis`), so the
plan's bytes per step and prediction can be recomputed under the router's measured behaviour instead of
the uniform prior it was placed under (`planning.moe.predict(stats=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ..errors import OverspillError
from ..planning import moe
from ..planning.costmodel import Prediction
from ..planning.plan import Plan
from ..planning.profile import Profile
from ..planning.routing import MoeBasis, RoutingStats
from .loader import placement_of


def routing_stats(model: nn.Module) -> RoutingStats | None:
    """Measured routing of the streamed MoE layers of a model from `load`, since it was loaded; None where
    no layer streams its experts."""
    cache = placement_of(model).experts
    return None if cache is None else cache.routing_stats()


def _basis(model: nn.Module) -> MoeBasis:
    basis = getattr(model, "overspill_moe", None)
    if basis is None or placement_of(model).experts is None:
        raise OverspillError("this model streams no experts (load it with moe_streaming='experts' or 'auto')")
    return basis


def measured_moe_plan(model: nn.Module, batch: int | None = None, profile: Profile | None = None) -> Plan:
    """The model's plan re-predicted from its measured routing at `batch` sequences (default: the plan's):
    bytes per step always, the prediction where a profile is known (`profile`, else the load's probe).

    Raises:
        OverspillError: where the model streams no experts.
    """
    basis = _basis(model)
    plan = placement_of(model).plan
    if batch is not None:
        plan = replace(plan, workload=replace(plan.workload, batch=batch))
    stats = routing_stats(model)
    profile = profile or basis.profile
    if profile is None:
        return replace(plan, streamed_bytes_per_step=moe.moe_bytes_per_step(basis.fp, plan, basis.moe, stats),
                       prediction=None)
    return moe.predict(basis.fp, plan, basis.moe, profile, basis.cpu_experts, stats)


def measured_moe_prediction(model: nn.Module, profile: Profile | None = None) -> Prediction:
    """The plan's prediction recomputed from measured routing (`measured_moe_plan` at the plan's batch).

    Raises:
        OverspillError: where the model streams no experts, or no profile is known (no GPU probe: pass one).
    """
    pred = measured_moe_plan(model, profile=profile).prediction
    if pred is None:
        raise OverspillError("no machine profile to predict with (nothing was probed): pass profile=")
    return pred


@dataclass(frozen=True)
class ExpertCounters:
    """The expert cache's cumulative counters at one moment: two of them bound a span of decode steps."""

    hits: int
    misses: int
    bytes_copied: int

    @classmethod
    def of(cls, model: nn.Module) -> "ExpertCounters | None":
        cache = placement_of(model).experts
        return None if cache is None else cls(cache.hits, cache.misses, cache.bytes_copied)


@dataclass(frozen=True)
class DecodeTraffic:
    """Link bytes per decode token of an expert-streamed model at batch 1: measured (ring bytes + expert
    bytes the cache copied), planned under the uniform prior, and re-predicted from measured routing (both
    without host experts), with the tok/s re-predicted where the load probed the machine."""

    hit_rate: float
    measured: float
    planned: float
    predicted: float
    predicted_tok_s: float | None  # None without a profile


def decode_traffic(model: nn.Module, start: ExpertCounters, steps: int) -> DecodeTraffic | None:
    """`DecodeTraffic` of the `steps` one-sequence decode steps since `start`; None without expert
    streaming or steps. Experts the host computes (`cpu_experts`) cross nowhere and are neither hits nor misses."""
    end = ExpertCounters.of(model)
    basis = getattr(model, "overspill_moe", None)
    if end is None or basis is None or steps < 1:
        return None
    plan = placement_of(model).plan
    ring = sum(moe.ring_bytes(basis.moe, basis.fp, i) for i in plan.streamed_layers)
    hits, misses = end.hits - start.hits, end.misses - start.misses
    measured = ring + (end.bytes_copied - start.bytes_copied) / steps
    planned, predicted = (moe.moe_bytes_per_step(basis.fp, plan, basis.moe, stats, 1)
                          for stats in (None, routing_stats(model)))
    again = measured_moe_plan(model, batch=1).prediction if basis.profile is not None else None
    return DecodeTraffic(hits / (hits + misses) if hits + misses else 0.0, measured, planned, predicted,
                         again.decode_tok_s if again else None)
