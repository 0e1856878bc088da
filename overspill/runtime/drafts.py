"""Draft sources for speculative decoding, behind one interface.

A drafter proposes up to `k` tokens that may follow the sequence so far. The target model verifies
them in one streamed pass (`overspill.runtime.speculative`), so a drafter only has to be cheap and
often right; it never decides the output. `probs` (the drafter's distribution over each proposed
token) is what speculative *sampling* needs to stay exact; a deterministic drafter returns None and
counts as proposing each token with probability one.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..errors import OverspillError

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


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (longest n
    first) and propose what followed it. No model: free, and right whenever the answer quotes its
    input (summaries, code edits, extraction)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

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


class ModelDrafter:
    """A small model with the target's tokenizer, resident on the device, proposing greedily (or
    sampling, with its distribution returned). It keeps its own cache and crops it back to the
    longest prefix it shares with the sequence, so accepted tokens are never recomputed."""

    def __init__(self, model: torch.nn.Module, vocab_size: int):
        from .kv import cache_kwarg

        self.model = model
        self.vocab_size = vocab_size
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
            processed = scores(seq, logits) if scores is not None else logits
            if sample:
                p = torch.softmax(processed, dim=-1)
                token = torch.multinomial(p, 1)
                probs.append(p[0])
            else:
                token = processed.argmax(dim=-1, keepdim=True)
            tokens.append(token[0])
            seq = torch.cat([seq, token], dim=1)
            feed = token
        self.seconds += time.perf_counter() - start
        return Draft(torch.cat(tokens).to(ids.device), torch.stack(probs).to(ids.device) if sample else None)


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
    """Refuse an unknown draft source before anything is loaded."""
    if source != "ngram" and not (source.startswith("draft:") and len(source) > len("draft:")):
        raise OverspillError(f"unknown speculate source {source!r}; use 'ngram' or 'draft:PATH'")


def make_drafter(source: str, target: torch.nn.Module) -> Drafter:
    """`ngram`, or `draft:PATH` (a small model with the same tokenizer, loaded resident)."""
    check_source(source)
    vocab = target.config.get_text_config().vocab_size
    if source == "ngram":
        return NgramDrafter()
    from transformers import AutoModelForCausalLM

    path = source.split(":", 1)[1]
    device = next(target.parameters()).device
    try:
        draft = AutoModelForCausalLM.from_pretrained(path, dtype=target.dtype).to(device).eval()
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OverspillError(f"cannot load the draft model {path!r} ({first}); pass a local model directory") from None
    return ModelDrafter(draft, vocab)
