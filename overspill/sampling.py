"""Next-token choice for every row of a decode batch at once: greedy, temperature, top-k, top-p, logprobs.

All rows are handled by batched tensor ops on the logits' device, so a step costs one host sync
(the final `.tolist()` of the caller), not one per row. Each request keeps its own CPU generator,
so a seeded request draws the same tokens whatever batch it runs in: the generator gives one
uniform number per row and step, and the token is where it falls in the row's cumulative
distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


class SamplingParams(Protocol):
    temperature: float  # <= 0: greedy
    top_k: int  # <= 0: no cut
    top_p: float  # >= 1: no cut
    logprobs: int | None  # None: off; k: the chosen token's log-probability and the top k alternatives


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (before temperature), and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Token ids [rows] (on the logits' device) from last-position logits [rows, vocab] (float32)."""
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return tokens
    device = logits.device
    index = torch.tensor(rows, device=device)
    temperature = torch.tensor([params[i].temperature for i in rows], device=device)
    top_k = torch.tensor([params[i].top_k if params[i].top_k > 0 else logits.shape[-1] for i in rows], device=device)
    top_p = torch.tensor([min(params[i].top_p, 1.0) for i in rows], device=device)
    uniform = torch.cat([torch.rand(1, generator=generators[i]) for i in rows]).to(device)
    ordered, order = torch.sort(logits.index_select(0, index) / temperature[:, None], dim=-1, descending=True)
    rank = torch.arange(ordered.shape[-1], device=device)
    ordered = ordered.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    outside = probs.cumsum(-1) - probs > top_p[:, None]  # keep the smallest prefix whose mass reaches top_p
    cdf = torch.softmax(ordered.masked_fill(outside, float("-inf")), dim=-1).cumsum(-1)
    # scaled by the row's total, so rounding can never land past the last token with any mass
    pick = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:])
    return tokens.index_copy(0, index, order.gather(1, pick).squeeze(1))


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int],
                   params: Sequence[SamplingParams]) -> list[TokenLogprob | None]:
    """Per row, the chosen token's log-probability and top alternatives, for rows that asked (else None)."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(params)
    if not rows:
        return out
    index = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index), dim=-1)
    chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logits.device)).squeeze(1)
    k = max(params[i].logprobs for i in rows)
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        want = params[i].logprobs
        out[i] = TokenLogprob(tokens[i], chosen[j], tuple(zip(top_ids[j][:want], top_values[j][:want])))
    return out
