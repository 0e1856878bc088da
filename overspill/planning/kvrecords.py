"""The KV block manager's vocabulary: tiers, block references, what it decided and what it counts.

Pure Python, frozen records (plus the capacity error), shared by `kvblocks` and its callers.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import OverspillError

__all__ = ["Allocation", "BlockInfo", "BlockRef", "KVCapacityError", "KVTier", "KVUsage", "TIERS", "TierUsage"]


class KVTier(str, enum.Enum):
    """Where a KV block lives. A block is `block_tokens` tokens of every layer, except in HOST_LAYER."""

    GPU = "gpu"  # device memory, read in place by attention
    HOST = "host"  # a pinned host block array (the prefix pool), copied into a cache when a prompt reuses it
    # pinned host memory of one host-tier layer (a `TieredCache`), staged on the device with that layer
    # each step; a block is `block_tokens` tokens of one layer, addressed by the layer's own buffer
    HOST_LAYER = "host_layer"


TIERS = (KVTier.GPU, KVTier.HOST)  # where a fresh block goes when no tier is asked for: GPU first


class BlockRef(NamedTuple):
    """A physical block: its tier and its index in that tier's block array (what the pool indexes)."""

    tier: KVTier
    index: int


class KVCapacityError(OverspillError):
    """No free or evictable block is left: every block is referenced."""


@dataclass(frozen=True)
class Allocation:
    """What `allocate` decided for a new sequence."""

    seq_id: Hashable
    blocks: tuple[BlockRef, ...]  # block table in token order
    cached_tokens: int  # leading tokens whose KV already sits in `blocks`: prefill starts here


@dataclass(frozen=True)
class BlockInfo:
    """One occupied physical block, for debugging, tests and the server's stats."""

    ref: BlockRef
    ref_count: int  # sequences whose table holds it
    prefix_hash: int | None  # None while partial, or when its tokens were never given
    tokens: int
    last_use: int  # manager tick of the last allocate/append/truncate/free touching it
    evictable: bool  # cached: sealed and unreferenced


@dataclass(frozen=True)
class TierUsage:
    """Block and byte counts of one tier; free + used + cached == total."""

    tier: KVTier
    total_blocks: int
    used_blocks: int  # referenced by a sequence
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
    """Accounting for the planner and the server: every tier plus prefix-cache statistics."""

    gpu: TierUsage
    host: TierUsage
    host_layer: TierUsage
    prefix_lookups: int  # successful `allocate` calls
    lookup_tokens: int  # prompt tokens looked up
    hit_tokens: int  # prompt tokens served from cache
    evicted_blocks: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0
