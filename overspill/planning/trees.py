"""What a draft tree buys over a chain: expected tokens per verify pass, and the best tree for a budget.

A chain of k drafted tokens yields 1 + a + ... + a^k tokens a pass at per-token acceptance a. A tree
spends the same verify pass on several alternatives at each step: where the draft's first choice is
wrong, its second or third often is not. Describe the draft by `rank_acceptance[r]`, the probability
that the target's next token is the draft's (r+1)-th most likely one (given everything before it was
accepted); the ranks are mutually exclusive, so they sum to at most 1. A node reached by ranks
r1, r2, ..., rd from the root is accepted with probability prod(rank_acceptance[ri]), and a pass yields

    E(tree) = 1 + sum over nodes of P(node accepted)

(the target's own token after the accepted path is the 1). Because a child is never more likely
than its parent, taking nodes best-first by that probability gives the tree of `budget` nodes with
the largest E: that is how drafters grow trees, and what `best_tree` predicts. A chain is the tree
that only ever uses rank 0, so `best_tree([a], k)` is the chain's E(k). Pure Python: no torch.

The budget adapts as a chain's length does (`speculation.best_chain`): `tree_budget` picks the budget
with the most tokens a second, E / the pass's cost, from the rank acceptance `RankAcceptance` measures.
`overspill plan --speculate-tree` forecasts the same choice (`plan_tree`) from an assumed rank acceptance.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from itertools import accumulate
from typing import Iterable, Sequence

from .speculation import AcceptanceTracker, PassCost, SpeculationForecast, forecast

MIN_TREE = 2  # the smallest budget with room for an alternative: a 1-token tree is a 1-token chain
# `plan --speculate-tree` without --rank-acceptance: each choice after the draft's first catches this share of
# what the choices before it missed, over ASSUMED_RANKS choices. Not measured: a modest guess (later choices
# are right less often than the first), labelled an assumption wherever it is printed.
ASSUMED_SIBLING_SHARE = 0.25
ASSUMED_RANKS = 3


def check_tree(budget: int | None, source: str | None, per_request: bool = False) -> None:
    """A tree budget the surfaces accept: None (chains), or at least `MIN_TREE` with a draft source.
    `per_request`: requests may name a source of their own (serve, batch), so none is needed here.

    Raises:
        ValueError: saying what to pass instead."""
    if budget is None:
        return
    if budget < MIN_TREE:
        raise ValueError(f"a draft tree needs a budget of at least {MIN_TREE} tokens, got {budget}: pass "
                         f"{MIN_TREE} or more, or leave it out to draft chains")
    if source is None and not per_request:
        raise ValueError("a draft tree grows from a draft source: turn speculation on as well (e.g. speculate ngram)")


def _check_parents(parents: list[int]) -> None:
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"node {i} has parent {parent}: parents must come earlier (-1: the root)")


def depths(parents: list[int]) -> list[int]:
    """Depth of each node (a child of the root has depth 1), parents listed before children."""
    _check_parents(parents)
    out: list[int] = []
    for parent in parents:
        out.append(1 if parent < 0 else out[parent] + 1)
    return out


def expected_tokens(parents: list[int], accept: list[float]) -> float:
    """Expected tokens one verify pass yields for a tree.

    Args:
        parents: parent index of each node, -1 for a child of the root; parents come first.
        accept: probability that each node is the target's token, given its parent was accepted.

    Returns:
        1 + the sum over nodes of the probability that the whole path to it is accepted.
    """
    if len(parents) != len(accept):
        raise ValueError(f"{len(parents)} parents but {len(accept)} acceptance values")
    _check_parents(parents)
    reach: list[float] = []
    for parent, p in zip(parents, accept):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {p}")
        reach.append(p * (1.0 if parent < 0 else reach[parent]))
    return 1.0 + sum(reach)


@dataclass(frozen=True)
class TreeForecast:
    """The best tree for a budget under `rank_acceptance`: its shape and expected tokens a pass."""

    parents: tuple[int, ...]
    ranks: tuple[int, ...]  # which of its parent's children (0: the draft's first choice) each node is
    tokens_per_pass: float
    reach: tuple[float, ...]  # P(the path to each node is accepted): non-increasing, summing to E - 1

    @property
    def depth(self) -> int:
        return max(depths(list(self.parents)), default=0)


def best_tree(rank_acceptance: list[float], budget: int) -> TreeForecast:
    """The `budget`-node tree with the most expected tokens a pass, grown best-first.

    Args:
        rank_acceptance: P(the target's token is the draft's (r+1)-th choice), r = 0, 1, ...; the
            tree gives each node at most this many children.
        budget: nodes in the tree (tokens the verify pass carries besides the last emitted one).
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    check_rank_acceptance(rank_acceptance)
    parents: list[int] = []
    ranks: list[int] = []
    reach: list[float] = []
    # candidates: (-reach probability, tie-breaker, parent, rank); a node's children join once it is taken
    heap = [(-a, r, -1, r) for r, a in enumerate(rank_acceptance) if a > 0]
    heapq.heapify(heap)
    counter = len(heap)
    while heap and len(parents) < budget:
        neg, _, parent, rank = heapq.heappop(heap)
        node = len(parents)
        parents.append(parent)
        ranks.append(rank)
        reach.append(-neg)
        for r, a in enumerate(rank_acceptance):
            if a > 0:
                heapq.heappush(heap, (neg * a, counter, node, r))
                counter += 1
    return TreeForecast(tuple(parents), tuple(ranks), sum(reach, 1.0), tuple(reach))


def check_rank_acceptance(rank_acceptance: Sequence[float]) -> None:
    """Rank acceptances are probabilities of exclusive events (the target's token is at most one of the
    draft's choices), so each lies in [0, 1] and they sum to at most 1.

    Raises:
        ValueError: in one line, with the values given and an example to pass instead."""
    if any(not 0.0 <= a <= 1.0 for a in rank_acceptance) or sum(rank_acceptance) > 1.0 + 1e-9:
        given = ",".join(f"{a:g}" for a in rank_acceptance)
        raise ValueError(f"rank acceptances must be probabilities summing to at most 1 (the target's token is at "
                         f"most one of the draft's choices), got {given} (sum {sum(rank_acceptance):g}): pass e.g. "
                         "0.7,0.08,0.05")


def assumed_rank_acceptance(acceptance: float, ranks: int = ASSUMED_RANKS,
                            share: float = ASSUMED_SIBLING_SHARE) -> list[float]:
    """The rank acceptance `plan --speculate-tree` assumes from a chain's per-token `acceptance`: the draft's
    first choice is right with `acceptance`, and each of the next `ranks - 1` catches `share` of what the
    choices before it missed (0.7 -> 0.7, 0.075, 0.05625). A chain is the same draft's first choices, so
    tree and chain forecasts compare at one acceptance."""
    out, missed = [acceptance], 1.0 - acceptance
    for _ in range(ranks - 1):
        out.append(missed * share)
        missed -= out[-1]
    return out


def best_budget(cost: PassCost, rank_acceptance: Sequence[float], cap: int) -> int:
    """The budget in [MIN_TREE, cap] whose best tree under `rank_acceptance` yields the most tokens a second
    (ties: the smaller).

    A speculative step over b nodes costs `cost.step_seconds(b)` (draft b, verify b + 1) and yields
    E(best_tree(rank_acceptance, b)) tokens. The best trees grow best-first, so the best tree of b
    nodes is the first b nodes of the best tree of `cap`: one tree gives E for every b. Where the
    draft is rarely right, extra nodes add little E but their full cost, so the budget falls to
    `MIN_TREE` (which still measures acceptance); where it is often right it climbs to `cap`.
    """
    floor = min(MIN_TREE, cap)
    reach = best_tree(list(rank_acceptance), cap).reach
    expected = list(accumulate(reach, initial=1.0))  # expected[b]: E of the first b nodes
    best, best_rate = floor, -1.0
    for b in range(floor, cap + 1):
        rate = expected[min(b, len(reach))] / cost.step_seconds(b)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = b, rate
    return best


def tree_budget(cost: PassCost, ranks: RankAcceptance, cap: int) -> int:
    """`best_budget` at the rank acceptance `ranks` measured; `cap` itself while it has measured nothing
    (the first pass drafts what the user asked for)."""
    return best_budget(cost, ranks.rates, cap) if ranks.visits else cap


@dataclass(frozen=True)
class PlanTree:
    """`overspill plan --speculate-tree`: the budget the runtime would draft (`best_budget`) at the plan's
    pass cost and an assumed rank acceptance, beside the chain of as many tokens: the same verify pass,
    spent on the draft's first choices only. A tree's forecasts count its nodes where a chain's count
    its length (`SpeculationForecast.chain`)."""

    cap: int
    rank_acceptance: tuple[float, ...]
    derived: bool  # split from the chain's acceptance (`assumed_rank_acceptance`), not given
    depth: int  # of the best tree of the chosen budget
    best: SpeculationForecast  # the best tree of the chosen budget
    at_cap: SpeculationForecast  # the best tree of `cap` nodes
    chain: SpeculationForecast  # as many first choices as the chosen budget

    @property
    def budget(self) -> int:
        return self.best.chain

    def to_dict(self) -> dict:
        return {
            "cap": self.cap, "rank_acceptance": list(self.rank_acceptance), "rank_acceptance_assumed": True,
            "rank_acceptance_derived": self.derived, "budget": self.budget, "depth": self.depth,
            "tokens_per_pass": self.best.tokens_per_pass, "tok_s": self.best.tok_s, "speedup": self.best.speedup,
            "cap_tokens_per_pass": self.at_cap.tokens_per_pass, "cap_tok_s": self.at_cap.tok_s,
            "chain": {"chain": self.chain.chain, "tokens_per_pass": self.chain.tokens_per_pass,
                      "tok_s": self.chain.tok_s, "speedup": self.chain.speedup},
        }


def tree_forecast(cost: PassCost, rank_acceptance: Sequence[float], budget: int) -> SpeculationForecast:
    """Predicted decode speed drafting the best tree of `budget` nodes, as `speculation.forecast` gives a chain's."""
    tokens = best_tree(list(rank_acceptance), budget).tokens_per_pass
    return SpeculationForecast(budget, rank_acceptance[0], tokens, tokens / cost.step_seconds(budget),
                               1.0 / cost.step_seconds(0))


def plan_tree(cost: PassCost, cap: int, rank_acceptance: Sequence[float], derived: bool) -> PlanTree:
    """The tree forecast of `plan --speculate-tree cap` at `rank_acceptance` (first choice first).

    Raises:
        ValueError: a cap below `MIN_TREE`, or rank acceptances that are not exclusive probabilities.
    """
    check_tree(cap, None, per_request=True)  # the caller checked the source
    if not rank_acceptance:
        raise ValueError("a tree forecast needs at least the draft's first choice's acceptance")
    check_rank_acceptance(rank_acceptance)
    budget = best_budget(cost, rank_acceptance, cap)
    return PlanTree(cap, tuple(rank_acceptance), derived, best_tree(list(rank_acceptance), budget).depth,
                    tree_forecast(cost, rank_acceptance, budget), tree_forecast(cost, rank_acceptance, cap),
                    forecast(cost, rank_acceptance[0], budget))


@dataclass(frozen=True)
class Choice:
    """What a tree walk saw at a node it stood on: how many drafted children the node `offered`, and the
    `rank` of the one holding the target's token (None: none did)."""

    offered: int
    rank: int | None


class RankAcceptance:
    """Online estimate of `best_tree`'s `rank_acceptance` from tree walks.

    `rates[r]` means what `best_tree` multiplies a node's reach by: the probability that, at a node the
    walk reached, the target's token is the draft's (r+1)-th choice there (ranks exclusive, summing to
    at most 1). A walk sees rank r only where the node offered it (more than r drafted children) and the
    target took none of ranks < r, so each rank's hazard

        h[r] = P(the target takes rank r | it took none of ranks < r)

    is counted there only, as `AcceptanceTracker` counts a chain's token offered only when everything
    before it was accepted (a node with one child says nothing about rank 1), and

        rates[r] = h[r] * prod over j < r of (1 - h[j]).

    Each h[r] is an `AcceptanceTracker`: its prior and exponential average, so a rank's first walks
    move it from 0.5 rather than set it to what they saw, and old walks fade. A rank the draft has never
    offered has no rate (0): `best_tree` would otherwise plan siblings that a drafter of chains never
    drafts. One offered once keeps its estimate while the budget leaves no room for it.
    """

    def __init__(self, ranks: int = 4):
        self.hazards = [AcceptanceTracker() for _ in range(ranks)]

    def update(self, choices: Iterable[Choice]) -> None:
        """One `Choice` per node the walk stood on that had drafted children."""
        for choice in choices:
            for rank, hazard in enumerate(self.hazards[: choice.offered]):
                taken = choice.rank == rank
                hazard.update(1, int(taken))
                if taken:
                    break

    @property
    def visits(self) -> int:
        """Nodes with drafted children measured so far."""
        return self.hazards[0].offered if self.hazards else 0

    @property
    def rates(self) -> list[float]:
        out, missed = [], 1.0
        for hazard in self.hazards:
            rate = hazard.rate if hazard.offered else 0.0
            out.append(missed * rate)
            missed *= 1.0 - rate
        return out
