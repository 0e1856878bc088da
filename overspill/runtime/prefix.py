"""Prefix reuse: the KV of earlier prompts, whole blocks keyed by prefix hash, kept in host memory.

`KVBlockManager` (pure) decides which blocks a prompt can reuse and which pool slots to fill;
this module moves the bytes. A request `start`s with an empty cache: the cached leading blocks
are copied in from the pinned pool, one copy per layer for each run of consecutive pool blocks
(a prompt stored into a fresh pool is one run, so 32k tokens of an 8B model restore in 64 copies), and
`generate` then computes only the remaining tokens. `finish` writes the prompt's new full blocks
to the pool; `abort` forgets them, so unwritten bytes are never reused.

The pool is the manager's HOST tier. A serving engine given this pool counts its running requests'
blocks in the same manager's GPU tier and its host-tier KV layers' in HOST_LAYER, so one manager
answers for all KV blocks in use.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..errors import OverspillError
from ..planning.kvblocks import Allocation, KVBlockManager, KVTier
from .kv import TieredCache, kv_dims, layer_kv
from .layout import host_tensor


@dataclass(frozen=True)
class Lease:
    """One request's hold on the pool: its blocks stay unevicted until `finish` or `abort`."""

    seq_id: int
    cached_tokens: int
    allocation: Allocation


class PrefixCache:
    """A pinned-host pool of KV blocks shared across requests of one model.

    The pool is laid out layer-major, so a layer's consecutive blocks are one contiguous span:
    per-block copies (thousands of small `copy_` calls) ran at a pageable-like 5.5 GB/s on the H100.

    Args:
        config: the model config (layers, KV heads, head size).
        capacity_tokens: tokens of KV the pool holds (rounded down to whole blocks).
        block_tokens: tokens per block; only whole blocks are shared.
        dtype, device: the KV dtype and the device the model runs on.
    """

    def __init__(self, config, capacity_tokens: int, block_tokens: int = 256,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        # decided from the cache transformers builds: some configs (Mistral, Phi-3) set a window without layer_types
        if any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=config).layers):
            raise OverspillError("prefix reuse needs full-attention layers; this model has sliding-window layers")
        if getattr(config.get_text_config(), "kv_lora_rank", None):  # MLA: the pool's per-head K/V shape is not its cache
            raise OverspillError("prefix reuse does not hold multi-head latent attention's KV (DeepSeek) yet; "
                                 "leave the prefix cache off")
        self.layers, self.kv_heads, self.head_dim = kv_dims(config)
        self.block_tokens, self.dtype, self.device = block_tokens, dtype, torch.device(device)
        blocks = capacity_tokens // block_tokens
        if blocks < 1:
            raise OverspillError(f"prefix cache of {capacity_tokens} tokens holds no block of {block_tokens}")
        shape = (self.layers, blocks, block_tokens, self.kv_heads, self.head_dim)
        nbytes = blocks * self.layers * block_tokens * self.kv_heads * self.head_dim * dtype.itemsize
        pinned = self.device.type == "cuda"
        self.pool_k = host_tensor(shape, dtype, pinned)
        self.pool_v = host_tensor(shape, dtype, pinned)
        # prompts are written to the pool only at `finish`: no lookup may hit their blocks before then
        self.manager = KVBlockManager(block_tokens, 0, blocks, bytes_per_block=2 * nbytes // blocks,
                                      share_unwritten=False)
        self._ids = itertools.count()

    @classmethod
    def for_model(cls, model, nbytes: int, block_tokens: int = 64) -> "PrefixCache":
        """A pool of about `nbytes` (K and V, all layers) for this model's dtype and device."""
        layers, kv_heads, head_dim = kv_dims(model.config)
        param = next(model.parameters())
        per_token = 2 * layers * kv_heads * head_dim * param.element_size()
        if nbytes < per_token * block_tokens:
            raise OverspillError(f"a prefix cache of {nbytes} bytes holds no block of {block_tokens} tokens "
                                 f"({per_token * block_tokens} bytes for this model); give it more or leave it off")
        return cls(model.config, nbytes // per_token, block_tokens, param.dtype, param.device)

    def start(self, token_ids: list[int], cache=None) -> Lease:
        """Hold the longest cached prefix of `token_ids` (and the prompt's new blocks) until `finish`
        or `abort`; with an empty batch-1 `cache`, copy that prefix's KV into it.

        The copy goes layer by layer, so the device holds one layer's prefix beside the cache. If it fails,
        a `TieredCache` is closed, so that the blocks its host layers took go back to their manager."""
        seq_id = next(self._ids)
        alloc = self.manager.allocate(seq_id, token_ids, tier=KVTier.HOST)
        n, bt = alloc.cached_tokens, self.block_tokens
        if n and cache is not None:
            try:
                refs = [ref.index for ref in alloc.blocks[: n // bt]]
                for layer in range(self.layers):
                    lk, lv = (self._gather(pool, refs, layer) for pool in (self.pool_k, self.pool_v))
                    cache.update(lk, lv, layer)
            except BaseException:  # e.g. out of device memory: release the blocks, the caller computes it all
                self.manager.discard(seq_id, n // bt)
                if isinstance(cache, TieredCache):
                    cache.close()
                raise
        return Lease(seq_id, n, alloc)

    def _gather(self, pool: torch.Tensor, refs: list[int], layer: int) -> torch.Tensor:
        """One layer's KV of pool blocks `refs`, as attention's [1, heads, tokens, dim] on the device."""
        out = torch.empty((len(refs), self.block_tokens, self.kv_heads, self.head_dim), dtype=self.dtype,
                          device=self.device)
        for j, index, count in _runs(refs):  # pinned views: asynchronous copies
            out[j : j + count].copy_(pool[layer, index : index + count], non_blocking=True)
        return out.reshape(-1, self.kv_heads, self.head_dim).transpose(0, 1).unsqueeze(0)

    def finish(self, lease: Lease, cache, token_ids: list[int], row: int = 0, offset: int = 0) -> None:
        """Store the prompt's newly computed full blocks, then release the lease.

        `row` and `offset` locate the prompt in a batched cache: its batch row, and the left padding
        before its first token."""
        bt = self.block_tokens
        full = len(token_ids) // bt
        first = lease.cached_tokens // bt
        table = self.manager.block_table(lease.seq_id)
        if full > first:
            runs = _runs([ref.index for ref in table[first:full]])
            for layer in range(self.layers):
                k, v = layer_kv(cache, layer, offset + first * bt, offset + full * bt, row)
                k, v = (t.reshape(full - first, bt, self.kv_heads, self.head_dim) for t in (k, v))
                for j, index, count in runs:  # stream-ordered before any later lookup's copies: no host sync
                    self.pool_k[layer, index : index + count].copy_(k[j : j + count], non_blocking=True)
                    self.pool_v[layer, index : index + count].copy_(v[j : j + count], non_blocking=True)
        self.manager.commit(lease.seq_id)
        self.manager.free(lease.seq_id)

    def abort(self, lease: Lease) -> None:
        """Release a request whose prompt KV was not computed: its new blocks are forgotten."""
        self.manager.discard(lease.seq_id, lease.cached_tokens // self.block_tokens)


def _runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """(position, first pool index, length) of each run of consecutive pool indices."""
    runs: list[tuple[int, int, int]] = []
    for j, index in enumerate(indices):
        if runs and runs[-1][1] + runs[-1][2] == index:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((j, index, 1))
    return runs
