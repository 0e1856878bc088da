"""Prometheus metrics of the server: HTTP traffic, the engine's steps, the link, the KV cache,
speculative decoding (counters, gauges of their ratios since the start, and the draft trees' budgets)
and expert streaming."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from .requests import SpeculationUsage

if TYPE_CHECKING:
    from .engine import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TREE_BUDGET_BUCKETS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class TreeBudgets:
    """`overspill_speculative_tree_budget`: the budget each draft tree pass drafted for (`tree_budget` adapts it
    between 2 and `--speculate-tree` to the acceptance measured per request), read at each scrape from the
    counts the speculator keeps where it chooses the budget (`Speculator.tree_budget_passes`)."""

    NAME = "overspill_speculative_tree_budget"
    HELP = "tokens each draft tree pass drafted for (its budget, adapted per request)"

    def __init__(self, engine_ref: list["Engine"]):
        self.engine_ref = engine_ref

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.NAME, self.HELP)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts = list(self.engine_ref[0].speculator.tree_budget_passes) if self.engine_ref else []
        buckets = [(floatToGoString(le), sum(counts[: le + 1])) for le in TREE_BUDGET_BUCKETS]
        yield HistogramMetricFamily(self.NAME, self.HELP, buckets=[*buckets, ("+Inf", sum(counts))],
                                    sum_value=sum(b * n for b, n in enumerate(counts)))


class Metrics:
    """Prometheus metrics in a registry of their own (several servers can live in one process)."""

    def __init__(self, engine_ref: list["Engine"], streamed_bytes_per_step: int, link_bytes_per_second: float | None):
        self.streamed_bytes_per_step = streamed_bytes_per_step
        self.link_bytes_per_second = link_bytes_per_second
        self.registry = r = CollectorRegistry()
        self.requests = Counter("overspill_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.tokens = Counter("overspill_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("overspill_time_to_first_token_seconds", "submit to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("overspill_inter_token_latency_seconds", "time between tokens of one request", buckets=LATENCY_BUCKETS, registry=r)
        Gauge("overspill_queue_depth", "requests waiting for the engine", registry=r).set_function(lambda: engine_ref[0].queue_depth)
        Gauge("overspill_active_batch_size", "sequences the engine is decoding", registry=r).set_function(lambda: engine_ref[0].active_count)
        Gauge("overspill_streamed_bytes_per_decode_step", "weight bytes copied host->GPU per decode step (plan)",
              registry=r).set(streamed_bytes_per_step)
        self.batch = Histogram("overspill_decode_batch_size", "sequences per decode step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.step = Histogram("overspill_decode_step_seconds", "one pass over the layers for the batch",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.bytes_per_token = Gauge("overspill_streamed_bytes_per_token",
                                     "weight bytes over the link per generated token, last decode step", registry=r)
        self.link = Gauge("overspill_link_bytes_per_second", "achieved host->GPU weight streaming, last decode step",
                          registry=r)
        Gauge("overspill_link_measured_bytes_per_second", "pinned host->GPU bandwidth measured by the probe (0: unknown)",
              registry=r).set(link_bytes_per_second or 0)
        self.overlap = Gauge("overspill_link_busy_fraction", "fraction of the last decode step the link needed at "
                             "measured bandwidth (1.0: link-bound, fully overlapped)", registry=r)
        kv = Gauge("overspill_kv_blocks", "KV blocks of the engine's admission control", ["state"], registry=r)
        kv.labels("total").set_function(lambda: engine_ref[0].kv_stats().total_blocks)
        kv.labels("used").set_function(lambda: engine_ref[0].kv_stats().used_blocks)
        kv.labels("reserved").set_function(lambda: engine_ref[0].kv_stats().reserved_blocks)
        kv_bytes = Gauge("overspill_kv_bytes", "KV bytes held by running sequences, by tier", ["tier"], registry=r)
        kv_bytes.labels("gpu").set_function(lambda: engine_ref[0].kv_stats().gpu_bytes)
        kv_bytes.labels("host").set_function(lambda: engine_ref[0].kv_stats().host_bytes)
        prefix = Gauge("overspill_prefix_cache_tokens", "prompt tokens looked up in the prefix cache, and "
                       "those whose KV was reused", ["kind"], registry=r)
        prefix.labels("lookup").set_function(lambda: engine_ref[0].kv_stats().prefix_lookup_tokens)
        prefix.labels("hit").set_function(lambda: engine_ref[0].kv_stats().prefix_hit_tokens)
        self.spec_passes = Counter("overspill_speculative_passes", "verify passes over a drafted chain", registry=r)
        self.spec_drafted = Counter("overspill_speculative_drafted_tokens", "tokens drafted for verification",
                                    registry=r)
        self.spec_accepted = Counter("overspill_speculative_accepted_tokens", "drafted tokens the target accepted",
                                     registry=r)
        self.spec_tokens = Counter("overspill_speculative_tokens", "tokens verify passes yielded (accepted drafts "
                                   "+ the target's own)", registry=r)
        self.spec_seconds = Counter("overspill_speculative_seconds", "time of speculative steps by phase",
                                    ["phase"], registry=r)
        self.spec_total = SpeculationUsage()  # the same, as numbers the ratio gauges read
        Gauge("overspill_speculative_tokens_per_pass", "tokens each verify pass yielded, since the start",
              registry=r).set_function(lambda: self.spec_total.tokens_per_pass)
        Gauge("overspill_speculative_acceptance_rate", "drafted tokens accepted / drafted, since the start",
              registry=r).set_function(lambda: self.spec_total.acceptance)
        Gauge("overspill_speculative_draft_time_share", "share of speculative steps' time spent drafting, "
              "since the start", registry=r).set_function(lambda: self.spec_total.draft_share)
        r.register(TreeBudgets(engine_ref))

    def watch_experts(self, model) -> None:
        """Gauges of a model whose MoE layers stream their experts (`runtime.routing`), read at each scrape
        from the counters the engine thread updates."""
        from ..runtime.loader import placement_of
        from ..runtime.routing import measured_moe_plan

        cache = placement_of(model).experts

        def tok_s() -> float:
            pred = measured_moe_plan(model).prediction
            return pred.decode_tok_s if pred is not None else 0.0

        self.expert_hit_rate = Gauge("overspill_expert_cache_hit_rate", "expert cache hits / lookups since the "
                                     "start, prefill included", registry=self.registry)
        self.expert_hit_rate.set_function(lambda: cache.hit_rate)
        self.measured_routing_tok_s = Gauge("overspill_predicted_tokens_per_second_measured_routing", "decode tok/s "
                                            "at the plan's batch, re-predicted from the router's measured expert "
                                            "choices (0: nothing probed)", registry=self.registry)
        self.measured_routing_tok_s.set_function(tok_s)

    # the engine's observer interface (called on the engine thread)
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def generated(self, tokens: int) -> None:
        self.tokens.inc(tokens)

    def speculated(self, drafted: int, accepted: int, tokens: int, draft_seconds: float,
                   verify_seconds: float) -> None:
        """A verify pass over `drafted` drafts yielded `tokens` tokens, `accepted` of them drafted."""
        self.spec_passes.inc()
        self.spec_drafted.inc(drafted)
        self.spec_accepted.inc(accepted)
        self.spec_tokens.inc(tokens)
        self.spec_seconds.labels("draft").inc(draft_seconds)
        self.spec_seconds.labels("verify").inc(verify_seconds)
        self.spec_total.add(drafted, accepted, tokens, draft_seconds, verify_seconds)
        self.bytes_per_token.set(self.streamed_bytes_per_step / max(tokens, 1))

    def decode_step(self, batch_size: int, seconds: float) -> None:
        self.batch.observe(batch_size)
        self.step.observe(seconds)
        self.bytes_per_token.set(self.streamed_bytes_per_step / batch_size)
        self.link.set(self.streamed_bytes_per_step / seconds if seconds > 0 else 0)
        if self.link_bytes_per_second and seconds > 0:
            self.overlap.set(min(self.streamed_bytes_per_step / self.link_bytes_per_second / seconds, 1.0))

