"""Next-token choice for every row of a decode batch at once: greedy, temperature, top-k, top-p, logprobs.

A sampled row draws as transformers' `generate` does: its logits in float32 through transformers' own
temperature, top-k and top-p warpers (`sampling_scores`), their softmax, and one draw as `torch.multinomial`
makes it, from the request's own generator on the logits' device. So a request with seed S draws the tokens
`generate` draws after `torch.manual_seed(S)` (and `overspill run --seed S`), whatever batch it runs in,
where the model's generation config adds no other processor (a repetition penalty, min_p, ...: `generate`
applies those, this sampler does not). The rows' picks stay on the device until the caller's one
`.tolist()`: a step costs one host sync. A row whose logits are extreme still yields a token in range (its
argmax; the draw never sees an invalid row), so it cannot fail the other rows of its batch.
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


def new_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own generator on the device its logits are on (`torch.manual_seed(S)` seeds each device's
    default generator to what this one starts at): seeded (any int of 64 bits, signed or not), else from the OS."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator]) -> list[int | Exception]:
    """Each row's token id, picked for all rows at once (one host sync); if that raises, each row is
    picked alone from its generator's state before the batched try, so only the rows that fail get their
    exception instead, and a seeded row draws what it would have drawn in a batch that did not fail."""
    states = [g.get_state() if _sampled(p) else None for p, g in zip(params, generators)]

    def pick(rows: list[int]) -> list[int]:
        for i in rows:
            if states[i] is not None:
                generators[i].set_state(states[i])
        return pick_tokens(_take(logits, rows), [params[i] for i in rows], [generators[i] for i in rows]).tolist()

    return _row_by_row(len(params), pick)


def logprob_rows(logits: torch.Tensor, tokens: Sequence[int | Exception],
                 params: Sequence[SamplingParams]) -> list[TokenLogprob | None | Exception]:
    """`token_logprobs` row by row where the batched call raises; a row whose token is an exception
    (from `sample_rows`) makes the batched call raise, and gets an exception of its own."""
    return _row_by_row(len(params), lambda rows: token_logprobs(
        _take(logits, rows), [tokens[i] for i in rows], [params[i] for i in rows]))


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Token ids [rows] (on the logits' device) from last-position logits [rows, vocab]."""
    return pick_tokens(logits, params, generators)


def sampling_scores(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits [rows, vocab] in float32 through transformers' warpers as `generate` applies them for these
    parameters (temperature unless 1, top-k unless <= 0, top-p below 1): their softmax is the distribution a
    sampled row draws from, -inf outside its cuts."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float()
    if params.temperature != 1.0:
        scores = TemperatureLogitsWarper(float(params.temperature))(None, scores)
    if 0 < params.top_k < scores.shape[-1]:  # a cut at the vocabulary or past it removes nothing
        scores = TopKLogitsWarper(int(params.top_k))(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(float(params.top_p))(None, scores)
    return scores


def pick_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Token ids [rows] from logits [rows, vocab], each sampled row drawn from its own generator as
    `torch.multinomial` draws one sample (torch's own single-draw path: argmax of p / q, q ~ Exp(1) filled
    from the generator), so a row draws what `generate` draws for a batch of one, with one kernel a row
    rather than a `multinomial` call's several.

    Never out of range, whatever the row holds: top_k is capped at the vocabulary, and a row whose
    distribution is not one (inf or NaN logits) takes its argmax, still drawing once."""
    tokens = logits.argmax(-1)
    groups: dict[tuple, list[int]] = {}  # rows that sample alike share one pass of the warpers (row by row alike)
    for i, p in enumerate(params):
        if _sampled(p):
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    if not groups:
        return tokens
    rows, picked = [], []
    for group in groups.values():
        index = torch.tensor(group, device=logits.device)
        probs = torch.softmax(sampling_scores(logits.index_select(0, index), params[group[0]]), dim=-1)
        valid = torch.isfinite(probs).all(-1, keepdim=True) & (probs.sum(-1, keepdim=True) > 0)
        probs = torch.where(valid, probs, 0.0)  # not a distribution: all its mass on its argmax (no host sync)
        probs.scatter_add_(-1, tokens.index_select(0, index)[:, None], (~valid).to(probs.dtype))
        noise = torch.empty_like(probs)
        for j, i in enumerate(group):
            noise[j].exponential_(generator=generators[i])
        picked.append(torch.div(probs, noise, out=noise).argmax(-1))
        rows += group
    return tokens.index_copy(0, torch.tensor(rows, device=logits.device), torch.cat(picked))


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
