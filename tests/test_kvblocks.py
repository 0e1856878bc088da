"""Scenario tests of the KV block manager: prefix reuse, tiers, LRU eviction, reservation, truncation (no torch)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from overspill.errors import OverspillError
from overspill.planning.kvblocks import (
    BlockRef,
    KVBlockManager,
    KVCapacityError,
    KVTier,
    prefix_hashes,
)

ROOT = Path(__file__).resolve().parents[1]
GPU, HOST, LAYER = KVTier.GPU, KVTier.HOST, KVTier.HOST_LAYER
BT = 4  # tokens per block: small so scenarios stay readable


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def snapshot(m: KVBlockManager, seqs) -> tuple:
    """Everything observable, to assert that a failed call changed nothing."""
    return m.usage(), {s: m.block_table(s) for s in seqs}


def all_blocks(m: KVBlockManager):
    u = m.usage()
    for tier, total in ((GPU, u.gpu.total_blocks), (HOST, u.host.total_blocks), (LAYER, u.host_layer.total_blocks)):
        for i in range(total):
            yield BlockRef(tier, i), m.block_info(BlockRef(tier, i))


def check_invariants(m: KVBlockManager, seqs: dict, reserved: dict | None = None) -> None:
    """Args: `seqs`, expected token ids per sequence (None: appended without ids); `reserved`, blocks
    `reserve`d per sequence."""
    reserved = reserved or {}
    bt = m.block_tokens
    # per-tier accounting from a scan of every physical block matches usage()
    u = m.usage()
    for tu in (u.gpu, u.host, u.host_layer):
        infos = [info for ref, info in all_blocks(m) if ref.tier is tu.tier]
        empty = [i for ref, i in all_blocks(m) if ref.tier is tu.tier and i and not i.tokens]
        assert tu.free_blocks == sum(i is None for i in infos)
        assert tu.cached_blocks == sum(i is not None and i.evictable for i in infos)
        assert tu.free_blocks + tu.used_blocks + tu.cached_blocks == tu.total_blocks
        per_block = tu.total_bytes // tu.total_blocks if tu.total_blocks else m.bytes_per_block
        assert tu.used_bytes == tu.used_blocks * per_block and tu.cached_bytes == tu.cached_blocks * per_block
        assert tu.empty_blocks == len(empty)
        assert [m.block_info(r).last_use for r in m.eviction_order(tu.tier)] == sorted(
            m.block_info(r).last_use for r in m.eviction_order(tu.tier))
    # every table entry is live, referenced exactly once per table, and holds the right tokens
    uses = Counter(ref for s in seqs for ref in m.block_table(s))
    for s, tokens in seqs.items():
        table = m.block_table(s)
        assert m.num_tokens(s) == len(tokens) and len(table) == max(-(-len(tokens) // bt), reserved.get(s, 0))
        for i, ref in enumerate(table):
            info = m.block_info(ref)
            assert info is not None and info.ref_count >= 1 and not info.evictable
            assert info.tokens == max(min(bt, len(tokens) - i * bt), 0)
            known = None not in tokens[: (i + 1) * bt]
            expected = prefix_hashes(tokens[: (i + 1) * bt], bt)[i] if info.tokens == bt and known else None
            assert info.prefix_hash == expected  # an evicted and reused block would show another hash
    for ref, info in all_blocks(m):
        if info is None:
            continue
        assert info.ref_count == uses[ref] >= 0
        assert uses[ref] <= 1 or info.prefix_hash is not None  # shared only via a prefix hit
        assert info.ref_count > 0 or info.evictable  # nothing leaked
        assert not info.evictable or info.prefix_hash is not None


def test_shared_prefix_reuses_only_full_blocks() -> None:
    m = KVBlockManager(BT, gpu_blocks=8, host_blocks=0)
    prefix = toks(100, 10)  # 2.5 blocks
    a = m.allocate("a", prefix)
    # first request: nothing cached, three blocks (the third holds 2 tokens)
    assert a.cached_tokens == 0 and len(a.blocks) == 3
    b = m.allocate("b", prefix + toks(500, 6))
    # second request: the two full blocks are shared, prefill starts at token 8
    assert b.cached_tokens == 8 and len(b.blocks) == 4
    assert b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]
    assert m.block_info(a.blocks[0]).ref_count == 2 and m.block_info(a.blocks[2]).ref_count == 1
    # statistics count the lookups and the hit
    u = m.usage()
    assert (u.prefix_lookups, u.lookup_tokens, u.hit_tokens) == (2, 26, 8)
    check_invariants(m, {"a": prefix, "b": prefix + toks(500, 6)})


def test_unwritten_blocks_are_shared_only_after_commit() -> None:
    m = KVBlockManager(BT, gpu_blocks=12, host_blocks=0, share_unwritten=False)
    prompt = toks(0, 9)
    a = m.allocate("a", prompt)
    # a's prefill has not run yet: b must compute everything itself (a private duplicate of each block)
    b = m.allocate("b", prompt)
    assert b.cached_tokens == 0 and set(b.blocks).isdisjoint(a.blocks)
    m.commit("a")  # a's KV is written now
    c = m.allocate("c", prompt)
    assert c.cached_tokens == 8 and c.blocks[:2] == a.blocks[:2]
    # an aborted prefill leaves nothing behind that a later lookup could hit
    m.discard("b")
    m.commit("c")
    d = m.allocate("d", prompt)
    assert d.blocks[:2] == a.blocks[:2]
    check_invariants(m, {"a": prompt, "c": prompt, "d": prompt})


def test_identical_prompt_twice_shares_full_blocks_only() -> None:
    m = KVBlockManager(BT, gpu_blocks=8, host_blocks=0)
    prompt = toks(0, 10)
    a, b = m.allocate("a", prompt), m.allocate("b", prompt)
    # all full blocks reused; the partial last block is private to each sequence
    assert b.cached_tokens == 8 and b.blocks[:2] == a.blocks[:2] and b.blocks[2] != a.blocks[2]
    assert m.block_info(a.blocks[2]).prefix_hash is None
    # a block-aligned prompt still leaves its last block to compute: the model needs the last logits
    c, d = m.allocate("c", toks(50, 8)), m.allocate("d", toks(50, 8))
    assert d.cached_tokens == 4 and d.blocks[0] == c.blocks[0] and d.blocks[1] != c.blocks[1]
    # d's recomputed last block is a private duplicate: freeing leaves one cached copy per prefix
    m.free("d")
    assert m.block_info(c.blocks[1]).ref_count == 1 and m.usage().gpu.cached_blocks == 0
    check_invariants(m, {"a": prompt, "b": prompt, "c": toks(50, 8)})


def test_prefix_cached_in_host_tier_is_found() -> None:
    m = KVBlockManager(BT, gpu_blocks=0, host_blocks=4)
    # no GPU blocks at all: the prompt lands in HOST and stays cached there after free
    a = m.allocate("a", toks(0, 9))
    assert [r.tier for r in a.blocks] == [HOST] * 3
    m.free("a")
    assert m.usage().host.cached_blocks == 2 and m.usage().host.free_blocks == 2
    # the next request hits both HOST blocks
    b = m.allocate("b", toks(0, 9))
    assert b.cached_tokens == 8 and b.blocks[:2] == a.blocks[:2]


def test_gpu_full_spills_to_host_then_capacity_error() -> None:
    m = KVBlockManager(BT, gpu_blocks=2, host_blocks=2)
    # the first sequence fills the GPU tier
    assert [r.tier for r in m.allocate("a", toks(0, 8)).blocks] == [GPU, GPU]
    # the second spills to HOST
    assert [r.tier for r in m.allocate("b", toks(100, 6)).blocks] == [HOST, HOST]
    # both tiers full and everything referenced: a clear error, and nothing changed
    before = snapshot(m, ["a", "b"])
    full = r"KV cache full: 1 blocks .* 0 can be freed .*2 sequences"
    with pytest.raises(KVCapacityError, match=full) as e:
        m.allocate("c", toks(200, 1))
    assert isinstance(e.value, OverspillError) and "Free finished sequences" in str(e.value)
    assert snapshot(m, ["a", "b"]) == before
    # growing b past its partial block fails the same way, all or nothing
    with pytest.raises(KVCapacityError):
        m.append("b", token_ids=toks(300, 3))
    assert snapshot(m, ["a", "b"]) == before and m.num_tokens("b") == 6
    # freeing a makes room again
    m.free("a")
    assert m.allocate("c", toks(200, 1)).blocks[0].tier is GPU


def test_lru_eviction_order() -> None:
    m = KVBlockManager(BT, gpu_blocks=3, host_blocks=0)
    refs = {s: m.allocate(s, toks(10 * i, BT)).blocks[0] for i, s in enumerate("abc")}
    # free in the order a, c, b: that is the eviction order
    for s in "acb":
        m.free(s)
    assert m.eviction_order(GPU) == (refs["a"], refs["c"], refs["b"])
    # a new sequence takes the least recently used block: a's
    assert m.allocate("d", toks(90, BT)).blocks == (refs["a"],)
    assert m.usage().evicted_blocks == 1 and m.eviction_order(GPU) == (refs["c"], refs["b"])
    # a prefix hit takes c out of the cache; e's second block evicts b, the next least recent
    e = m.allocate("e", toks(20, BT + 1))
    assert e.cached_tokens == BT and e.blocks == (refs["c"], refs["b"]) and m.eviction_order(GPU) == ()
    # freeing e puts c back (its unsealed tail is simply freed), then d's block follows
    m.free("e")
    m.free("d")
    assert m.eviction_order(GPU) == (refs["c"], refs["a"]) and m.usage().gpu.free_blocks == 1


def test_free_caches_the_tail_first() -> None:
    m = KVBlockManager(BT, gpu_blocks=4, host_blocks=0)
    a = m.allocate("a", toks(0, 12))
    m.free("a")
    # the last block is evicted first: it is worthless once its prefix is gone
    assert m.eviction_order(GPU) == a.blocks[::-1]


def test_eviction_spares_referenced_blocks() -> None:
    m = KVBlockManager(BT, gpu_blocks=2, host_blocks=0)
    a = m.allocate("a", toks(0, BT))
    m.free("a")
    # a's block is cached (evictable) until a prefix hit references it again
    assert m.allocate("b", toks(0, BT + 1)).cached_tokens == BT
    with pytest.raises(KVCapacityError, match="1 sequences"):
        m.allocate("c", toks(90, 1))
    # freeing b caches a's block again (b's unsealed tail is freed), so c can take either
    m.free("b")
    assert m.eviction_order(GPU) == (a.blocks[0],)
    assert m.allocate("c", toks(90, 1)).blocks[0].tier is GPU


def test_usage_numbers() -> None:
    m = KVBlockManager(BT, gpu_blocks=4, host_blocks=6, bytes_per_block=1 << 20)
    m.allocate("a", toks(0, 10))  # 3 GPU blocks
    m.allocate("b", toks(100, 8))  # 1 GPU + 1 HOST
    m.free("b")  # both full: cached
    u = m.usage()
    assert (u.gpu.total_blocks, u.gpu.used_blocks, u.gpu.free_blocks, u.gpu.cached_blocks) == (4, 3, 0, 1)
    assert (u.host.total_blocks, u.host.used_blocks, u.host.free_blocks, u.host.cached_blocks) == (6, 0, 5, 1)
    assert u.gpu.total_bytes == 4 << 20 and u.host.cached_bytes == 1 << 20 and u.host.available_blocks == 6
    assert u.hit_rate == 0.0 and u.evicted_blocks == 0


def test_append_seals_blocks_for_reuse() -> None:
    m = KVBlockManager(BT, gpu_blocks=8, host_blocks=0)
    m.allocate("a", toks(0, 3))
    # one decoded token fills the first block: it is sealed with the hash of the whole prefix
    assert m.append("a", token_ids=[3]) == ()
    assert m.block_info(m.block_table("a")[0]).prefix_hash == prefix_hashes(toks(0, 4), BT)[0]
    # the next token needs a new block
    (new,) = m.append("a", token_ids=[4])
    assert m.block_table("a") [1] == new and m.num_tokens("a") == 5
    # several tokens at once cross a block boundary
    m.append("a", token_ids=toks(5, 6))
    assert m.num_tokens("a") == 11 and len(m.block_table("a")) == 3
    # a later prompt that repeats prompt + generated text reuses the generated blocks
    assert m.allocate("b", toks(0, 11)).cached_tokens == 8
    check_invariants(m, {"a": toks(0, 11), "b": toks(0, 11)})


def test_append_without_token_ids_is_never_shared() -> None:
    m = KVBlockManager(BT, gpu_blocks=8, host_blocks=0)
    m.allocate("a", toks(0, 2))
    # tokens of unknown ids: blocks fill up but carry no hash
    m.append("a", n_tokens=7)
    assert [m.block_info(r).prefix_hash for r in m.block_table("a")] == [None, None, None]
    # so freeing returns them all to the free list
    m.free("a")
    assert m.usage().gpu.free_blocks == 8


def test_reserve_holds_empty_blocks_that_appends_fill() -> None:
    """An engine admits a request by its worst case: its blocks are held, empty, and its tokens fill them."""
    m = KVBlockManager(BT, gpu_blocks=6, host_blocks=2)
    m.reserve("r", 3)  # prompt + most new tokens: 3 blocks of the GPU tier
    u = m.usage().gpu
    assert (u.used_blocks, u.empty_blocks, u.available_blocks) == (3, 3, 3)
    assert m.append("r", 5) == ()  # the tokens fill the reserved blocks: no new one
    assert m.num_tokens("r") == 5 and m.usage().gpu.empty_blocks == 1
    m.reserve("r", 2)  # shrink: the empty third block goes back
    assert m.usage().gpu.used_blocks == 2 and m.usage().gpu.empty_blocks == 0
    with pytest.raises(ValueError, match="cannot reserve 1"):
        m.reserve("r", 1)  # its second block holds a token
    m.reserve("q", 4)
    before = snapshot(m, ["r", "q"])
    with pytest.raises(KVCapacityError):
        m.reserve("z", 1)  # the GPU tier is full; HOST blocks do not count for a GPU reservation
    assert snapshot(m, ["r", "q"]) == before
    assert [m.block_info(ref).prefix_hash for ref in m.block_table("r")] == [None, None]  # never shared
    m.free("r")
    assert m.usage().gpu.free_blocks == 2 and m.usage().gpu.cached_blocks == 0
    check_invariants(m, {"q": []}, {"q": 4})


def test_allocate_into_one_tier_and_resize_a_tier() -> None:
    """A host-memory prefix pool and the engine's running sequences share one manager: the pool
    allocates in the HOST tier only, the engine adds a GPU tier for its reservations."""
    m = KVBlockManager(BT, gpu_blocks=0, host_blocks=4)
    m.allocate("p", toks(0, 9), tier=HOST)  # 3 host blocks
    m.resize(GPU, 5)
    assert m.usage().gpu.total_blocks == 5 and m.usage().gpu.free_blocks == 5
    with pytest.raises(KVCapacityError):
        m.allocate("x", toks(50, 8), tier=HOST)  # 2 blocks: 1 host block left, though the GPU has 5
    m.reserve("engine", 5)
    with pytest.raises(ValueError, match="cannot resize"):
        m.resize(GPU, 2)  # its blocks are held
    m.free("p")  # its two full blocks stay cached in the pool
    assert m.allocate("p2", toks(0, 10), tier=HOST).cached_tokens == 8
    m.free("engine")
    m.resize(GPU, 2)
    assert m.usage().gpu.total_blocks == 2 and m.usage().gpu.free_blocks == 2
    check_invariants(m, {"p2": toks(0, 10)})


def test_truncate_gives_back_the_blocks_after_the_cut() -> None:
    """A cropped cache (rejected drafts, a host-tier layer cut back) returns the blocks it emptied."""
    m = KVBlockManager(BT, gpu_blocks=6, host_blocks=0)
    m.allocate("a", toks(0, 10))  # blocks of 4, 4 and 2 tokens; the first two sealed
    m.truncate("a", 9)  # inside the unsealed tail: nothing goes back, its ids stay known
    assert m.num_tokens("a") == 9 and len(m.block_table("a")) == 3 and m.usage().gpu.used_blocks == 3
    m.append("a", token_ids=toks(9, 3))  # refilled with the same ids: sealed as if never cut
    assert m.allocate("b", toks(0, 13)).cached_tokens == 12
    m.free("b")
    assert m.allocate("c", toks(0, 9)).cached_tokens == 8  # c shares a's first two blocks
    with pytest.raises(ValueError, match="2 sequences share"):
        m.truncate("a", 6)
    m.free("c")
    m.truncate("a", 6)  # into a's own sealed second block: it is unsealed, the third goes back (cached)
    assert len(m.block_table("a")) == 2 and m.usage().gpu.cached_blocks == 1
    assert [m.block_info(r).prefix_hash is None for r in m.block_table("a")] == [False, True]
    m.append("a", token_ids=toks(50, 2))  # the chain ended at the cut: this block is never shared
    assert m.block_info(m.block_table("a")[1]).prefix_hash is None
    m.truncate("a", 4)  # on a block edge: the chain goes on from the sealed first block
    m.append("a", token_ids=toks(4, 4))
    assert m.block_info(m.block_table("a")[1]).prefix_hash == prefix_hashes(toks(0, 8), BT)[1]
    m.reserve("r", 3)
    m.append("r", 5)
    m.truncate("r", 0)  # reserved blocks go back too: a caller that reserves ahead reserves again
    assert m.block_table("r") == () and m.usage().gpu.empty_blocks == 0
    with pytest.raises(ValueError, match="cannot truncate"):
        m.truncate("r", 1)
    check_invariants(m, {"a": toks(0, 8), "r": []})


def test_host_layer_tier_is_apart_from_the_pool() -> None:
    """Host-tier KV layers count their blocks in HOST_LAYER: the pool's HOST blocks (indices into its
    array) never go to them, and a default allocation never lands there."""
    m = KVBlockManager(BT, gpu_blocks=1, host_blocks=2, layer_blocks=3, bytes_per_block=80)
    m.resize(LAYER, 3, bytes_per_block=10)  # a HOST_LAYER block is one layer's
    m.reserve("layer0", 0, LAYER)
    assert m.append("layer0", 9, tier=LAYER) == tuple(BlockRef(LAYER, i) for i in range(3))
    with pytest.raises(KVCapacityError):
        m.append("layer0", 4, tier=LAYER)  # the tier is full; GPU and HOST blocks are not its
    assert [r.tier for r in m.allocate("p", toks(0, 12)).blocks] == [GPU, HOST, HOST]
    u = m.usage()
    assert (u.host_layer.used_blocks, u.host_layer.used_bytes, u.host.used_bytes) == (3, 30, 160)
    m.truncate("layer0", 4)
    assert m.usage().host_layer.used_blocks == 1
    check_invariants(m, {"layer0": [None] * 4, "p": toks(0, 12)})


def test_errors_for_misuse() -> None:
    m = KVBlockManager(BT, gpu_blocks=2, host_blocks=0)
    m.allocate("a", toks(0, 1))
    with pytest.raises(ValueError, match="already allocated"):
        m.allocate("a", toks(0, 1))
    with pytest.raises(KeyError, match="unknown sequence"):
        m.free("zz")
    with pytest.raises(ValueError, match="bad KV block geometry"):
        KVBlockManager(0, 1, 1)


def test_no_leak_after_allocate_free_cycles() -> None:
    m = KVBlockManager(BT, gpu_blocks=6, host_blocks=6)
    rng = random.Random(0)
    # 200 cycles of two overlapping sequences, with decode steps between
    for i in range(200):
        base = toks(rng.randrange(3) * 100, rng.randrange(1, 14))
        m.allocate(("x", i), base)
        m.allocate(("y", i), base + toks(1000 + i, rng.randrange(4)))
        m.append(("x", i), token_ids=[i % 50])
        m.free(("y", i))
        m.free(("x", i))
    # no block is referenced; every sealed block is still cached
    u = m.usage()
    assert u.gpu.used_blocks == 0 and u.host.used_blocks == 0
    assert all(info is None or (info.ref_count == 0 and info.evictable) for _, info in all_blocks(m))
    assert u.hit_tokens > 0


def test_randomized_invariants() -> None:
    rng = random.Random(1234)
    m = KVBlockManager(BT, gpu_blocks=10, host_blocks=8, bytes_per_block=64)
    seqs: dict[int, list] = {}  # expected token ids (None: appended without ids)
    reserved: dict[int, int] = {}  # blocks reserved ahead
    prefixes = [toks(0, 11), toks(100, 6), toks(200, 13)]
    failures = truncated = 0
    for step in range(2000):
        op = rng.random()
        before = snapshot(m, seqs)
        try:
            if op < 0.05:  # reserve blocks ahead for a new or a reserved sequence (never shared)
                s = rng.choice([step] + sorted(reserved))
                blocks = rng.randrange(-(-len(seqs.get(s, [])) // BT), 5)
                m.reserve(s, blocks, rng.choice([GPU, HOST]))
                seqs.setdefault(s, [])
                reserved[s] = blocks
            elif op < 0.3 or not seqs:  # allocate: a shared prefix (cut anywhere) plus a random tail
                tail = toks(rng.randrange(1000, 1010), rng.randrange(5))
                prompt = rng.choice(prefixes)[: rng.randrange(14)] + tail
                alloc = m.allocate(step, prompt)
                assert alloc.cached_tokens % BT == 0 and alloc.cached_tokens < max(len(prompt), 1)
                seqs[step] = prompt
            elif op < 0.55:  # append a few tokens, usually with ids
                s = rng.choice(sorted(seqs))
                ids = toks(rng.randrange(2000, 2005), rng.randrange(1, 6))
                if rng.random() < 0.1 or s in reserved:
                    m.append(s, n_tokens=len(ids))
                    ids = [None] * len(ids)
                else:
                    m.append(s, token_ids=ids)
                seqs[s] = seqs[s] + ids
            elif op < 0.75:  # free a sequence
                s = rng.choice(sorted(seqs))
                m.free(s)
                del seqs[s]
                reserved.pop(s, None)
            else:  # truncate a sequence (rejected drafts, a cropped cache), unless the cut is in a shared block
                s = rng.choice(sorted(seqs))
                keep = rng.randrange(len(seqs[s]) + 1)
                table = m.block_table(s)
                if keep % BT and m.block_info(table[keep // BT]).ref_count > 1:
                    with pytest.raises(ValueError, match="share"):
                        m.truncate(s, keep)
                    assert snapshot(m, seqs) == before
                else:
                    m.truncate(s, keep)
                    full_cut = keep % BT and len(seqs[s]) >= (keep // BT + 1) * BT  # a sealed block cut into
                    seqs[s] = seqs[s][:keep]
                    if full_cut:  # its ids were not kept: the hash chain ends, later blocks are never shared
                        seqs[s] = seqs[s][: keep // BT * BT] + [None] * (keep % BT)
                    reserved.pop(s, None)
                    truncated += 1
        except KVCapacityError:
            failures += 1
            assert snapshot(m, seqs) == before  # a refused call changes nothing
        check_invariants(m, seqs, reserved)
    # the run exercised the interesting paths
    u = m.usage()
    assert failures > 10 and truncated > 10 and u.hit_tokens > 0 and u.evicted_blocks > 10


def test_prefix_hashes_are_stable_across_processes() -> None:
    code = "from overspill.planning.kvblocks import prefix_hashes; print(prefix_hashes(list(range(40)), 16))"
    outs = {
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert outs == {f"{prefix_hashes(list(range(40)), 16)}\n"}
    # chained: equal block contents after different prefixes hash differently
    assert prefix_hashes([1, 2, 3, 4] * 2, 4)[0] != prefix_hashes([1, 2, 3, 4] * 2, 4)[1]


def test_imports_without_torch() -> None:
    code = "import overspill.planning.kvblocks, sys; assert 'torch' not in sys.modules, 'kvblocks imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
