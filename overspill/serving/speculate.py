"""Speculative decoding in the engine, for a request that runs alone.

With one sequence in the batch a streamed pass carries one token while the link time would carry
many, so the engine drafts a chain (`runtime.drafts`) and verifies it in one pass over the batch's
cache; once two or more sequences share the pass, batching fills it already and the engine decodes
plainly. The acceptance rule is `runtime.speculative`'s (`_accept`, `_residual`): greedy keeps a
drafted token only where it is the target's argmax, so the output is the plain server's token for
token; sampling accepts with min(1, p/q) under the request's own temperature, top-k and top-p, so the
output distribution is plain sampling's, and a seeded request draws the same tokens run after run. A
deterministic draft (ngram) keeps a token where the target's own pick is that token (probability p, as the
rule gives), so greedy and seeded sampled requests alike get the plain server's tokens.
Verification is serial (each layer once per token: plain decoding's arithmetic), so it is offered for
models whose layers all attend fully (`token_serial.supports_serial`).

The chain length adapts per request (`best_chain` over the acceptance measured for it and the pass
cost measured on this engine, starting from the plan's prediction).

With a tree budget the engine drafts trees (`runtime.trees`) instead: one serial pass verifies every
branch, and the walk down the tree picks each token exactly as a plain step would (`_pick`: the
argmax, or a sample from the request's own generator) and follows the drafted child holding it
(`runtime.trees.walk_tree`), so greedy and seeded sampled requests alike get the plain server's tokens.
The budget adapts per request between `MIN_TREE` and the engine's (`planning.trees.tree_budget` over
the ranks measured); the response's `usage.speculation` says which budgets its passes drafted, and
`/metrics` all passes' (`overspill_speculative_tree_budget`, from `Speculator.tree_budget_passes`).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch

from ..planning.speculation import AcceptanceTracker, PassCostFit, best_chain, draft_path
from ..planning.trees import RankAcceptance, tree_budget
from ..runtime.drafts import Drafter, make_drafter, propose_tree
from ..runtime.speculative import _accept, _residual, prior_pass_cost
from ..runtime.token_serial import supports_serial
from ..runtime.trees import fit_pass, walk_tree
from .requests import SPECULATE_OFF, GenerationRequest, InvalidRequest, SpeculationUsage, check_speculate
from .runner import Runner
from .sampling import MIN_TEMPERATURE, SamplingParams, sampling_scores


@dataclass
class _Progress:
    """One request's speculation so far."""

    tracker: AcceptanceTracker = field(default_factory=AcceptanceTracker)
    ranks: RankAcceptance = field(default_factory=RankAcceptance)  # trees: which sibling the target chose
    usage: SpeculationUsage = field(default_factory=SpeculationUsage)


@dataclass(frozen=True)
class Verified:
    """A speculative step's outcome: the tokens it yields (accepted drafts, then one of the target's
    own), the logits row each came from, and what it drafted."""

    tokens: list[int]
    logits: torch.Tensor  # float32 [len(tokens), vocab]
    drafted: int
    draft_seconds: float
    verify_seconds: float


class Speculator:
    """Draft sources and per-request state of one engine.

    Args:
        model: the placed model (from `overspill.load`).
        default: the source requests get unless they say otherwise ('ngram', 'draft:PATH' or None: off).
        max_chain: the longest chain drafted.
        tree: draft trees of up to this many tokens instead of chains (None: chains), for `default`'s
            requests and for those that name a source of their own.

    Raises:
        OverspillError: an unknown source, a bad tree budget, or a draft model that does not load.
    """

    def __init__(self, model, default: str | None, max_chain: int, tree: int | None = None):
        check_speculate(default, tree)  # a tree needs no default: requests may ask for a source
        if max_chain < 1:
            raise ValueError(f"max_chain must be at least 1, got {max_chain}")
        self.model, self.default, self.max_chain, self.tree = model, default, max_chain, tree
        self.serial = supports_serial(model)
        plan = getattr(getattr(model, "overspill", None), "plan", None)
        # expert-streamed layers do not verify drafts yet (`planning.moe.blocker`): `--speculate` plans whole
        # layers instead, so only a request's own source meets such a plan, and it decodes plainly
        self.experts_streamed = plan is not None and plan.moe_streaming == "experts" and bool(plan.streamed_layers)
        self.fit = PassCostFit(prior_pass_cost(model, self.serial))
        self._drafters: dict[str, Drafter] = {}
        if default is not None and getattr(model, "speculation_source", None) == default:
            self._drafters[default] = model.speculation_drafter  # the draft model `load` counted and keeps
        self._progress: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Sequence -> _Progress
        # [b]: tree passes drafted for a budget of b since the start, for `/metrics` (of fixed size: the
        # scrape reads it on another thread while this one counts)
        self.tree_budget_passes = [0] * ((tree or 0) + 1)
        if default is not None and self.serial and not self.experts_streamed:
            self._drafter(default)  # a draft model loads now: a bad path fails before serving, not per request

    @property
    def note(self) -> str | None:
        """Why speculation is off for this model despite a default source (None: it is on, or not asked for)."""
        if self.default is not None and not self.serial:
            return ("speculative decoding is off: this model has sliding-window or other non-full attention "
                    "layers, which serial verification cannot run exactly yet")
        if self.default is not None and self.experts_streamed:
            return ("speculative decoding is off: this plan streams routed experts, which verify passes do not "
                    "combine with yet (load with speculate set, or moe_streaming='dense', to plan whole layers)")
        return None

    def check(self, request: GenerationRequest) -> None:
        """Refuse a draft model other than the engine's own (a request must not make the server load one)."""
        source = request.speculate
        if draft_path(source) is not None and source != self.default:
            allowed = ", ".join(repr(s) for s in ("ngram", self.default, SPECULATE_OFF) if s)
            raise InvalidRequest("speculate", f"speculate={source!r}: this server drafts with {allowed} only")

    def source(self, request: GenerationRequest) -> str | None:
        """The source drafting for `request`, None when it decodes plainly."""
        if not self.serial or self.experts_streamed or request.speculate == SPECULATE_OFF:
            return None
        return request.speculate or self.default

    def usage(self, seq) -> SpeculationUsage | None:
        """What speculation did for `seq` (None: it never drafted)."""
        progress = self._progress.get(seq)
        return progress.usage if progress is not None and progress.usage.passes else None

    def step(self, seq, runner: Runner, source: str, limit: int) -> Verified:
        """Draft up to `limit` tokens for the batch's only row, `seq`, and verify them in one pass; the
        cache keeps the KV of the yielded tokens but the last (fed next step, as in a plain step)."""
        progress = self._progress.setdefault(seq, _Progress())
        request = seq.request
        sample = _sampled(request)
        ids = [*request.prompt_ids, *seq.text.ids]
        scores = (lambda _, logits: sampling_scores(logits, request)) if sample else None
        if self.tree and bool(runner.batch.valid.all()):  # the tree mask assumes a row without padding
            return self._tree_step(seq, runner, self._drafter(source), ids, limit, scores, sample, progress)
        k = min(best_chain(self.fit.cost(), progress.tracker.rate, self.max_chain), limit)
        t0 = time.perf_counter()
        draft = self._drafter(source).propose(torch.tensor([ids], device=runner.device), k, scores, sample)
        proposed = draft.tokens[:k].tolist()
        t1 = time.perf_counter()
        logits = runner.verify([ids[-1], *proposed], self.serial)  # [m + 1, vocab]
        tokens = self._choose(seq, runner, logits, proposed, draft.probs)
        runner.batch.drop_last(len(proposed) + 1 - len(tokens))
        t2 = time.perf_counter()
        accepted = len(tokens) - 1
        progress.tracker.update(len(proposed), accepted)
        self.fit.add(len(proposed) + 1, t2 - t1, len(proposed), t1 - t0)
        progress.usage.add(len(proposed), accepted, len(tokens), t1 - t0, t2 - t1)
        return Verified(tokens, logits[: len(tokens)], len(proposed), t1 - t0, t2 - t1)

    def _tree_step(self, seq, runner: Runner, drafter: Drafter, ids: list[int], limit: int, scores, sample: bool,
                   progress: _Progress) -> Verified:
        """Draft a tree no deeper than `limit`, verify it in one pass and walk it; the cache keeps the
        root and the accepted path (the last yielded token is fed next step, as in a chain step)."""
        budget = tree_budget(self.fit.cost(), progress.ranks, self.tree)
        self.tree_budget_passes[budget] += 1
        t0 = time.perf_counter()
        drafted = propose_tree(drafter, torch.tensor([ids], device=runner.device), budget, scores, sample)
        drafted = fit_pass(drafted, budget, limit, self.serial)
        ranks = drafted.ranks()
        tree, order = drafted.preorder()
        t1 = time.perf_counter()
        tree_pass = runner.verify_tree(ids[-1], tree, self.serial)
        if sample:  # one draw from the request's generator per node visited, as plain steps draw
            walk = walk_tree(tree_pass, ranks, order, lambda row: _pick(runner, seq, tree_pass.logits[row : row + 1]))
        else:  # every row's argmax in one read of the device
            walk = walk_tree(tree_pass, ranks, order, _picks(runner, seq, tree_pass.logits).__getitem__)
        runner.keep_path(tree_pass, walk.path)
        t2 = time.perf_counter()
        progress.ranks.update(walk.choices)
        self.fit.add(len(tree) + 1, t2 - t1, len(tree), t1 - t0)
        progress.usage.add(len(tree), len(walk.path), len(walk.tokens), t1 - t0, t2 - t1, budget=budget)
        return Verified(walk.tokens, tree_pass.logits[walk.rows], len(tree), t1 - t0, t2 - t1)

    def _choose(self, seq, runner: Runner, logits: torch.Tensor, proposed: list[int],
                probs: torch.Tensor | None) -> list[int]:
        """The accepted prefix of `proposed`, then the target's token where it stopped. A deterministic draft
        (`probs` None: prompt lookup, or greedy) keeps a token where the target's own pick, drawn as a plain
        step draws it, is that token: accepted with probability p as min(1, p/q) would, and a seeded request
        gets the plain server's tokens (its generator draws once a yielded token, as plain steps draw)."""
        if probs is None:
            for i, token in enumerate(proposed):
                own = _pick(runner, seq, logits[i : i + 1])
                if own != token:
                    return [*proposed[:i], own]
            return [*proposed, _pick(runner, seq, logits[len(proposed):])]
        rows = logits.cpu()  # a draft with probabilities was sampled: the acceptance draws run on the CPU
        seed = int(torch.randint(0, 2**62, (1,), generator=seq.generator, device=seq.generator.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the request's generator decides every draw: seeded runs repeat
            for i, token in enumerate(proposed):
                scores = sampling_scores(rows[i : i + 1], seq.request)
                q, drafted = probs[i].cpu(), torch.tensor(token)
                if not _accept(scores, drafted, q):
                    return [*proposed[:i], int(_residual(scores, drafted, q))]
        return [*proposed, _pick(runner, seq, logits[len(proposed):])]

    def _drafter(self, source: str) -> Drafter:
        if source not in self._drafters:
            self._drafters[source] = make_drafter(source, self.model)
        return self._drafters[source]


def _pick(runner: Runner, seq, row: torch.Tensor) -> int:
    """The target's own token from one logits row, as a plain decode step picks it."""
    return _picks(runner, seq, row)[0]


def _picks(runner: Runner, seq, rows: torch.Tensor) -> list[int]:
    """The target's own token from each logits row, as plain decode steps pick them (a sampled request
    draws one number a row from its generator)."""
    tokens = runner.sample([seq] * rows.shape[0], rows)
    for token in tokens:
        if isinstance(token, Exception):
            raise token
    return tokens


def _sampled(params: SamplingParams) -> bool:
    return params.temperature >= MIN_TEMPERATURE
