"""Draft sources for speculative decoding, behind one interface.

A drafter proposes up to `k` tokens that may follow the sequence so far. The target model verifies
them in one streamed pass (`overspill.runtime.speculative`), so a drafter only has to be cheap and
often right; it never decides the output. `probs` (the drafter's distribution over each proposed
token) is what speculative *sampling* needs to stay exact; a deterministic drafter returns None and
counts as proposing each token with probability one.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..errors import OverspillError
from ..planning.speculation import check_source as planned_check
from ..planning.speculation import draft_path
from .trees import DraftTree

Scores = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`(ids [1, n], logits [1, vocab]) -> scores [1, vocab]`: the target's logits processors."""


@dataclass
class Draft:
    tokens: torch.Tensor  # [m] proposed token ids, m <= k
    probs: torch.Tensor | None = None  # [m, vocab] the drafter's distribution for each, None: deterministic


def drop_last(cache, remove: int) -> None:
    """Drop the last `remove` tokens: a negative count means that in transformers 5.17 and 5.2x alike
    (5.2x refuses positive values, 5.17 reads them as a length to keep)."""
    if remove > 0:
        cache.crop(-remove)


class Drafter(Protocol):
    def propose(self, ids: torch.Tensor, k: int, scores: Scores | None, sample: bool) -> Draft:
        """Up to `k` tokens to follow `ids` ([1, n], everything so far)."""


class TreeDrafter(Drafter, Protocol):
    def propose_tree(self, ids: torch.Tensor, budget: int, scores: Scores | None, sample: bool) -> DraftTree:
        """Up to `budget` tokens to follow `ids`, as a tree of alternatives (deterministic: the
        verify walk samples from the target and follows the child it drew, so no draft
        distribution is needed to keep sampling exact)."""


def propose_tree(drafter: Drafter, ids: torch.Tensor, budget: int, scores: Scores | None, sample: bool) -> DraftTree:
    """A tree from any drafter: its own where it grows trees, else its chain as a one-branch tree."""
    grow = getattr(drafter, "propose_tree", None)
    if grow is not None:
        return grow(ids, budget, scores, sample)
    return DraftTree.chain(drafter.propose(ids, budget, scores, sample).tokens[:budget])


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (longest n
    first) and propose what followed it. No model: free, and right whenever the answer quotes its
    input (summaries, code edits, extraction)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, branch_depth: int = 16):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.branch_depth = branch_depth

    def propose(self, ids: torch.Tensor, k: int, scores: Scores | None = None, sample: bool = False) -> Draft:
        seq = ids[0]
        n_tokens = seq.shape[0]
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            tail = seq[-n:]
            windows = seq[: n_tokens - 1].unfold(0, n, 1)  # every earlier n-gram, [n_tokens - n, n]
            hits = (windows == tail).all(dim=1).nonzero().flatten()
            if hits.numel():
                start = int(hits[-1]) + n
                return Draft(seq[start : start + k].clone())
        return Draft(seq[:0].clone())

    def propose_tree(self, ids: torch.Tensor, budget: int, scores: Scores | None = None,
                     sample: bool = False) -> DraftTree:
        """Every earlier continuation of the sequence's tail, merged into a trie: longest match first,
        latest occurrence first (so the first branch is `propose`'s chain), each at most
        `branch_depth` deep, until `budget` nodes."""
        seq = ids[0]
        n_tokens = seq.shape[0]
        tokens: list[int] = []
        parents: list[int] = []
        node_of: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            windows = seq[: n_tokens - 1].unfold(0, n, 1)
            hits = (windows == seq[-n:]).all(dim=1).nonzero().flatten().tolist()
            for hit in reversed(hits):
                parent = -1
                for token in seq[hit + n : hit + n + self.branch_depth].tolist():
                    if (parent, token) not in node_of:
                        if len(tokens) >= budget:
                            break
                        node_of[(parent, token)] = len(tokens)
                        tokens.append(token)
                        parents.append(parent)
                    parent = node_of[(parent, token)]
                if len(tokens) >= budget:
                    return DraftTree(torch.tensor(tokens, dtype=torch.long, device=ids.device), parents)
        return DraftTree(torch.tensor(tokens, dtype=torch.long, device=ids.device), parents)


class ModelDrafter:
    """A small model with the target's tokenizer, resident on the device, proposing greedily (or
    sampling, with its distribution returned). It keeps its own cache and crops it back to the
    longest prefix it shares with the sequence, so accepted tokens are never recomputed."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, top_k: int = 4, width: int = 1):
        from .kv import cache_kwarg

        self.model = model
        self.vocab_size = vocab_size
        self.top_k, self.width = top_k, width
        self._kwarg = cache_kwarg(model)
        self._cache = None
        self._ids: torch.Tensor | None = None  # tokens whose KV the cache holds
        self.seconds = 0.0

    def reset(self) -> None:
        self._cache, self._ids = None, None

    def _sync(self, ids: torch.Tensor) -> torch.Tensor:
        """Crop the cache to the prefix it shares with `ids`; returns the tokens still to feed."""
        from transformers import DynamicCache

        if self._cache is None or self._ids is None:
            self._cache = DynamicCache(config=self.model.config)
            self._ids = ids[:, :0]
        n = min(self._ids.shape[1], ids.shape[1] - 1)
        same = int((self._ids[0, :n] == ids[0, :n]).int().cumprod(0).sum()) if n else 0
        drop_last(self._cache, self._ids.shape[1] - same)
        self._ids = ids[:, :same]
        return ids[:, same:]

    @torch.no_grad()
    def propose(self, ids: torch.Tensor, k: int, scores: Scores | None = None, sample: bool = False) -> Draft:
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        feed = self._sync(ids).to(device)
        seq = ids.to(device)
        tokens, probs = [], []
        for _ in range(k):
            logits = self.model(input_ids=feed, **{self._kwarg: self._cache}, use_cache=True).logits[:, -1].float()
            self._ids = torch.cat([self._ids.to(device), feed], dim=1)
            logits = _fit_vocab(logits, self.vocab_size)
            token = draft_token(scores(seq, logits) if scores is not None else logits, sample, probs)
            tokens.append(token[0])
            seq = torch.cat([seq, token], dim=1)
            feed = token
        self.seconds += time.perf_counter() - start
        return Draft(torch.cat(tokens).to(ids.device), torch.stack(probs).to(ids.device) if sample else None)

    @torch.no_grad()
    def propose_tree(self, ids: torch.Tensor, budget: int, scores: Scores | None = None,
                     sample: bool = False) -> DraftTree:
        """Grow a tree best-first by the draft's cumulative probability: each node taken offers its
        `top_k` most likely children as candidates; `width` candidates are taken (and run through
        the draft together, under a tree mask) per round, 1 being strict best-first. Deterministic
        in both modes (see `TreeDrafter`). A draft with sliding-window layers drafts a chain."""
        from .trees import model_masks

        start = time.perf_counter()
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        feed = self._sync(ids).to(device)
        if any(getattr(layer, "is_sliding", False) for layer in self._cache.layers):
            return DraftTree.chain(self.propose(ids, budget, scores, sample).tokens)
        logits = self.model(input_ids=feed, **{self._kwarg: self._cache}, use_cache=True).logits[0, -1:].float()
        self._ids = ids.to(device)
        prefix = ids.shape[1]
        tokens: list[int] = []
        parents: list[int] = []
        logp: list[float] = []
        heap: list[tuple[float, int, int, int]] = []  # (-cumulative log prob, tie, parent, token)
        fed: list[int] = []

        def offer(parent: int, row: torch.Tensor) -> None:
            path = [] if parent < 0 else DraftTree(torch.tensor(tokens), parents).path(parent)
            seq = torch.cat([ids.to(device), torch.tensor([[tokens[i] for i in path]], dtype=torch.long,
                                                          device=device)], dim=1)
            row = _fit_vocab(row, self.vocab_size)
            row = torch.log_softmax(scores(seq, row) if scores is not None else row, dim=-1)[0]
            best = torch.topk(row, min(self.top_k, row.shape[-1]))
            base = 0.0 if parent < 0 else logp[parent]
            for value, token in zip(best.values.tolist(), best.indices.tolist()):
                if value > float("-inf"):
                    heapq.heappush(heap, (-(base + value), len(heap) + len(tokens) * self.top_k, parent, token))

        offer(-1, logits)
        while heap and len(tokens) < budget:
            taken = []
            while heap and len(taken) < self.width and len(tokens) < budget:
                neg, _, parent, token = heapq.heappop(heap)
                taken.append(len(tokens))
                tokens.append(token)
                parents.append(parent)
                logp.append(-neg)
            if len(tokens) >= budget:
                break
            tree = DraftTree(torch.tensor(tokens, dtype=torch.long), parents)
            depth = tree.depths()
            mask = model_masks(self._cache, tree, prefix, dtype, device, columns=fed + taken, queries=taken)
            out = self.model(input_ids=torch.tensor([[tokens[i] for i in taken]], device=device),
                             position_ids=torch.tensor([[prefix - 1 + depth[i] for i in taken]], device=device),
                             attention_mask=mask, **{self._kwarg: self._cache}, use_cache=True)
            fed += taken
            for row, node in enumerate(taken):
                offer(node, out.logits[0, row : row + 1].float())
        drop_last(self._cache, len(fed))  # back to the sequence itself
        self.seconds += time.perf_counter() - start
        return DraftTree(torch.tensor(tokens, dtype=torch.long, device=ids.device), parents)


def draft_token(processed: torch.Tensor, sample: bool, probs: list[torch.Tensor]) -> torch.Tensor:
    """The next drafted token from processed logits [1, vocab]: sampled (its distribution appended to
    `probs`, which the acceptance rule needs) or greedy."""
    if not sample:
        return processed.argmax(dim=-1, keepdim=True)
    p = torch.softmax(processed, dim=-1)
    probs.append(p[0])
    return torch.multinomial(p, 1)


def _fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Drafter logits over the target's vocabulary (embedding tables are often padded differently)."""
    if logits.shape[-1] == vocab:
        return logits
    if logits.shape[-1] > vocab:
        return logits[..., :vocab]
    pad = logits.new_full((*logits.shape[:-1], vocab - logits.shape[-1]), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


class OracleDrafter:
    """For measurement: proposes a known continuation (e.g. plain greedy's), each token replaced by a
    wrong one with probability `1 - acceptance`, so per-token acceptance is controlled exactly while
    the target still decides every token. Not a real draft source."""

    def __init__(self, continuation: torch.Tensor, prompt_tokens: int, acceptance: float, vocab_size: int,
                 seed: int = 0):
        self.continuation = continuation.flatten().tolist()
        self.prompt_tokens = prompt_tokens
        self.acceptance = acceptance
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)

    def propose(self, ids: torch.Tensor, k: int, scores: Scores | None = None, sample: bool = False) -> Draft:
        done = ids.shape[1] - self.prompt_tokens
        out = []
        for token in self.continuation[done : done + k]:
            if self.rng.random() >= self.acceptance:
                token = (token + 1 + self.rng.randrange(self.vocab_size - 1)) % self.vocab_size
            out.append(token)
        return Draft(torch.tensor(out, dtype=torch.long, device=ids.device))


def check_source(source: str) -> None:
    """Refuse an unknown `load` draft source before anything is loaded (`planning.speculation.check_source`)."""
    try:
        planned_check(source, ("auto", "ngram", "self"))
    except ValueError as exc:
        raise OverspillError(str(exc)) from None


def make_drafter(source: str, target: torch.nn.Module) -> Drafter:
    """`ngram`, `self` (the target's own layers in int4) or `draft:PATH` (a small model with the same
    tokenizer, loaded resident)."""
    check_source(source)
    if source == "auto":
        raise OverspillError("speculate='auto' is decided from a plan: pass it to overspill.load, or name a source")
    vocab = target.config.get_text_config().vocab_size
    if source == "ngram":
        return NgramDrafter()
    if source == "self":
        from .self_draft import make_self_drafter

        return make_self_drafter(target)
    from transformers import AutoModelForCausalLM

    from .sources import cannot_load_draft

    path = draft_path(source)
    device = next(target.parameters()).device
    try:
        draft = AutoModelForCausalLM.from_pretrained(path, dtype=target.dtype).to(device).eval()
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise cannot_load_draft(path, first) from None
    return ModelDrafter(draft, vocab)
