"""Routing statistics of expert-streamed MoE layers, and what a frequency-aware cache misses under them. Pure Python.

`planning.moe` predicts expert bytes per step under a uniform prior (each token picks a given expert with
probability k/E). Real routers are uneven, and `runtime.experts.ExpertCache` keeps the experts routed to
most, so with measured routing the same cache hits more. Here, per streamed MoE layer l and expert e:

    q(l, e) = (routed(l, e) + PRIOR_TOKENS * k/E) / (tokens(l) + PRIOR_TOKENS)   clamped to [0, 1]

the chance one token selects e (shrunk toward k/E while few tokens are seen; sum over e stays k), and

    P(l, e | b) = 1 - (1 - q(l, e)) ** b

that a batch of b tokens selects it. The cache's slots beyond one layer's working set hold the (l, e) of
largest q over all streamed layers (what its eviction by routed counts converges to; among equal q the
slots left are shared evenly, since which of them the cache keeps is arbitrary), so per step a layer
selects sum_e P distinct experts and misses sum over uncached (l, e) of P. Under the uniform prior every q
is k/E, every (l, e) is cached with the same fraction, and this is `moe.expert_bytes_per_step` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .moe import MoeLayers
    from .plan import Footprint
    from .profile import Profile

# Pseudo-tokens of the uniform prior mixed into measured counts: a choice, not a measurement. At 128 a
# layer's own routing weighs as much as the prior once it has seen 128 tokens (about one prompt's prefill).
PRIOR_TOKENS = 128.0


@dataclass(frozen=True)
class RoutingStats:
    """Tokens each streamed MoE layer's router saw and, per expert, the tokens it routed there (counts
    may be fractional: the uniform prior's are k/E per token). `layers` are decoder-layer indices."""

    layers: tuple[int, ...]
    tokens: tuple[float, ...]
    routed: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        if not len(self.layers) == len(self.tokens) == len(self.routed):
            raise ValueError("RoutingStats needs one token count and one routed row per layer")

    @classmethod
    def uniform(cls, moe: "MoeLayers", streamed: tuple[int, ...]) -> "RoutingStats":
        """The uniform prior over `streamed` (MoE layers only): one token routed k/E to each expert."""
        layers = tuple(i for i in streamed if moe.num_experts[i])
        return cls(layers, tuple(1.0 for _ in layers),
                   tuple((min(moe.active[i], moe.num_experts[i]) / moe.num_experts[i],) * moe.num_experts[i]
                         for i in layers))

    def row(self, layer: int) -> tuple[float, tuple[float, ...]] | None:
        """(tokens, routed per expert) of `layer`, None where it was never counted."""
        try:
            at = self.layers.index(layer)
        except ValueError:
            return None
        return self.tokens[at], self.routed[at]

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "tokens": list(self.tokens), "routed": [list(r) for r in self.routed]}


@dataclass(frozen=True)
class MoeBasis:
    """What `moe.predict` needs beside a plan, kept by `load` for an expert-streamed model so its plan can
    be re-predicted from measured routing (`runtime.routing`); `profile` None where nothing was probed."""

    fp: "Footprint"
    moe: "MoeLayers"
    profile: "Profile | None"
    cpu_experts: str = "off"


def selection_probs(moe: "MoeLayers", layer: int, stats: RoutingStats | None,
                    prior_tokens: float = PRIOR_TOKENS) -> tuple[float, ...]:
    """q per expert of `layer`: one token's chance to select it, its measured share blended with k/E
    (module docstring); k/E for every expert where `stats` has no row for the layer."""
    experts = moe.num_experts[layer]
    prior = min(moe.active[layer], experts) / experts if experts else 0.0
    row = stats.row(layer) if stats is not None else None
    if row is None:
        return (prior,) * experts
    tokens, routed = row
    if len(routed) != experts:
        raise ValueError(f"layer {layer}: routing stats count {len(routed)} experts, the model has {experts}")
    total = tokens + prior_tokens
    if total <= 0:
        return (prior,) * experts
    return tuple(min(1.0, max(0.0, (n + prior_tokens * prior) / total)) for n in routed)


def _selected(q: float, batch: int) -> float:
    """P(at least one of `batch` tokens selects an expert each token picks with probability q)."""
    return 1.0 - (1.0 - q) ** batch if batch > 0 else 0.0


def cached_shares(probs: dict[int, tuple[float, ...]], extra_slots: int) -> dict[tuple[int, int], float]:
    """Per (layer, expert), the fraction of the time it holds one of the cache's `extra_slots` hot slots: the
    largest q first; a group of equal q that does not fit whole shares what is left evenly."""
    ranked = sorted(((q, layer, e) for layer, qs in probs.items() for e, q in enumerate(qs)), key=lambda t: -t[0])
    shares: dict[tuple[int, int], float] = {}
    left, at = float(max(extra_slots, 0)), 0
    while at < len(ranked) and left > 0:
        end = at + 1
        while end < len(ranked) and math.isclose(ranked[end][0], ranked[at][0], rel_tol=1e-9, abs_tol=1e-15):
            end += 1
        share = min(1.0, left / (end - at))
        for _, layer, e in ranked[at:end]:
            shares[layer, e] = share
        left -= share * (end - at)
        at = end
    return shares


@dataclass(frozen=True)
class LayerTraffic:
    """Expected experts one streamed MoE layer selects per step and how many of them miss the cache."""

    layer: int
    distinct: float
    misses: float


def traffic(moe: "MoeLayers", streamed: tuple[int, ...], extra_slots: int, batch: int,
            stats: RoutingStats | None, prior_tokens: float = PRIOR_TOKENS) -> list[LayerTraffic]:
    """Per streamed MoE layer, expected distinct experts a batch of `batch` tokens selects and expected
    misses, with `extra_slots` hot slots beyond one layer's working set (module docstring)."""
    layers = [i for i in streamed if moe.num_experts[i]]
    probs = {i: selection_probs(moe, i, stats, prior_tokens) for i in layers}
    shares = cached_shares(probs, extra_slots)
    out = []
    for i in layers:
        picked = [_selected(q, batch) for q in probs[i]]
        out.append(LayerTraffic(i, sum(picked), sum(p * (1.0 - shares.get((i, e), 0.0)) for e, p in enumerate(picked))))
    return out
