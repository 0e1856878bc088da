"""Speculative decoding as transformers' decoding loop: many tokens per trip of the weights.

A streamed pass costs the link time of the streamed layers whether it carries 1 token or 64, so a
pass that verifies a chain of drafted tokens yields the accepted prefix plus one token of the
target's own for the price of one. `speculative_decode` is a `custom_generate` callable: transformers
prepares inputs, logits processors, stopping criteria and the planned cache exactly as for plain
decoding and hands them here, so `generate`, `pipeline` and `run` share it (`enable` wires it in).

Exactness: greedy keeps a drafted token only when it is the target's argmax at that position (the
same logits processors applied to the same prefix), so the output is plain greedy's; sampling uses
the speculative sampling rule (accept with min(1, p/q), else sample the residual max(p - q, 0)), so
the output distribution is plain sampling's. A deterministic draft (prompt lookup: q a point mass) is
kept where the target's own draw, made as plain sampling makes it, is the drafted token (the same
probability p), so a seeded call samples plain sampling's very tokens. Rejected tokens' KV is cropped
from the cache.

With `tree=budget` the drafter proposes a tree of alternatives (`trees.py`) verified in one pass;
the walk down it draws each token from the target exactly as plain decoding would (argmax, or a
sample) and follows the drafted child holding that token, so greedy is plain greedy and sampling is
plain sampling for any tree; the cache keeps the accepted path only. Each pass's budget is re-picked
between `MIN_TREE` and `tree` from the rank acceptance measured so far (`planning.trees.tree_budget`),
as the chain length adapts from measured acceptance (`adapt_tree=False` fixes it at `tree`).

With CUDA graphs (`load(cuda_graphs=True)`) a verify pass is graphed as decode steps are
(`graphs.GraphedDecode.verify`): serial, each token with the kernels and mask row a graphed decode
step gives it, so greedy stays plain graphed greedy, and the host launches a pass with one replay
instead of a layer's kernels per token. Passes come in a few sizes (`planning.speculation.GRAPHED_PASSES`,
so few graphs are captured): the drafter is asked for the whole pass, and a shorter draft is filled with
guesses, verified like any drafted token (a point mass when sampling). Chains only, and only where
verification can be serial (`token_serial.supports_serial`); elsewhere passes run eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from dataclasses import dataclass, field

import torch

from ..planning.speculation import (AcceptanceTracker, PassCost, PassCostFit, best_chain, graphed_pass,
                                   plan_pass_cost)
from ..planning.trees import RankAcceptance, tree_budget
from .drafts import Drafter, drop_last, make_drafter, propose_tree
from .kv import cache_kwarg
from .token_serial import serial_tokens, supports_serial
from .trees import DraftTree, TreePass, fit_pass, keep_path, verify_tree, walk_tree

DEFAULT_MAX_CHAIN = 16


@dataclass
class SpeculationStats:
    """What the last speculative `generate` call did (on `model.speculation_stats`)."""

    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    chains: list[int] = field(default_factory=list)  # tokens drafted per pass (a tree's nodes)
    serial: bool = False
    tree: int | None = None  # the tree budget, None: chains
    budgets: list[int] = field(default_factory=list)  # trees: the budget each pass drafted for
    ranks: RankAcceptance = field(default_factory=RankAcceptance)  # trees: which sibling the target chose

    @property
    def tokens_per_pass(self) -> float:
        """Tokens each verify pass yielded (accepted drafts + the target's own); the first token
        came from the prompt's pass and is not counted."""
        return (self.emitted - 1) / self.passes if self.passes else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def draft_share(self) -> float:
        total = self.draft_seconds + self.verify_seconds
        return self.draft_seconds / total if total else 0.0


def _eligible(input_ids: torch.Tensor, generation_config, model_kwargs: dict) -> bool:
    """Batch 1, no padding, one beam, tensors out, token ids in: the cases the loop handles (others run
    plain). Classifier-free guidance runs plain too: its logits processor keeps its own per-step state,
    which assumes one call per position in order (verify passes and trees score positions out of order)."""
    if input_ids.shape[0] != 1 or generation_config.num_beams != 1:
        return False
    if generation_config.return_dict_in_generate:
        return False
    if model_kwargs.get("inputs_embeds") is not None:  # the prompt is embeddings: the loop feeds ids
        return False
    if generation_config.guidance_scale is not None and generation_config.guidance_scale != 1:
        return False
    mask = model_kwargs.get("attention_mask")
    return mask is None or bool(mask.all())


def _croppable(cache) -> bool:
    """Every layer can drop rejected tokens (sliding-window layers only where past recording exists)."""
    if getattr(cache, "croppable", False):  # a graphed decode's static cache crops itself
        return True
    layers = getattr(cache, "layers", [])
    if any(getattr(layer, "is_sliding", False) for layer in layers) and not hasattr(cache, "activate_past_recording"):
        return False
    return all(getattr(layer, "is_croppable", True) for layer in layers)


def _record_past(cache, tokens: int) -> None:
    """Let sliding-window layers keep what a crop may restore (transformers 5.2x takes how many
    recurrent states to keep; 5.17 takes no argument; older caches have no such method)."""
    import inspect

    record = getattr(cache, "activate_past_recording", None)
    if record is None:
        return
    if "recurrent_states_to_keep" in inspect.signature(record).parameters:
        record(recurrent_states_to_keep=tokens)
    else:
        record()


def _forward(model, ids: torch.Tensor, cache, kwarg: str, keep: int) -> torch.Tensor:
    """Logits [len, vocab] of the last `keep` positions of a pass over `ids` ([1, len]) after `cache`."""
    out = model(input_ids=ids, **{kwarg: cache}, use_cache=True, logits_to_keep=keep)
    return out.logits[0, -keep:].float()


def graphed_verify(model) -> bool:
    """Verify passes replay as CUDA graphs: the model has a graphed decode (`load(cuda_graphs=True)`)
    and can verify serially. Graphed passes hold chains only, so draft trees run as chains there."""
    return getattr(getattr(model, "overspill", None), "graphs", None) is not None and supports_serial(model)


def _graphed(model, cache):
    """The model's graphed decode (`graphs.GraphedDecode`) when it verifies (`graphed_verify`) and
    `cache` is its static cache, else None."""
    graphs = model.overspill.graphs if graphed_verify(model) else None
    return graphs if graphs is not None and getattr(graphs, "cache", None) is cache else None


def _prefill(model, ids: torch.Tensor, cache, kwarg: str, chunk: int | None) -> torch.Tensor:
    """The prompt through the model in chunks of the plan's size; the last position's logits."""
    step = chunk or ids.shape[1]
    for start in range(0, ids.shape[1], step):
        logits = _forward(model, ids[:, start : start + step], cache, kwarg, keep=1)
    return logits[-1]


@torch.no_grad()
def speculative_decode(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    drafter: Drafter | None = None,
    max_chain: int = DEFAULT_MAX_CHAIN,
    chain: int | None = None,
    stream_to=None,
    serial: bool | None = None,
    tree: int | None = None,
    adapt_tree: bool = True,
    **model_kwargs,
) -> torch.LongTensor:
    """transformers `custom_generate` loop: draft up to `chain` tokens, verify them in one pass.

    `chain=None` adapts the chain length to the acceptance measured so far (`best_chain`); an int
    fixes it. `stream_to` is `generate`'s streamer (transformers passes a callable loop only the
    arguments `_sample` lacks). `serial` verifies one token at a time inside each layer, plain
    decoding's own arithmetic (`token_serial`); None: wherever the model allows it. `tree`: draft
    trees of up to that many tokens instead of chains (`chain` is then unused); `adapt_tree` picks each
    pass's budget in [MIN_TREE, tree] from the measured acceptance (`tree_budget`), else every pass
    drafts `tree`. Calls the loop cannot serve exactly (batch > 1, padding, beams, dict outputs, a
    cache that cannot crop) run transformers' own sampling loop instead.
    """
    streamer = streamer or stream_to
    kwarg = cache_kwarg(model)
    cache = model_kwargs.get(kwarg)
    if drafter is None or cache is None or not _eligible(input_ids, generation_config, model_kwargs) \
            or not _croppable(cache):
        from transformers.generation.utils import GenerationMixin

        return GenerationMixin._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                       synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
    sample = bool(generation_config.do_sample)
    graphs = _graphed(model, cache)
    if graphs is not None and tree:  # graphed passes verify chains only
        tree = None
    serial = graphs is not None or (supports_serial(model) if serial is None else serial)
    stats = SpeculationStats(serial=serial, tree=tree)
    model.speculation_stats = stats
    tracker = AcceptanceTracker()
    fit = PassCostFit(prior_pass_cost(model, serial, graphed=graphs is not None))
    ids = input_ids
    start = time.perf_counter()
    if int(cache.get_seq_length()) >= ids.shape[1]:  # a cache the caller passed back in may hold it all
        drop_last(cache, int(cache.get_seq_length()) - ids.shape[1] + 1)
    done = int(cache.get_seq_length())
    logits = _prefill(model, ids[:, done:], cache, kwarg, getattr(generation_config, "prefill_chunk_size", None))
    _record_past(cache, max(max_chain, tree or 0) + 1)
    stats.verify_seconds += time.perf_counter() - start
    limit = generation_config.max_length
    pending: torch.Tensor = logits[None]  # the target's raw logits for the next token
    chosen: torch.Tensor | None = None  # or the next token itself (a rejection's residual sample)
    while True:
        token = chosen if chosen is not None else _choose(logits_processor(ids, pending), sample)
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
        stats.emitted += 1
        if _emit(ids, token.view(1), stopping_criteria, streamer):
            break
        if tree:
            budget = tree_budget(fit.cost(), stats.ranks, tree) if adapt_tree else tree
            ids, chosen, finished = _tree_step(model, ids, cache, kwarg, drafter, budget, limit, logits_processor,
                                               sample, serial, stopping_criteria, streamer, stats, fit)
            if finished:
                break
            continue
        k = chain if chain is not None else best_chain(fit.cost(), tracker.rate, max_chain)
        k = max(0, min(k, limit - ids.shape[1])) if limit else k  # never past the planned KV
        if graphs is not None and k:  # a graphed pass's size: ask the drafter for all of it
            k = graphed_pass(k + 1, limit - ids.shape[1] + 1 if limit else None) - 1
        t0 = time.perf_counter()
        draft = drafter.propose(ids, k, logits_processor, sample) if k else None
        t1 = time.perf_counter()
        proposed = draft.tokens.to(ids.device)[:k] if draft is not None else ids[0, :0]
        drafted = int(proposed.shape[0])  # what the drafter proposed (a graphed pass may verify more)
        if graphs is not None and 0 < drafted < k:  # fill the graphed pass: extra guesses, verified like any draft
            proposed = torch.cat([proposed, proposed[-1:].expand(k - drafted)])
        m = int(proposed.shape[0])
        verify = torch.cat([ids[:, -1:], proposed.view(1, m)], dim=1)
        past = int(cache.get_seq_length())
        if graphs is not None and m:  # a copy: the graph's buffer is rewritten by the next step
            target = graphs.verify(verify).to(torch.float32, copy=True)
        else:
            with serial_tokens(model) if serial and m else contextlib.nullcontext():
                target = _forward(model, verify, cache, kwarg, keep=m + 1)  # [m + 1, vocab]
        accepted, chosen, finished = 0, None, False
        pending = target[m : m + 1]
        for i in range(m):
            q = draft.probs[i] if draft.probs is not None and i < drafted else None  # a filler: a point mass
            scores = logits_processor(ids, target[i : i + 1])
            if q is None:  # a point mass (greedy, or a deterministic draft): the target's own token, drawn as
                own = _choose(scores, sample)  # plain decoding draws it, so a seeded sample is plain's sample
                if bool(own != proposed[i]):  # accepted with probability p(token), as min(1, p/q) would
                    pending, chosen = target[i : i + 1], own.view(1)
                    break
            elif not _accept(scores, proposed[i], q):  # a drafter's distribution: drafts it sampled
                pending = target[i : i + 1]
                chosen = _residual(scores, proposed[i], q)
                break
            accepted += 1
            ids = torch.cat([ids, proposed[i].view(1, 1)], dim=1)
            if _emit(ids, proposed[i].view(1), stopping_criteria, streamer):
                finished = True
                break
        drop_last(cache, int(cache.get_seq_length()) - (past + 1 + accepted))  # keep the last token and accepted drafts
        stats.passes += 1
        stats.drafted += drafted
        stats.accepted += min(accepted, drafted)
        stats.emitted += accepted
        stats.chains.append(drafted)
        tracker.update(drafted, min(accepted, drafted))
        t2 = time.perf_counter()
        fit.add(m + 1, t2 - t1, drafted, t1 - t0)
        stats.draft_seconds += t1 - t0
        stats.verify_seconds += t2 - t1
        if finished:
            break
    if streamer is not None:
        streamer.end()
    return ids


def _tree_step(model, ids: torch.Tensor, cache, kwarg: str, drafter: Drafter, budget: int, limit: int | None,
               logits_processor, sample: bool, serial: bool, stopping_criteria, streamer,
               stats: SpeculationStats, fit: PassCostFit) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Draft a tree, verify it in one pass, walk it: returns the sequence with the accepted path,
    the target's own next token (None when stopped) and whether a stopping criterion fired."""
    room = limit - ids.shape[1] if limit else budget  # never past the planned KV
    t0 = time.perf_counter()
    drafted = propose_tree(drafter, ids, budget, logits_processor, sample) if room > 0 else DraftTree.chain(ids[0, :0])
    drafted = fit_pass(drafted, budget, room, serial)
    ranks = drafted.ranks()
    tree, order = drafted.preorder()
    t1 = time.perf_counter()
    tree_pass = verify_tree(model, cache, kwarg, ids[0, -1:], tree, serial)
    best = None if sample else _greedy_rows(tree_pass, ids, logits_processor)

    def pick(row: int) -> int:  # a sample draws at each node visited, in order, as plain steps draw
        if best is not None:
            return best[row]
        return int(_choose(logits_processor(ids, tree_pass.logits[row : row + 1]), sample))

    def accepted(token: int) -> bool:
        nonlocal ids
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        return _emit(ids, ids[0, -1:], stopping_criteria, streamer)

    walk = walk_tree(tree_pass, ranks, order, pick, stop=accepted)
    keep_path(cache, tree_pass, walk.path)
    stats.passes += 1
    stats.drafted += len(tree)
    stats.accepted += len(walk.path)
    stats.emitted += len(walk.path)
    stats.chains.append(len(tree))
    stats.budgets.append(budget)
    stats.ranks.update(walk.choices)
    t2 = time.perf_counter()
    fit.add(len(tree) + 1, t2 - t1, len(tree), t1 - t0)
    stats.draft_seconds += t1 - t0
    stats.verify_seconds += t2 - t1
    own = None if walk.stopped else ids.new_tensor([walk.tokens[-1]])
    return ids, own, walk.stopped


def _greedy_rows(tree_pass: TreePass, ids: torch.Tensor, logits_processor) -> list[int]:
    """Plain greedy's token after every position of a tree pass, read from the device once: a row's
    scores are what a plain step scores there (the processors see the prefix and the node's path)."""
    logits = tree_pass.logits
    if logits_processor:  # e.g. a repetition penalty or a minimum length: they read the sequence
        tree = tree_pass.tree
        tokens = tree.tokens.to(ids.device)
        rows = [logits_processor(ids, logits[:1])]
        for node in range(len(tree)):
            path = tokens[torch.tensor(tree.path(node), device=ids.device)]
            rows.append(logits_processor(torch.cat([ids, path.view(1, -1)], dim=1), logits[node + 1 : node + 2]))
        logits = torch.cat(rows)
    return logits.argmax(dim=-1).tolist()


def _choose(scores: torch.Tensor, sample: bool) -> torch.Tensor:
    if sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), 1)[0]
    return scores.argmax(dim=-1)


def _accept(scores: torch.Tensor, token: torch.Tensor, q: torch.Tensor) -> bool:
    """A sampled draft with distribution `q` (a point mass is served by drawing the target's own token
    instead): accept with probability min(1, p/q)."""
    p = torch.softmax(scores[0], dim=-1)
    return bool(torch.rand(()) < min(1.0, float(p[token]) / max(float(q[token]), 1e-30)))


def _residual(scores: torch.Tensor, token: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """After a rejected sample, draw from max(p - q, 0) normalised: with the acceptance rule this
    makes every emitted token distributed as the target's own sample."""
    p = torch.softmax(scores[0], dim=-1)
    rest = (p - q.to(p.dtype)).clamp_min(0)
    total = rest.sum()
    rest = p if float(total) <= 0 else rest / total
    return torch.multinomial(rest, 1)


def _emit(ids: torch.Tensor, token: torch.Tensor, stopping_criteria, streamer) -> bool:
    if streamer is not None:
        streamer.put(token.cpu())
    return bool(stopping_criteria(ids, None).all())


def prior_pass_cost(model: torch.nn.Module, serial: bool, graphed: bool = False) -> PassCost:
    """The verify pass the plan predicts for `model` (`planning.speculation.plan_pass_cost`), the
    prior the chain length adapts from until passes are measured; flat without a plan."""
    placement = getattr(model, "overspill", None)
    prediction = getattr(getattr(placement, "plan", None), "prediction", None)
    if prediction is None:
        return PassCost(1.0)
    return plan_pass_cost(prediction, 0.0, 0.0, serial, graphed=graphed)  # no matmul rate: a token adds no FLOPs


def _speculable_call(model: torch.nn.Module, plain, args: tuple, kwargs: dict) -> dict | None:
    """The arguments of a `generate` call (by name) when transformers would decode it greedily or by
    sampling, which the speculative loop serves; None for any other mode (beams, contrastive search,
    DoLa, an assistant model: a `custom_generate` loop would replace their own), for a call's own
    `custom_generate`, for a call transformers refuses (plain `generate` then raises its own error), and
    for `stop_strings` or `token_healing`: they need the call's tokenizer, which transformers 5 drops
    for a callable `custom_generate` (`_extract_generation_mode_kwargs`), so it would refuse the call.
    The mode is read from the call's whole configuration, as `generate` reads it: a `generation_config`
    passed by position or keyword, then its keyword arguments, then the model's defaults."""
    from transformers.generation.configuration_utils import GenerationMode

    try:
        given = inspect.signature(plain).bind(*args, **kwargs).arguments
    except TypeError:
        return None
    if given.get("custom_generate") is not None or given.get("assistant_model") is not None:
        return None
    extra = {k: v for k, v in given.get("kwargs", {}).items()
             if k not in ("tokenizer", "assistant_tokenizer", "trust_remote_code")}  # `generate` pops these first
    try:
        config, _ = model._prepare_generation_config(given.get("generation_config"), **extra)
        mode = config.get_generation_mode()
    except Exception:  # noqa: BLE001 - transformers refuses the call: plain `generate` says why
        return None
    if config.stop_strings or config.token_healing:
        return None
    return given if mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE) else None


def enable(model: torch.nn.Module, source: str | Drafter | None, chain: int | None = None,
           serial: bool | None = None, tree: int | None = None, adapt_tree: bool = True) -> torch.nn.Module:
    """Make `model.generate` (and so `pipeline` and `run`) decode speculatively with `source`
    ('ngram', 'draft:PATH' or a `Drafter`); None turns it off. `tree=budget` drafts trees of up to
    that many tokens per pass instead of chains, each pass's budget adapted to the measured
    acceptance (`adapt_tree=False`: every pass drafts `tree`, e.g. to measure one budget). Calls
    that pass their own `custom_generate` or
    `assistant_model`, or decode other than greedily or by sampling (beams, however the call asks for
    them: `_speculable_call`), run as before."""
    if "generate" in model.__dict__:
        del model.generate
    model.__dict__.pop("speculation_drafter", None)
    if source is None:
        return model
    drafter = make_drafter(source, model) if isinstance(source, str) else source
    plain = model.generate

    @functools.wraps(plain)
    def generate(*args, **kwargs):
        given = _speculable_call(model, plain, args, kwargs)
        if given is None:
            return plain(*args, **kwargs)
        loop = functools.partial(speculative_decode, drafter=drafter, chain=chain, serial=serial, tree=tree,
                                 adapt_tree=adapt_tree, stream_to=given.get("streamer"))
        return plain(*args, custom_generate=loop, **kwargs)

    model.generate = generate
    model.speculation_drafter = drafter  # e.g. to time plain decoding and switch the same draft back on
    model.speculation_source = source if isinstance(source, str) else type(source).__name__
    return model
