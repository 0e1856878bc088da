"""Block bookkeeping for the tiered KV cache: which physical block of which tier holds which tokens.

Pure Python (no torch), like nano-vllm's `block_manager.py` and the scheduler side of vLLM v1
`kv_offload`: this module decides and records; `kv.py` owns the tensors and moves the bytes.

KV lives in blocks of `block_tokens` tokens in the GPU tier or the pinned-host tier. A full
("sealed") block is keyed by a hash chained over every token up to its end, so a later prompt
sharing that prefix reuses it from either tier and skips that part of prefill. Unreferenced sealed
blocks stay cached and are evicted LRU first; referenced or move-pinned blocks never are.
Sequences hold logical blocks whose `BlockRef` changes only when a move completes (one update
serves every sharer): re-read `block_table` after completing moves. Prompt blocks are registered
at `allocate`, so their KV must be written in that step (each layer writes before attention reads);
with `share_unwritten=False` they are shared only after `commit`, for callers whose prefill of one
request can overlap another request's lookup. A sequence admitted by its worst case (prompt + most
new tokens) `reserve`s its blocks ahead: they are held, empty, until `append` fills them.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import struct
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import OverspillError

__all__ = [
    "Allocation", "BlockInfo", "BlockRef", "KVBlockManager", "KVCapacityError", "KVTier",
    "KVUsage", "Move", "TierUsage", "block_hash", "prefix_hashes",
]

ROOT_HASH = 0  # parent hash of a sequence's first block


class KVTier(str, enum.Enum):
    """Where a KV block lives."""

    GPU = "gpu"  # device memory, read in place by attention
    HOST = "host"  # pinned host memory, copied in with its layer's weights


TIERS = (KVTier.GPU, KVTier.HOST)  # where a fresh block goes when no tier is asked for: GPU first


class BlockRef(NamedTuple):
    """A physical block: its tier and its index in that tier's block array (what `kv.py` indexes)."""

    tier: KVTier
    index: int


class KVCapacityError(OverspillError):
    """No free or evictable block is left: every block is referenced or pinned by a pending move."""


def block_hash(parent: int, tokens: Sequence[int]) -> int:
    """Hash of one full block chained onto its parent's, so it names the whole prefix.

    blake2b of fixed-width bytes: equal across processes and machines (`hash()` is salted).
    """
    data = parent.to_bytes(16, "little") + struct.pack(f"<{len(tokens)}q", *tokens)
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "little")


def prefix_hashes(token_ids: Sequence[int], block_tokens: int) -> list[int]:
    """Chained hashes of the full blocks of `token_ids`; a trailing partial block has none."""
    hashes, h = [], ROOT_HASH
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        h = block_hash(h, token_ids[start : start + block_tokens])
        hashes.append(h)
    return hashes


@dataclass(frozen=True)
class Allocation:
    """What `allocate` decided for a new sequence."""

    seq_id: Hashable
    blocks: tuple[BlockRef, ...]  # block table in token order
    cached_tokens: int  # leading tokens whose KV already sits in `blocks`: prefill starts here
    promote: tuple[BlockRef, ...]  # HOST-tier blocks of the cached prefix: candidates to move to GPU


@dataclass(frozen=True)
class Move:
    """A pending copy of one block between tiers; both ends stay pinned until complete or abort."""

    move_id: int
    src: BlockRef
    dst: BlockRef


@dataclass(frozen=True)
class BlockInfo:
    """One occupied physical block, for debugging, tests and the server's stats."""

    ref: BlockRef
    ref_count: int  # sequences whose table holds it
    prefix_hash: int | None  # None while partial, or when its tokens were never given
    tokens: int
    last_use: int  # manager tick of the last allocate/append/free/move touching it
    pinned: bool  # source or reserved destination of a pending move
    evictable: bool  # cached: sealed, unreferenced, unpinned


@dataclass(frozen=True)
class TierUsage:
    """Block and byte counts of one tier; free + used + cached == total."""

    tier: KVTier
    total_blocks: int
    used_blocks: int  # referenced by a sequence or pinned by a pending move
    free_blocks: int
    cached_blocks: int  # reusable by a prefix hit, evictable on demand
    total_bytes: int
    used_bytes: int
    free_bytes: int
    cached_bytes: int
    empty_blocks: int = 0  # used blocks holding no token yet: `reserve`d ahead of their tokens

    @property
    def available_blocks(self) -> int:
        """Blocks an allocation can take now (free, or evicted from the cache)."""
        return self.free_blocks + self.cached_blocks


@dataclass(frozen=True)
class KVUsage:
    """Accounting for the planner and the server: both tiers plus prefix-cache statistics."""

    gpu: TierUsage
    host: TierUsage
    prefix_lookups: int  # successful `allocate` calls
    lookup_tokens: int  # prompt tokens looked up
    hit_tokens: int  # prompt tokens served from cache
    evicted_blocks: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity, a key of the LRU
class _Block:
    """A logical block; `loc` is where its bytes are now."""

    loc: BlockRef
    last_use: int
    ref_count: int = 1
    hash: int | None = None
    tokens: int = 0
    move: Move | None = None
    unwritten: bool = False  # registered, but no lookup may hit it before `commit`


@dataclass(slots=True)
class _Seq:
    blocks: list[_Block]
    n_tokens: int
    partial: list[int]  # token ids of the unsealed last block
    parent: int | None  # hash of the last sealed block; None once token ids went missing


class KVBlockManager:
    """Physical KV blocks of two tiers, shared by prefix hash, evicted LRU, moved in two phases.

    Args:
        block_tokens: tokens per block.
        gpu_blocks, host_blocks: physical blocks per tier.
        bytes_per_block: bytes of one block (all layers, K and V), for `usage()`.
        share_unwritten: whether a prompt's blocks are reusable from `allocate` on (False: from `commit`).
    """

    def __init__(self, block_tokens: int, gpu_blocks: int, host_blocks: int, *, bytes_per_block: int = 0,
                 share_unwritten: bool = True):
        if block_tokens < 1 or min(gpu_blocks, host_blocks, bytes_per_block) < 0:
            raise ValueError(f"bad KV block geometry: {block_tokens=} {gpu_blocks=} {host_blocks=} "
                             f"{bytes_per_block=}")
        self.block_tokens, self.bytes_per_block = block_tokens, bytes_per_block
        self.share_unwritten = share_unwritten
        self._slots: dict[KVTier, list[_Block | None]] = {KVTier.GPU: [None] * gpu_blocks,
                                                          KVTier.HOST: [None] * host_blocks}
        self._free = {t: deque(range(len(s))) for t, s in self._slots.items()}
        self._empty = {t: 0 for t in KVTier}  # referenced blocks holding no token
        self._lru: dict[KVTier, OrderedDict[_Block, None]] = {t: OrderedDict() for t in KVTier}  # LRU first
        self._index: dict[int, _Block] = {}  # prefix hash -> the one block registered for reuse
        self._seqs: dict[Hashable, _Seq] = {}
        self._moves: dict[int, _Block] = {}
        self._move_ids = itertools.count()
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
        promote = tuple(b.loc for b in hits if b.loc.tier is KVTier.HOST and b.move is None)
        return Allocation(seq_id, tuple(b.loc for b in blocks), len(hits) * bt, promote)

    def append(
        self, seq_id: Hashable, n_tokens: int = 1, token_ids: Sequence[int] | None = None
    ) -> tuple[BlockRef, ...]:
        """Grow a sequence by `n_tokens` (by `len(token_ids)` when ids are given); returns new blocks.

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
            self._check_capacity(fresh, TIERS)
            new = [self._new_block(TIERS) for _ in range(fresh)]
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

    def resize(self, tier: KVTier, blocks: int) -> None:
        """Give `tier` `blocks` physical blocks, e.g. a GPU tier for the running sequences of a
        manager first built for a host-memory prefix pool. Shrinking drops free blocks only.

        Raises:
            ValueError: a block past the new size is held, cached or the destination of a move.
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
        """Where a sequence's blocks are now, in token order (changes when a move completes)."""
        return tuple(b.loc for b in self._seq(seq_id).blocks)

    def num_tokens(self, seq_id: Hashable) -> int:
        return self._seq(seq_id).n_tokens

    def prepare_move(self, block: BlockRef, to_tier: KVTier) -> Move:
        """Reserve a block in `to_tier` for a copy of `block`; pin both until complete or abort.

        May evict the LRU cached block of `to_tier` to make room.

        Raises:
            KVCapacityError: `to_tier` has no free or evictable block; nothing is changed.
        """
        blk = self._slots[block.tier][block.index]
        if blk is None or blk.loc != block:
            raise ValueError(f"{block} holds no block (free, or the destination of a pending move)")
        if blk.move is not None:
            raise ValueError(f"{block} is already moving ({blk.move})")
        if block.tier is to_tier:
            raise ValueError(f"{block} is already in the {to_tier.value} tier")
        index = self._take(to_tier)
        if index is None:
            raise KVCapacityError(f"cannot move {block} to the {to_tier.value} tier: {self._describe()}")
        self._tick += 1
        self._lru[block.tier].pop(blk, None)  # pinned: not evictable while the copy runs
        self._slots[to_tier][index] = blk
        blk.move = Move(next(self._move_ids), block, BlockRef(to_tier, index))
        self._moves[blk.move.move_id] = blk
        return blk.move

    def complete_move(self, move: Move) -> None:
        """The bytes have arrived: the block now lives at `move.dst` and its source is freed."""
        self._finish(move, done=True)

    def abort_move(self, move: Move) -> None:
        """The copy did not happen: release the reserved destination; the block stays at `move.src`."""
        self._finish(move, done=False)

    def pending_moves(self) -> tuple[Move, ...]:
        return tuple(b.move for b in self._moves.values())  # type: ignore[misc]

    def block_info(self, ref: BlockRef) -> BlockInfo | None:
        """State of one physical block; None when it is free."""
        blk = self._slots[ref.tier][ref.index]
        if blk is None:
            return None
        if blk.loc != ref:  # reserved destination of a pending move
            return BlockInfo(ref, 0, None, 0, blk.last_use, pinned=True, evictable=False)
        pinned, cached = blk.move is not None, self._is_cached(blk)
        return BlockInfo(ref, blk.ref_count, blk.hash, blk.tokens, blk.last_use, pinned, cached)

    def eviction_order(self, tier: KVTier) -> tuple[BlockRef, ...]:
        """Cached blocks of a tier, next to be evicted first (e.g. to demote GPU blocks to HOST)."""
        return tuple(b.loc for b in self._lru[tier])

    def usage(self) -> KVUsage:
        def tier(t: KVTier) -> TierUsage:
            blocks = (len(self._slots[t]), len(self._slots[t]) - len(self._free[t]) - len(self._lru[t]),
                      len(self._free[t]), len(self._lru[t]))
            return TierUsage(t, *blocks, *(b * self.bytes_per_block for b in blocks), self._empty[t])

        return KVUsage(tier(KVTier.GPU), tier(KVTier.HOST), self._lookups, self._lookup_tokens,
                       self._hit_tokens, self._evicted)

    def _seq(self, seq_id: Hashable) -> _Seq:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        return seq

    def _finish(self, move: Move, done: bool) -> None:
        blk = self._moves.pop(move.move_id, None)
        if blk is None or blk.move != move:
            raise ValueError(f"{move} is not pending")
        self._tick += 1
        self._free_slot(move.src if done else move.dst)
        blk.move = None
        if done:
            if not blk.tokens:
                self._empty[move.src.tier] -= 1
                self._empty[move.dst.tier] += 1
            blk.loc, blk.last_use = move.dst, self._tick
        if blk.ref_count == 0:
            self._release(blk)

    def _free_slot(self, ref: BlockRef) -> None:
        self._slots[ref.tier][ref.index] = None
        self._free[ref.tier].append(ref.index)

    def _is_cached(self, blk: _Block) -> bool:
        return blk in self._lru[blk.loc.tier]

    def _describe(self) -> str:
        tiers = ", ".join(f"{t.value} {len(self._free[t])} free + {len(self._lru[t])} cached of "
                          f"{len(self._slots[t])}" for t in KVTier)
        return f"{tiers}; {len(self._seqs)} sequences and {len(self._moves)} pending moves hold the rest"

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
        if blk.ref_count == 0 and blk.move is None:
            self._release(blk)

    def _release(self, blk: _Block) -> None:
        """An unreferenced, unpinned block: cached if registered for reuse, else freed."""
        if blk.hash is not None and self._index.get(blk.hash) is blk:
            blk.last_use = self._tick  # the LRU stays ordered by last use
            self._lru[blk.loc.tier][blk] = None
        else:
            if not blk.tokens:
                self._empty[blk.loc.tier] -= 1
            self._free_slot(blk.loc)
