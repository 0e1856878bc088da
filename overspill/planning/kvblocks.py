"""`KVBlockManager`: which physical block of which tier holds which tokens of which sequence.

Pure Python (no torch), like nano-vllm's `block_manager.py` and the scheduler side of vLLM v1
`kv_offload`: this module decides and records; `runtime.kv` and `runtime.prefix` own the tensors.
One manager counts every KV block of a serving engine: its running requests' (GPU tier), its prefix
pool's (HOST) and its host-tier layers' (HOST_LAYER); see `kvrecords.KVTier`.

KV lives in blocks of `block_tokens` tokens. A full ("sealed") block is keyed by a hash chained over
every token up to its end (`kvhash`), so a later prompt sharing that prefix reuses it and skips that
part of prefill. Unreferenced sealed blocks stay cached and are evicted LRU first; referenced blocks
never are. Prompt blocks are registered at `allocate`, so their KV must be written in that step
(each layer writes before attention reads); with `share_unwritten=False` they are shared only after
`commit`, for callers whose prefill of one request can overlap another request's lookup. A sequence
admitted by its worst case (prompt + most new tokens) `reserve`s its blocks ahead: they are held,
empty, until `append` fills them. `truncate` drops a sequence's last tokens and gives back the
blocks they emptied (a cropped cache).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from .kvhash import ROOT_HASH, block_hash, prefix_hashes
from .kvrecords import TIERS, Allocation, BlockInfo, BlockRef, KVCapacityError, KVTier, KVUsage, TierUsage

__all__ = [
    "Allocation", "BlockInfo", "BlockRef", "KVBlockManager", "KVCapacityError", "KVTier",
    "KVUsage", "TierUsage", "block_hash", "prefix_hashes",
]


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity, a key of the LRU
class _Block:
    """A logical block at `loc`."""

    loc: BlockRef
    last_use: int
    ref_count: int = 1
    hash: int | None = None
    tokens: int = 0
    unwritten: bool = False  # registered, but no lookup may hit it before `commit`


@dataclass(slots=True)
class _Seq:
    blocks: list[_Block]
    n_tokens: int
    partial: list[int]  # token ids of the unsealed last block
    parent: int | None  # hash of the last sealed block; None once token ids went missing


class KVBlockManager:
    """Physical KV blocks of each tier, shared by prefix hash, evicted LRU.

    Args:
        block_tokens: tokens per block.
        gpu_blocks, host_blocks, layer_blocks: physical blocks of the GPU, HOST and HOST_LAYER tiers.
        bytes_per_block: bytes of one block (all layers, K and V), for `usage()`; `resize` sets a
            tier's own (a HOST_LAYER block is one layer's).
        share_unwritten: whether a prompt's blocks are reusable from `allocate` on (False: from `commit`).
    """

    def __init__(self, block_tokens: int, gpu_blocks: int, host_blocks: int, *, layer_blocks: int = 0,
                 bytes_per_block: int = 0, share_unwritten: bool = True):
        if block_tokens < 1 or min(gpu_blocks, host_blocks, layer_blocks, bytes_per_block) < 0:
            raise ValueError(f"bad KV block geometry: {block_tokens=} {gpu_blocks=} {host_blocks=} "
                             f"{layer_blocks=} {bytes_per_block=}")
        self.block_tokens, self.bytes_per_block = block_tokens, bytes_per_block
        self.share_unwritten = share_unwritten
        sizes = {KVTier.GPU: gpu_blocks, KVTier.HOST: host_blocks, KVTier.HOST_LAYER: layer_blocks}
        self._slots: dict[KVTier, list[_Block | None]] = {t: [None] * n for t, n in sizes.items()}
        self._free = {t: deque(range(len(s))) for t, s in self._slots.items()}
        self._bytes = {t: bytes_per_block for t in KVTier}
        self._empty = {t: 0 for t in KVTier}  # referenced blocks holding no token
        self._lru: dict[KVTier, OrderedDict[_Block, None]] = {t: OrderedDict() for t in KVTier}  # LRU first
        self._index: dict[int, _Block] = {}  # prefix hash -> the one block registered for reuse
        self._seqs: dict[Hashable, _Seq] = {}
        self._tick = 0
        self._lookups = self._lookup_tokens = self._hit_tokens = self._evicted = 0

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], *, tier: KVTier | None = None) -> Allocation:
        """Give a new sequence its blocks, reusing the longest cached run of leading full blocks.

        Fresh blocks go to `tier` when given (a pool that lives in one tier); else to the GPU tier
        while it has free or evictable blocks, then to HOST: a new block is hot (attention reads it
        every step), a cached one only might be reused.

        Raises:
            KVCapacityError: not enough free or evictable blocks; nothing is changed.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        bt, n = self.block_tokens, len(token_ids)
        hashes = prefix_hashes(token_ids, bt)
        hits: list[_Block] = []
        for h in hashes[: max(n - 1, 0) // bt]:  # leave one prompt token to compute: we need its logits
            blk = self._index.get(h)
            if blk is None or blk.unwritten:
                break
            hits.append(blk)
        fresh = -(-n // bt) - len(hits)
        tiers = (tier,) if tier is not None else TIERS
        self._check_capacity(fresh, tiers, reused=sum(self._is_cached(b) and b.loc.tier in tiers for b in hits))
        self._tick += 1
        for blk in hits:
            self._ref(blk)
        blocks = hits + [self._new_block(tiers) for _ in range(fresh)]
        for i in range(len(hits), len(blocks)):
            self._fill(blocks[i], min(bt, n - i * bt))
            if i < len(hashes):
                self._seal(blocks[i], hashes[i])
                blocks[i].unwritten = not self.share_unwritten
        partial = list(token_ids[len(hashes) * bt :])
        self._seqs[seq_id] = _Seq(blocks, n, partial, hashes[-1] if hashes else ROOT_HASH)
        self._lookups += 1
        self._lookup_tokens += n
        self._hit_tokens += len(hits) * bt
        return Allocation(seq_id, tuple(b.loc for b in blocks), len(hits) * bt)

    def append(self, seq_id: Hashable, n_tokens: int = 1, token_ids: Sequence[int] | None = None, *,
               tier: KVTier | None = None) -> tuple[BlockRef, ...]:
        """Grow a sequence by `n_tokens` (by `len(token_ids)` when ids are given); returns new blocks,
        which go to `tier` when given, else as in `allocate`.

        A block that fills up is sealed with its prefix hash so later requests can reuse it. Without
        `token_ids` the hash chain breaks: this and later blocks of the sequence are never shared.

        Raises:
            KVCapacityError: a new block is needed and none can be freed; nothing is changed.
        """
        seq = self._seq(seq_id)
        if token_ids is not None:
            n_tokens = len(token_ids)
        if n_tokens < 0:
            raise ValueError(f"cannot append {n_tokens} tokens")
        bt, start, total = self.block_tokens, seq.n_tokens, seq.n_tokens + n_tokens
        fresh = -(-total // bt) - len(seq.blocks)  # <= 0 while `reserve`d blocks remain
        new = []
        if fresh > 0:  # (a decode step of a reserved sequence skips this: once per row and step)
            tiers = (tier,) if tier is not None else TIERS
            self._check_capacity(fresh, tiers)
            new = [self._new_block(tiers) for _ in range(fresh)]
            seq.blocks.extend(new)
        self._tick += 1
        if token_ids is None and n_tokens:
            seq.parent = None
        pos = start
        while pos < total:  # one iteration per block touched
            blk = seq.blocks[pos // bt]
            take = min(bt - pos % bt, total - pos)
            if seq.parent is not None:
                seq.partial.extend(token_ids[pos - start : pos - start + take])  # type: ignore[index]
            self._fill(blk, take)
            blk.last_use, pos = self._tick, pos + take
            if blk.tokens == bt:
                if seq.parent is not None:
                    seq.parent = block_hash(seq.parent, seq.partial)
                    self._seal(blk, seq.parent)
                seq.partial = []
        seq.n_tokens = total
        return tuple(b.loc for b in new) if new else ()

    def truncate(self, seq_id: Hashable, tokens: int) -> None:
        """Keep a sequence's first `tokens` tokens: the blocks after them go back (reserved ones too;
        sealed ones stay cached, their bytes still hold that prefix), and a sealed block cut into is
        unsealed, since its tail will be written again.

        Raises:
            ValueError: `tokens` is more than the sequence holds, or the cut falls inside a block
                another sequence shares (its bytes cannot change under that sequence).
        """
        seq = self._seq(seq_id)
        if not 0 <= tokens <= seq.n_tokens:
            raise ValueError(f"cannot truncate sequence {seq_id!r} of {seq.n_tokens} tokens to {tokens}")
        bt = self.block_tokens
        keep, rest = -(-tokens // bt), tokens % bt
        cut = seq.blocks[keep - 1] if rest else None
        if cut is not None and cut.ref_count > 1:
            raise ValueError(f"cannot truncate sequence {seq_id!r} inside a block {cut.ref_count} sequences share")
        self._tick += 1
        while len(seq.blocks) > keep:  # tail first, as `free` does
            self._unref(seq.blocks.pop())
        if cut is not None and cut.tokens > rest:
            if cut.hash is not None and self._index.get(cut.hash) is cut:
                del self._index[cut.hash]
            if cut.hash is not None:
                seq.partial, seq.parent = [], None  # the cut block's ids were not kept: the chain ends here
            else:
                seq.partial = seq.partial[:rest]
            cut.hash, cut.tokens, cut.last_use = None, rest, self._tick
        elif cut is None:  # on a block edge: the chain goes on from the last kept block, if it is sealed
            seq.partial = []
            seq.parent = seq.blocks[-1].hash if seq.blocks else ROOT_HASH
        seq.n_tokens = tokens

    def reserve(self, seq_id: Hashable, blocks: int, tier: KVTier = KVTier.GPU) -> None:
        """Hold `blocks` blocks of `tier` for a sequence, so that its appends up to `blocks *
        block_tokens` tokens need no new block; grows or shrinks the table of a known sequence.

        A new sequence starts empty and without token ids, so its blocks are never shared (as with
        `append` without ids). Shrinking drops empty trailing blocks only.

        Raises:
            KVCapacityError: `tier` has too few free or evictable blocks; nothing is changed.
            ValueError: shrinking would drop blocks that hold tokens.
        """
        seq = self._seqs.get(seq_id)
        have, filled = (len(seq.blocks), -(-seq.n_tokens // self.block_tokens)) if seq is not None else (0, 0)
        if blocks < filled:
            raise ValueError(f"sequence {seq_id!r} holds {filled} blocks of tokens: cannot reserve {blocks}")
        self._check_capacity(blocks - have, (tier,))
        self._tick += 1
        if seq is None:
            seq = self._seqs[seq_id] = _Seq([], 0, [], None)
        while len(seq.blocks) < blocks:
            seq.blocks.append(self._new_block((tier,)))
        while len(seq.blocks) > blocks:
            self._unref(seq.blocks.pop())

    def resize(self, tier: KVTier, blocks: int, *, bytes_per_block: int | None = None) -> None:
        """Give `tier` `blocks` physical blocks (of `bytes_per_block` bytes, when given), e.g. a GPU tier
        for the running sequences of a manager first built for a host-memory prefix pool. Shrinking
        drops free blocks only.

        Raises:
            ValueError: a block past the new size is held or cached.
        """
        slots = self._slots[tier]
        if blocks < 0 or any(blk is not None for blk in slots[blocks:]):
            raise ValueError(f"cannot resize the {tier.value} tier to {blocks} blocks: {self._describe()}")
        if blocks < len(slots):
            del slots[blocks:]
            self._free[tier] = deque(i for i in self._free[tier] if i < blocks)
        else:
            self._free[tier].extend(range(len(slots), blocks))
            slots.extend([None] * (blocks - len(slots)))
        if bytes_per_block is not None:
            self._bytes[tier] = bytes_per_block

    def commit(self, seq_id: Hashable) -> None:
        """The sequence's prompt KV is written: its blocks may now be reused (see `share_unwritten`)."""
        for blk in self._seq(seq_id).blocks:
            blk.unwritten = False

    def free(self, seq_id: Hashable) -> None:
        """Drop a sequence's references: sealed blocks stay cached (evictable), the rest are freed."""
        seq = self._seqs.pop(seq_id, None) or self._seq(seq_id)  # the latter raises KeyError
        self._tick += 1
        for blk in reversed(seq.blocks):  # tail first: it is useless without its prefix, so evict it first
            self._unref(blk)

    def discard(self, seq_id: Hashable, valid_blocks: int = 0) -> None:
        """Free a sequence whose KV was not all written (failed or cancelled prefill).

        Blocks after the first `valid_blocks` that only this sequence holds are unregistered, so no
        later prompt reuses bytes that were never written.
        """
        seq = self._seq(seq_id)
        for blk in seq.blocks[valid_blocks:]:
            if blk.hash is not None and blk.ref_count == 1 and self._index.get(blk.hash) is blk:
                del self._index[blk.hash]
                blk.hash = None
        self.free(seq_id)

    def block_table(self, seq_id: Hashable) -> tuple[BlockRef, ...]:
        """Where a sequence's blocks are, in token order."""
        return tuple(b.loc for b in self._seq(seq_id).blocks)

    def num_tokens(self, seq_id: Hashable) -> int:
        return self._seq(seq_id).n_tokens

    def block_info(self, ref: BlockRef) -> BlockInfo | None:
        """State of one physical block; None when it is free."""
        blk = self._slots[ref.tier][ref.index]
        if blk is None:
            return None
        return BlockInfo(ref, blk.ref_count, blk.hash, blk.tokens, blk.last_use, self._is_cached(blk))

    def eviction_order(self, tier: KVTier) -> tuple[BlockRef, ...]:
        """Cached blocks of a tier, next to be evicted first."""
        return tuple(b.loc for b in self._lru[tier])

    def usage(self) -> KVUsage:
        def tier(t: KVTier) -> TierUsage:
            blocks = (len(self._slots[t]), len(self._slots[t]) - len(self._free[t]) - len(self._lru[t]),
                      len(self._free[t]), len(self._lru[t]))
            return TierUsage(t, *blocks, *(b * self._bytes[t] for b in blocks), self._empty[t])

        return KVUsage(tier(KVTier.GPU), tier(KVTier.HOST), tier(KVTier.HOST_LAYER), self._lookups,
                       self._lookup_tokens, self._hit_tokens, self._evicted)

    def _seq(self, seq_id: Hashable) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return seq

    def _is_cached(self, blk: _Block) -> bool:
        return blk in self._lru[blk.loc.tier]

    def _describe(self) -> str:
        tiers = ", ".join(f"{t.value} {len(self._free[t])} free + {len(self._lru[t])} cached of "
                          f"{len(self._slots[t])}" for t in KVTier)
        return f"{tiers}; {len(self._seqs)} sequences hold the rest"

    def _check_capacity(self, need: int, tiers: tuple[KVTier, ...], reused: int = 0) -> None:
        """Fail before changing anything; `reused` cached blocks of `tiers` are about to be referenced."""
        available = sum(len(self._free[t]) + len(self._lru[t]) for t in tiers) - reused
        if need > available:
            raise KVCapacityError(
                f"KV cache full: {need} blocks of {self.block_tokens} tokens needed, {available} can be "
                f"freed ({self._describe()}). Free finished sequences, admit fewer at once, or give the "
                "KV cache more memory."
            )

    def _take(self, tier: KVTier) -> int | None:
        """A physical index in `tier`: a free one, else the LRU cached block's (evicted)."""
        if self._free[tier]:
            return self._free[tier].popleft()
        if self._lru[tier]:
            blk, _ = self._lru[tier].popitem(last=False)
            del self._index[blk.hash]  # type: ignore[arg-type]
            self._evicted += 1
            return blk.loc.index
        return None

    def _new_block(self, tiers: tuple[KVTier, ...]) -> _Block:
        """An empty block of the first of `tiers` (GPU before HOST) with room."""
        for tier in tiers:
            index = self._take(tier)
            if index is not None:
                self._slots[tier][index] = blk = _Block(BlockRef(tier, index), self._tick)
                self._empty[tier] += 1
                return blk
        raise AssertionError("capacity was checked before allocating")

    def _fill(self, blk: _Block, tokens: int) -> None:
        if tokens and not blk.tokens:
            self._empty[blk.loc.tier] -= 1
        blk.tokens += tokens

    def _seal(self, blk: _Block, h: int) -> None:
        blk.hash = h
        self._index.setdefault(h, blk)  # a duplicate of a registered block stays private

    def _ref(self, blk: _Block) -> None:
        self._lru[blk.loc.tier].pop(blk, None)
        blk.ref_count += 1
        blk.last_use = self._tick

    def _unref(self, blk: _Block) -> None:
        blk.ref_count -= 1
        blk.last_use = self._tick
        if blk.ref_count == 0:
            self._release(blk)

    def _release(self, blk: _Block) -> None:
        """An unreferenced block: cached if registered for reuse, else freed."""
        if blk.hash is not None and self._index.get(blk.hash) is blk:
            self._lru[blk.loc.tier][blk] = None  # last_use was just set: the LRU stays ordered by it
        else:
            if not blk.tokens:
                self._empty[blk.loc.tier] -= 1
            self._slots[blk.loc.tier][blk.loc.index] = None
            self._free[blk.loc.tier].append(blk.loc.index)
