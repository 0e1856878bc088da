"""`GraphedBatch`: the engine's running sequences in one static KV cache, each decode step a CUDA graph.

`DecodeBatch` keeps the batch in a `DynamicCache` whose width changes every step, so its steps
cannot be captured. Here the KV of every row lives in fixed buffers `[max_rows, heads, width, dim]`
per layer, with columns aligned in time as in `DecodeBatch`: every row writes column `col` at each
step, a row that joins is placed to end at `col`, and `valid` marks its real tokens. Rows fill
slots 0..n-1; a step runs the graph of the smallest bucket (a power of two, or `max_rows`) that
holds them, over views of the first `bucket` rows, so one running request does not pay attention
over 64 rows. Joining, leaving and compacting (shifting every row left when `col` reaches the
width) are eager copies inside the same buffers: addresses never change, and graphs stay valid.

The attention mask and each row's position come from `valid` inside the graph; the host only
looks up the new tokens' embeddings. On the CPU (capture off) the same step runs eagerly.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import DynamicCache

from ..errors import OverspillError
from ..runtime.graphs import GraphCache, GraphedDecode, StepGraphs, decode_forward

log = logging.getLogger(__name__)


def bucket_for(rows: int, max_rows: int) -> int:
    """The graph shape that holds `rows` rows: the next power of two, at most `max_rows`."""
    return min(1 << max(rows - 1, 0).bit_length(), max_rows)


class GraphedBatch(StepGraphs):
    """A `batching.Batch` over static buffers, each step a CUDA graph (eager on the CPU)."""

    def __init__(self, model: torch.nn.Module, placement, graphed: GraphedDecode, max_rows: int, width: int):
        super().__init__(placement, graphed.capture)
        self.model, self.forward, self.key = model, graphed.original, graphed.key
        self.device = placement.device
        self.max_rows, self.width = max_rows, width
        self.rows: list[Any] = []
        self.col = 0  # the column the next step writes
        self.first = 0  # no row uses a column before this one
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: keys, values [max_rows, heads, width, dim]
        self._valid: torch.Tensor | None = None  # bool [max_rows, width]
        self._lengths: list[torch.Tensor] = []  # per layer: its cache's write counter, shared by every bucket
        self._caches: dict[int, GraphCache] = {}
        self._embeds: dict[int, torch.Tensor] = {}
        self.compactions = 0
        self._counted = False  # the write counters equal `col` (steps advance both; joins and shifts move col alone)

    def __len__(self) -> int:
        return len(self.rows)

    def held_tokens(self) -> int:
        """KV columns the running rows hold, padding included (the engine's KV gauge)."""
        return len(self.rows) * (self.col - self.first)

    @torch.inference_mode()  # the buffers are inference tensors: every update runs in that mode
    def join(self, rows: list[Any], cache: Any, valid: torch.Tensor) -> None:
        """Add prefilled sequences: `cache` (a `DynamicCache`) holds their KV, `valid` [len(rows), tokens]."""
        n, new, tokens = len(self.rows), len(rows), valid.shape[1]
        if n + new > self.max_rows:
            raise OverspillError(f"{n + new} rows exceed the graphed batch of {self.max_rows}")
        if tokens >= self.width:
            raise OverspillError(f"{tokens} prompt tokens leave no room in a KV width of {self.width}")
        if not self._kv:
            self._allocate(cache)
        if not n:
            self.col = self.first = 0
            self._counted = False
        if tokens > self.col:
            self._shift(tokens - self.col)
        start = self.col - tokens
        for (keys, values), layer in zip(self._kv, cache.layers):
            keys[n : n + new, :, start : self.col].copy_(layer.keys)
            values[n : n + new, :, start : self.col].copy_(layer.values)
        self._valid[n : n + new].fill_(False)
        self._valid[n : n + new, start : self.col].copy_(valid)
        self.first = min(self.first, start) if n else start
        self.rows.extend(rows)

    @torch.inference_mode()
    def keep(self, keep_rows: list[int]) -> None:
        """Keep only these rows, in this order, in slots 0..len(keep_rows)-1."""
        if keep_rows == list(range(len(self.rows))):
            return
        kept = len(keep_rows)
        if kept and keep_rows != list(range(kept)):
            index = torch.tensor(keep_rows, device=self.device)
            for keys, values in self._kv:
                keys[:kept].copy_(keys.index_select(0, index))
                values[:kept].copy_(values.index_select(0, index))
            self._valid[:kept].copy_(self._valid.index_select(0, index))
        if self._valid is not None:
            self._valid[kept:].fill_(False)
        self.rows = [self.rows[i] for i in keep_rows]

    def warm_up(self) -> None:
        """Capture every bucket's graphs (one per ring phase) with dummy rows, so that no request
        waits on a capture later; the batch is empty again afterwards. A failure (e.g. no memory
        for a bucket) turns capture off: serving eagerly beats not serving."""
        try:
            self._capture_buckets()
        except Exception as exc:
            log.warning("CUDA graph warm-up failed (%s: %s); the batch decodes eagerly", type(exc).__name__, exc)
            self.capture = False
            self.rows = []

    @torch.inference_mode()
    def _capture_buckets(self) -> None:
        if not self.capture:
            return
        cache = DynamicCache(config=self.model.config)
        self.forward(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device), use_cache=True,
                     **{self.key: cache})
        ring = self.ring
        phases = 1 if ring is None else ring.n_slots // math.gcd(len(ring.layers), ring.n_slots)
        for b in sorted({bucket_for(n, self.max_rows) for n in range(1, self.max_rows + 1)}):
            self.keep([])
            self.join([None] * b, cache, torch.ones((b, 1), dtype=torch.bool))
            for _ in range(phases + 2):  # a step right after a join may find the ring unprimed
                if not self.capture or sum(key[0] == (b,) for key in self.graphs) >= phases:
                    break
                self.decode([0] * b)
        self.keep([])

    @torch.inference_mode()
    def decode(self, next_tokens: list[int]) -> torch.Tensor:
        """One step for every row: feed each its next token; float32 logits [rows, vocab]."""
        n = len(self.rows)
        if self.col == self.width:
            self._compact()
        b = bucket_for(n, self.max_rows)
        ids = torch.tensor(next_tokens + [0] * (b - n), device=self.device).unsqueeze(1)
        embeds = self.model.get_input_embeddings()(ids)
        if b not in self._embeds:
            self._embeds[b] = torch.empty_like(embeds)
        self._embeds[b].copy_(embeds)
        cache = self._cache(b)
        out = self.run(lambda: self._body(b, cache), key=(b,))
        self.col += 1
        return out[:n, -1].float()

    def _body(self, b: int, cache: GraphCache) -> torch.Tensor:
        valid = self._valid[:b]
        valid.index_fill_(1, self._lengths[0].view(1), True)  # this step's column, in every row of the bucket
        mask = valid[:, None, None, :]
        positions = valid.sum(1, keepdim=True) - 1  # real tokens before this one
        return decode_forward(self.forward, self.key, cache, self._embeds[b], mask, positions)

    def _allocate(self, cache: Any) -> None:
        """The static buffers, all or none: a failure part-way (no memory) leaves none, so the next join tries
        again instead of decoding over some layers' buffers."""
        rows, kv, lengths = self.max_rows, [], []
        for layer in cache.layers:
            k, v = layer.keys, layer.values
            kv.append((torch.zeros((rows, k.shape[1], self.width, k.shape[3]), dtype=k.dtype, device=self.device),
                       torch.zeros((rows, v.shape[1], self.width, v.shape[3]), dtype=v.dtype, device=self.device)))
            lengths.append(torch.zeros((), dtype=torch.long, device=self.device))
        self._valid = torch.zeros((rows, self.width), dtype=torch.bool, device=self.device)
        self._kv, self._lengths = kv, lengths

    def _cache(self, b: int) -> GraphCache:
        """The static cache over the first `b` rows, its write counters set to `col`."""
        if b not in self._caches:
            cache = GraphCache(config=self.model.config, max_cache_len=self.width)
            for layer, (keys, values), length in zip(cache.layers, self._kv, self._lengths):
                meta = (keys.shape[1], 1, keys.shape[3])
                layer.lazy_initialization(torch.empty((b, *meta), dtype=keys.dtype, device="meta"),
                                          torch.empty((b, values.shape[1], 1, values.shape[3]), dtype=values.dtype,
                                                      device="meta"))
                layer.keys, layer.values, layer.device, layer.cumulative_length = keys[:b], values[:b], self.device, length
            self._caches[b] = cache
        if not self._counted:
            for length in self._lengths:
                length.fill_(self.col)
            self._counted = True
        return self._caches[b]

    def _shift(self, by: int) -> None:
        """Move every row's columns `by` to the right (positive) or left (negative)."""
        n, col = len(self.rows), self.col
        src = slice(max(-by, 0), col)
        dst = slice(max(by, 0), col + by)
        for keys, values in self._kv:
            keys[:n, :, dst].copy_(keys[:n, :, src].clone())
            values[:n, :, dst].copy_(values[:n, :, src].clone())
        moved = self._valid[:n, src].clone()
        self._valid[:n].fill_(False)
        self._valid[:n, dst].copy_(moved)
        self.col, self.first = col + by, max(self.first + by, 0)
        self._counted = False

    def _compact(self) -> None:
        """Drop the leading columns no row uses, so the next step has a column to write."""
        n = len(self.rows)
        used = int(self._valid[:n, : self.col].any(0).to(torch.int8).argmax())  # one sync, once per compaction
        if used == 0:
            raise OverspillError(f"a sequence fills the graphed batch's KV width of {self.width}")
        self._shift(-used)
        self.first = 0
        self.compactions += 1
