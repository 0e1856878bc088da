"""What speculative decoding buys on a streamed model: tokens per pass and the chain length to draft.

A streamed decode pass costs the weights' trip over the link whatever the number of tokens in it
(H200, 8B shape at 6 GiB: 192.8 ms for 1 token, 199.5 ms for 256). Verifying a chain of `k` drafted
tokens in one pass yields the accepted prefix plus one token of the target's own, so with a
per-token acceptance `a` (each drafted token accepted independently with probability `a`, given the
previous one was) the expected tokens per pass are

    E(k) = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)

and the speed is E(k) / (pass(k + 1) + draft(k)), where `pass(n)` is the cost of a target pass over
n tokens and `draft(k)` the cost of proposing k tokens. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


def expected_tokens(acceptance: float, chain: int) -> float:
    """Expected tokens a pass yields when verifying `chain` drafted tokens at per-token `acceptance`."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
    if chain < 0:
        raise ValueError(f"chain must be >= 0, got {chain}")
    if acceptance == 1.0:
        return float(chain + 1)
    return (1.0 - acceptance ** (chain + 1)) / (1.0 - acceptance)


@dataclass(frozen=True)
class PassCost:
    """A target pass over `n` tokens costs `base_s + per_token_s * n` seconds (a streamed pass is
    nearly flat in n: the link time dominates); drafting costs `draft_per_token_s` a token."""

    base_s: float
    per_token_s: float = 0.0
    draft_per_token_s: float = 0.0

    def step_seconds(self, chain: int) -> float:
        """One speculative step: draft `chain` tokens, then verify them (+ the last token) in one pass."""
        return self.base_s + self.per_token_s * (chain + 1) + self.draft_per_token_s * chain


@dataclass(frozen=True)
class SpeculationForecast:
    chain: int
    acceptance: float
    tokens_per_pass: float
    tok_s: float
    plain_tok_s: float

    @property
    def speedup(self) -> float:
        return self.tok_s / self.plain_tok_s


def forecast(cost: PassCost, acceptance: float, chain: int) -> SpeculationForecast:
    """Predicted decode speed with a chain of `chain` drafted tokens, against plain decoding."""
    tokens = expected_tokens(acceptance, chain)
    return SpeculationForecast(chain, acceptance, tokens, tokens / cost.step_seconds(chain),
                               1.0 / cost.step_seconds(0))


def best_chain(cost: PassCost, acceptance: float, max_chain: int = 16) -> int:
    """The chain length in [1, max_chain] with the highest predicted speed (ties: the shorter)."""
    best, best_rate = 1, -1.0
    for chain in range(1, max_chain + 1):
        rate = forecast(cost, acceptance, chain).tok_s
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = chain, rate
    return best


class AcceptanceTracker:
    """Per-token acceptance measured online (exponential average over verified draft tokens), the
    input `best_chain` adapts the draft length from. A drafted token counts as offered only when
    everything before it was accepted: that is what per-token acceptance means for a chain."""

    def __init__(self, prior: float = 0.5, weight: float = 0.1):
        self.rate = prior
        self.weight = weight
        self.offered = 0
        self.accepted = 0

    def update(self, drafted: int, accepted: int) -> None:
        """A pass verified `drafted` tokens and accepted the first `accepted` of them."""
        offered = min(drafted, accepted + 1)
        for i in range(offered):
            hit = 1.0 if i < accepted else 0.0
            self.rate += self.weight * (hit - self.rate)
        self.offered += offered
        self.accepted += accepted
