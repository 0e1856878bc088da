"""Prefix hashes of KV blocks: one full block's key, chained over every token before its end.

Pure Python. Equal across processes and machines, so a prefix is recognised wherever it was first seen.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

__all__ = ["ROOT_HASH", "block_hash", "prefix_hashes"]

ROOT_HASH = 0  # parent hash of a sequence's first block


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
