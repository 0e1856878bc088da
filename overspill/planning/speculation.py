"""What speculative decoding buys on a streamed model: tokens per pass and the chain length to draft.

A streamed decode pass costs the weights' trip over the link whatever the number of tokens in it
(H200, 8B shape at 6 GiB: 192.8 ms for 1 token, 199.5 ms for 256). Verifying a chain of `k` drafted
tokens in one pass yields the accepted prefix plus one token of the target's own, so with a
per-token acceptance `a` (each drafted token accepted independently with probability `a`, given the
previous one was) the expected tokens per pass are

    E(k) = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)

and the speed is E(k) / (pass(k + 1) + draft(k)), where `pass(n)` is the cost of a target pass over
n tokens and `draft(k)` the cost of proposing k tokens.

The pass cost is `base + per_token * n`, and what a token adds depends on how the pass verifies:

- batched (all n tokens through each layer as one [n, hidden] matrix): an extra token costs its
  matmul FLOPs, 2 * active_params / matmul_rate (8B on the H200: ~0.03 ms against a 193 ms pass);
- serial (`runtime.token_serial`: each layer runs once per token, plain decoding's arithmetic, so
  greedy tokens stay bit-identical): an extra token costs the GPU compute of the resident layers after the
  last streamed one, and the head's (`Prediction.gpu_s - Prediction.overlapped_gpu_s`). A layer computed
  while copies are still under way (a streamed one, or a resident one between streamed ones) runs its n
  tokens while the link copies the layers behind it, so the link hides them as long as that compute stays
  under the copies; the resident tail has no copy to overlap with. Measured with CUDA graphs on an H100
  (bench/results/speculative-llama-3-70b-76GiB-20261207-114913.json), 70B at 76 GiB with the first 37 of 80
  layers streamed: pass(1, 9, 17) = 1145, 1338, 1588 ms, ~24-31 ms a token against a whole step's 46.6 ms of
  GPU time and the resident 43 layers' ~25 (hence `layout="spread"` for speculation: its tail is 1-2 layers).
  However well hidden, a serial pass cannot beat n steps of the GPU's whole compute. The host dispatches
  every layer's kernels once per token, asynchronously: it stays ahead of the GPU until n x its per-step
  dispatch (`Prediction.host_s`) exceeds the pass, and from there the host bounds the pass (not when
  graphed: a graphed pass is one replay).

So, for a plain decode step of `step` seconds (one token),

    pass(n) = max(step + (n - 1) * per_token, n * dispatch_per_token, n * gpu)

with dispatch_per_token = 0 for a batched pass (one dispatch whatever n) and the last term for serial
passes only. 8B shape at 6 GiB on the H200, eager (step 193.7 ms, host 19.9 ms predicted): the dispatch
term gives 222 ms at chain 8, as measured, where the forecast without a per-token term had said 194.
Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from .costmodel import Prediction
from .plan import Plan
from .spec import ModelSpec
from .units import format_bytes

if TYPE_CHECKING:  # trees builds on this module
    from .trees import PlanTree

SOURCES = "'ngram' or 'draft:PATH'"
ASSUMED_ACCEPTANCE = 0.7  # per-token acceptance `plan --speculate` assumes unless told (ngram on quoting text)


def check_source(source: str, named: tuple[str, ...] = ("ngram",)) -> None:
    """Refuse an unknown draft source in one line, before anything is loaded (torch-free, for the CLI):
    one of `named` or `draft:PATH` (`load` also takes "auto" and "self", which `plan` and the server do not).

    Raises:
        ValueError: naming the source and the ones accepted.
    """
    if source not in named and not (source.startswith("draft:") and len(source) > len("draft:")):
        names = [repr(n) for n in named]
        raise ValueError(f"unknown speculate source {source!r}; use {', '.join(names)} or 'draft:PATH'")


def draft_path(source: str | None) -> str | None:
    """The model path of a `draft:PATH` source; None for any other source, or none."""
    return source[len("draft:"):] if source is not None and source.startswith("draft:") else None


def draft_model_bytes(spec: ModelSpec, context: int) -> int:
    """Device bytes a `draft:PATH` model keeps resident beside the target: its weights and the KV of one
    sequence of `context` tokens (it drafts for batch-1 calls). They come out of the target's budget."""
    return spec.total_bytes + spec.kv_bytes(context)


def with_draft_model(budget: int | None, path: str, draft_bytes: int) -> tuple[int | None, str | None]:
    """The budget left to the target beside a resident draft model of `draft_bytes`, and the plan's note.

    Raises:
        ValueError: the draft alone takes the whole budget.
    """
    if budget is None:
        return None, None
    if draft_bytes >= budget:
        raise ValueError(f"the draft model {path!r} needs {format_bytes(draft_bytes)} on the device, more than the "
                         f"{format_bytes(budget)} budget; use a smaller draft, 'ngram', or a bigger --gpu-memory")
    return budget - draft_bytes, (f"draft model {path}: {format_bytes(draft_bytes)} resident (weights and one "
                                  f"sequence's KV), out of the {format_bytes(budget)} budget")


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
    """A target pass over `n` tokens costs `max(base_s + per_token_s * n, dispatch_per_token_s * n,
    compute_per_token_s * n)` seconds (a streamed pass is nearly flat in n: the link time dominates; a
    serial one is bounded by the host dispatching every token's kernels, and by the GPU computing every
    layer once a token); drafting costs `draft_per_token_s` a token."""

    base_s: float
    per_token_s: float = 0.0
    draft_per_token_s: float = 0.0
    dispatch_per_token_s: float = 0.0
    compute_per_token_s: float = 0.0

    def pass_seconds(self, tokens: float) -> float:
        """One target pass over `tokens` tokens."""
        return max(self.base_s + self.per_token_s * tokens, self.dispatch_per_token_s * tokens,
                   self.compute_per_token_s * tokens)

    def step_seconds(self, chain: int) -> float:
        """One speculative step: draft `chain` tokens, then verify them (+ the last token) in one pass."""
        return self.pass_seconds(chain + 1) + self.draft_per_token_s * chain


def verify_pass_cost(decode_step_s: float, gpu_token_s: float, host_token_s: float, marginal_token_s: float,
                     serial: bool, draft_per_token_s: float = 0.0, graphed: bool = False,
                     hidden_token_s: float = 0.0, expand_s: float = 0.0) -> PassCost:
    """The pass cost of verifying drafts on a placed model, from its predicted plain decode step.

    Args:
        decode_step_s: one plain decode step (a pass over one token), as the cost model predicts it.
        gpu_token_s: the GPU compute of one decode step (every layer and the head, one token).
        host_token_s: the host's dispatch of one decode step.
        marginal_token_s: what one more token adds to a batched pass (its matmul FLOPs).
        serial: verification runs each layer once per token (see the module docstring).
        draft_per_token_s: proposing one token.
        graphed: the pass replays as a CUDA graph (one launch), so the host dispatches no token's kernels.
        hidden_token_s: the part of `gpu_token_s` the link's copies hide in a serial pass (every layer's up to
            the last streamed one: `Prediction.overlapped_gpu_s`).
        expand_s: the part of `gpu_token_s` spent expanding encoded streamed layers, once a pass whatever its
            tokens (`Prediction.expand_s`): out of the per-token floor.
    """
    per_token = max(gpu_token_s - hidden_token_s, 0.0) if serial else marginal_token_s
    return PassCost(max(decode_step_s - per_token, 0.0), per_token, draft_per_token_s,
                    host_token_s if serial and not graphed else 0.0,
                    max(gpu_token_s - expand_s, 0.0) if serial else 0.0)


def plan_pass_cost(prediction: Prediction, active_params: float, matmul_flops_s: float, serial: bool,
                   draft_per_token_s: float = 0.0, graphed: bool = False) -> PassCost:
    """`verify_pass_cost` from a batch-1 `costmodel.Prediction` and the model's active parameters per token."""
    marginal = 2.0 * active_params / matmul_flops_s if matmul_flops_s > 0 else 0.0
    return verify_pass_cost(prediction.decode_step_s, prediction.gpu_s, prediction.host_s, marginal, serial,
                            draft_per_token_s, graphed, prediction.overlapped_gpu_s, prediction.expand_s)


def fit_pass_cost(points: Iterable[tuple[float, float]], prior: PassCost | None = None) -> PassCost:
    """`base + per_token * n` by least squares over measured (tokens, seconds) passes; the slope is
    floored at 0 (a link-bound pass is flat, and noise can tilt it). With one distinct token count
    the slope cannot be measured: `prior`'s shape is scaled to the measured mean instead."""
    points = list(points)
    prior = prior or PassCost(1.0)
    if not points:
        return prior
    mean_n = sum(n for n, _ in points) / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    var = sum((n - mean_n) ** 2 for n, _ in points)
    if var == 0:
        predicted = prior.pass_seconds(mean_n)
        scale = mean_t / predicted if predicted > 0 else 1.0
        return PassCost(prior.base_s * scale, prior.per_token_s * scale, prior.draft_per_token_s,
                        prior.dispatch_per_token_s * scale, prior.compute_per_token_s * scale)
    slope = max(0.0, sum((n - mean_n) * (t - mean_t) for n, t in points) / var)
    return PassCost(max(mean_t - slope * mean_n, 0.0), slope, prior.draft_per_token_s)


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


class PassCostFit:
    """The pass cost measured online: verify passes and drafting seen so far, fitted as `fit_pass_cost`
    does, starting from `prior` (e.g. `plan_pass_cost`); keeps the last `window` passes."""

    def __init__(self, prior: PassCost | None = None, window: int = 256):
        self.prior = prior or PassCost(1.0)
        self.window = window
        self.passes: list[tuple[int, float]] = []
        self.draft_tokens = 0
        self.draft_seconds = 0.0

    def add(self, tokens: int, seconds: float, drafted: int = 0, draft_seconds: float = 0.0) -> None:
        """A pass over `tokens` tokens took `seconds`; proposing its `drafted` tokens took `draft_seconds`."""
        self.passes.append((tokens, seconds))
        del self.passes[: -self.window]
        self.draft_tokens += drafted
        self.draft_seconds += draft_seconds

    def cost(self) -> PassCost:
        fitted = fit_pass_cost(self.passes, self.prior)
        draft = self.draft_seconds / self.draft_tokens if self.draft_tokens else self.prior.draft_per_token_s
        return PassCost(fitted.base_s, fitted.per_token_s, draft, fitted.dispatch_per_token_s,
                        fitted.compute_per_token_s)


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


@dataclass(frozen=True)
class PlanSpeculation:
    """`overspill plan --speculate`: predicted speed against chain length at an assumed acceptance, and with
    `--speculate-tree` the tree's (`trees.plan_tree`)."""

    source: str
    acceptance: float
    serial: bool
    cost: PassCost
    forecasts: tuple[SpeculationForecast, ...]  # chains 0 (plain decoding) .. max_chain
    best: SpeculationForecast
    tree: PlanTree | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = {
            "source": self.source, "acceptance": self.acceptance, "acceptance_assumed": True,
            "verify": "serial" if self.serial else "batched",
            "pass_cost": {"base_s": self.cost.base_s, "per_token_s": self.cost.per_token_s,
                          "dispatch_per_token_s": self.cost.dispatch_per_token_s,
                          "draft_per_token_s": self.cost.draft_per_token_s,
                          "compute_per_token_s": self.cost.compute_per_token_s},
            "chains": [{"chain": f.chain, "tokens_per_pass": f.tokens_per_pass, "tok_s": f.tok_s,
                        "speedup": f.speedup} for f in self.forecasts],
            "best_chain": self.best.chain, "best_tok_s": self.best.tok_s,
        }
        if self.tree is not None:
            out["tree"] = self.tree.to_dict()
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def plan_speculation(prediction: Prediction, active_params: float, matmul_flops_s: float, source: str,
                     acceptance: float, serial: bool, max_chain: int = 16,
                     draft_per_token_s: float = 0.0, graphed: bool = False) -> PlanSpeculation:
    """Forecast every chain length up to `max_chain` from a batch-1 plan's predicted pass cost.

    Raises:
        ValueError: an unknown source, an acceptance outside [0, 1] or a max_chain below 1.
    """
    if source != "self":  # the self draft is the model's own layers (`planning.self_draft`)
        check_source(source)
    if max_chain < 1:
        raise ValueError(f"max chain must be at least 1, got {max_chain}")
    expected_tokens(acceptance, 0)  # checks the range
    cost = plan_pass_cost(prediction, active_params, matmul_flops_s, serial, draft_per_token_s, graphed)
    forecasts = tuple(forecast(cost, acceptance, k) for k in range(max_chain + 1))
    best = forecasts[best_chain(cost, acceptance, max_chain)]
    return PlanSpeculation(source, acceptance, serial, cost, forecasts, best)


def prefix_instead(plan: Plan, spread: bool, layout: str, speculate: str | None) -> bool:
    """Whether a plan whose streamed layers were spread for `speculate="auto"` (layout "auto") should be placed
    again with them first: auto drafts nothing on it (`auto_source`), so spreading buys no verify pass. `load`
    and `overspill plan` both ask it."""
    return spread and layout == "auto" and speculate == "auto" and bool(plan.streamed_layers) \
        and auto_source(plan) is None


def auto_source(plan: Plan) -> str | None:
    """What `speculate="auto"` drafts with: prompt lookup (`ngram`) where a decode pass crosses the link
    (streamed layers or host-tier KV), nothing on a resident plan.

    `ngram` costs no GPU memory and no assumed acceptance: where the text does not repeat it proposes
    nothing and the pass is a plain step, and the chain adapts to the acceptance measured per call.
    `self` takes budget from the bf16 layers and its acceptance on a model is unknown until measured,
    so it is chosen only when asked. A resident pass is compute-bound, where a verify pass of k
    tokens costs k steps (serial verification). With CUDA graphs a verify pass is graphed too
    (`graphs.GraphedDecode.verify`). Expert-streamed MoE layers do not verify drafts yet, and they
    already cut the bytes a step moves.
    """
    if plan.moe_streaming == "experts":
        return None
    return "ngram" if plan.streamed_layers or plan.kv_host_layers else None


GRAPHED_PASSES = (2, 3, 5, 9, 17, 33, 65)  # tokens a graphed verify pass holds: few graphs to capture


def graphed_pass(tokens: int, room: int | None = None) -> int:
    """Tokens of the graphed verify pass (`runtime.graphs.GraphedDecode.verify`) for `tokens`: the smallest of
    `GRAPHED_PASSES` that holds them (larger chains: their own size), or the largest that fits in `room`
    tokens of planned KV (at least 1). Each size is a graph to capture per ring phase, so few sizes."""
    size = next((n for n in GRAPHED_PASSES if n >= tokens), tokens)
    if room is not None and size > room:
        size = max((n for n in GRAPHED_PASSES if n <= room), default=1)
    return size
