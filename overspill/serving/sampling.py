"""Next-token choice for every row of a decode batch at once: greedy, temperature, top-k, top-p, logprobs.

All rows are handled by batched tensor ops on the logits' device, so a step costs one host sync
(the final `.tolist()` of the caller), not one per row. Each request keeps its own CPU generator,
so a seeded request draws the same tokens whatever batch it runs in: the generator gives one
uniform number per row and step, and the token is where it falls in the row's cumulative
distribution. A row whose parameters or logits are extreme still yields a token in range, so it
cannot fail the other rows of its batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

log = logging.getLogger(__name__)


class SamplingParams(Protocol):
    temperature: float  # below MIN_TEMPERATURE: greedy
    top_k: int  # <= 0 or >= the vocabulary: no cut
    top_p: float  # >= 1: no cut
    logprobs: int | None  # None: off; k: the chosen token's log-probability and the top k alternatives


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (before temperature), and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


# Below this a row is greedy. Logits are divided by the temperature in float32: 1e-300 rounds to 0 there
# and logits / 0 = inf, whose softmax is NaN (inf - inf). At 1e-5 logits up to ~1e33 stay finite, and the
# distribution is already the argmax unless two logits lie within ~1e-5 of each other.
MIN_TEMPERATURE = 1e-5


def new_generator(seed: int | None) -> torch.Generator:
    """A request's own CPU generator: seeded (any int of 64 bits, signed or not), else from the OS."""
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator]) -> list[int | Exception]:
    """Each row's token id, picked for all rows at once (one host sync); if that raises, each row is
    picked alone with the same random numbers, so only the rows that fail get their exception instead."""
    uniforms = draw_uniforms(params, generators)
    return _row_by_row(len(params), lambda rows: pick_tokens(
        _take(logits, rows), [params[i] for i in rows], [uniforms[i] for i in rows]).tolist())


def logprob_rows(logits: torch.Tensor, tokens: Sequence[int | Exception],
                 params: Sequence[SamplingParams]) -> list[TokenLogprob | None | Exception]:
    """`token_logprobs` row by row where the batched call raises; a row whose token is an exception
    (from `sample_rows`) makes the batched call raise, and gets an exception of its own."""
    return _row_by_row(len(params), lambda rows: token_logprobs(
        _take(logits, rows), [tokens[i] for i in rows], [params[i] for i in rows]))


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Token ids [rows] (on the logits' device) from last-position logits [rows, vocab] (float32)."""
    return pick_tokens(logits, params, draw_uniforms(params, generators))


def draw_uniforms(params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> list[float | None]:
    """One uniform number in [0, 1) per sampled row (None for a greedy row), from the row's own generator.

    Drawn apart from `pick_tokens`, so rows picked again one by one after a failed batched pick reuse
    their numbers: a seeded request draws the same tokens whether or not a bad row shared its batch."""
    return [torch.rand(1, generator=g).item() if _sampled(p) else None for p, g in zip(params, generators)]


def pick_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                uniforms: Sequence[float | None]) -> torch.Tensor:
    """Token ids [rows] from logits [rows, vocab] and each sampled row's number from `draw_uniforms`.

    Never out of range, whatever the row holds: top_k is capped at the vocabulary, and a row whose
    distribution is NaN (inf or NaN logits) picks within it rather than past its end."""
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if _sampled(p)]
    if not rows:
        return tokens
    device, vocab = logits.device, logits.shape[-1]
    index = torch.tensor(rows, device=device)
    temperature = torch.tensor([params[i].temperature for i in rows], device=device)
    top_k = torch.tensor([params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in rows], device=device)
    top_p = torch.tensor([min(params[i].top_p, 1.0) for i in rows], device=device)
    uniform = torch.tensor([uniforms[i] for i in rows], device=device)
    ordered, order = torch.sort(logits.index_select(0, index) / temperature[:, None], dim=-1, descending=True)
    rank = torch.arange(vocab, device=device)
    ordered = ordered.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    outside = probs.cumsum(-1) - probs > top_p[:, None]  # keep the smallest prefix whose mass reaches top_p
    cdf = torch.softmax(ordered.masked_fill(outside, float("-inf")), dim=-1).cumsum(-1)
    # scaled by the row's total, so rounding can never land past the last token with any mass;
    # a NaN cdf sorts past every number, hence the clamp
    pick = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:]).clamp_(max=vocab - 1)
    return tokens.index_copy(0, index, order.gather(1, pick).squeeze(1))


def _sampled(p: SamplingParams) -> bool:
    return p.temperature >= MIN_TEMPERATURE  # NaN: greedy


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
    k = min(max(params[i].logprobs for i in rows), logits.shape[-1])
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        want = params[i].logprobs
        out[i] = TokenLogprob(tokens[i], chosen[j], tuple(zip(top_ids[j][:want], top_values[j][:want])))
    return out


def _row_by_row(n: int, run: Callable[[list[int]], list]) -> list:
    """`run(rows)` over all `n` rows at once; if that raises, over each row alone, so only the rows
    that fail get their exception (in their result's place)."""
    try:
        return run(list(range(n)))
    except Exception:  # noqa: BLE001 - find the offending rows
        log.warning("a batched sampling call failed; retrying its %d rows one by one", n, exc_info=True)
    results: list = []
    for i in range(n):
        try:
            results += run([i])
        except Exception as exc:  # noqa: BLE001 - this row fails alone
            results.append(exc)
    return results


def _take(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return logits if len(rows) == logits.shape[0] else logits[rows]
