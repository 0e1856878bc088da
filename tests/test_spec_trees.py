"""Draft trees: one verify pass sees, per node, exactly the cache and the node's ancestors (batched under a
tree mask, or serially with plain decoding's arithmetic); the cache keeps the accepted path only, on
device and host-tier KV; greedy with trees is plain greedy for every tiny architecture and tree source,
streamed or resident; sampling with trees keeps plain sampling's distribution; the planner's tree math."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from overspill.planning.trees import Choice, RankAcceptance, best_tree, depths, expected_tokens
from overspill.planning.speculation import expected_tokens as chain_tokens
from overspill.runtime import speculative
from overspill.runtime.drafts import ModelDrafter, NgramDrafter
from overspill.runtime.kv import TieredCache, cache_kwarg
from overspill.runtime.token_serial import supports_serial
from overspill.runtime.trees import DraftTree, keep_path, verify_tree

from conftest import ARCHS, VOCAB, hf_config

NEW = 24
GEN = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
# node: 0  1  2  3   4  5  6  7   8  — three branches off the root, two of them forking again
PARENTS = [-1, 0, 1, 0, -1, 4, 5, 3, -1]


def _prompt(seed: int = 0, length: int = 18) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1, length), generator=gen)
    return torch.cat([ids, ids[:, :9]], dim=1)  # a repeat, so prompt lookup finds something


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[arch] = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch), dtype=torch.float32).eval()
        return cache[arch]

    return get


def _tree(seed: int = 0) -> DraftTree:
    gen = torch.Generator().manual_seed(seed)
    return DraftTree(torch.randint(3, VOCAB, (len(PARENTS),), generator=gen), list(PARENTS)).preorder()[0]


def _prefilled(model, cache, prompt: torch.Tensor):
    """The prompt but its last token (the root of the tree) in `cache`, crops allowed."""
    model(input_ids=prompt[:, :-1], **{cache_kwarg(model): cache}, use_cache=True)
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()
    return cache


def _modes(model) -> list[bool]:
    return [False, True] if supports_serial(model) else [False]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2"])
def test_tree_pass_equals_recomputing_each_path(arch, reference) -> None:
    # Every node's logits from one tree pass equal a fresh forward over prompt + that node's path,
    # batched (full, sliding-window and mixed layers: a 30-token prompt overruns the 16-token window)
    # and serial; after keep_path the cache continues exactly like the prompt + an off-favourite path.
    model = reference(arch)
    prompt = _prompt(1, length=21)
    tree = _tree()
    for serial in _modes(model):
        cache = _prefilled(model, DynamicCache(config=model.config), prompt)
        tree_pass = verify_tree(model, cache, cache_kwarg(model), prompt[0, -1:], tree, serial)
        torch.testing.assert_close(tree_pass.logits[0], model(prompt).logits[0, -1], rtol=1e-4, atol=1e-4)
        for node in range(len(tree)):
            path = torch.cat([prompt[0], tree.tokens[tree.path(node)]])[None]
            torch.testing.assert_close(tree_pass.logits[node + 1], model(path).logits[0, -1], rtol=1e-4, atol=1e-4)
        path = tree.path(next(i for i in range(len(tree)) if tree.depths()[i] == 2))
        assert path != tree_pass.resident[: len(path)]  # the KV has to be reassembled, not only cropped
        keep_path(cache, tree_pass, path)
        assert cache.get_seq_length() == prompt.shape[1] + len(path)
        nxt = torch.tensor([[7]])
        got = model(input_ids=nxt, **{cache_kwarg(model): cache}, use_cache=True).logits[0, -1]
        want = model(torch.cat([prompt[0], tree.tokens[path], nxt[0]])[None]).logits[0, -1]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("serial", [False, True])
def test_keep_path_on_host_tier_kv_across_a_block_edge(serial, reference) -> None:
    # Host-tier KV with 8-token blocks: the tree's nodes seal a block into host memory, the kept path
    # comes back across that edge, and the cache then holds exactly prefix + path.
    model = reference("llama")
    prompt = _prompt(2)[:, :15]  # 14 cached + the root: depth-2 nodes land on tokens 16 and 17
    cache = _prefilled(model, TieredCache(model.config, host_layers=range(8), capacity=64, block_tokens=8), prompt)
    tree = _tree(3)
    tree_pass = verify_tree(model, cache, cache_kwarg(model), prompt[0, -1:], tree, serial)
    path = tree.path(next(i for i in range(len(tree)) if tree.depths()[i] == 3))
    keep_path(cache, tree_pass, path)
    assert cache.get_seq_length() == prompt.shape[1] + len(path)
    assert all(layer.host_tokens == 16 for layer in cache.layers)
    nxt = torch.tensor([[9, 4]])
    got = model(input_ids=nxt, **{cache_kwarg(model): cache}, use_cache=True).logits[0]
    want = model(torch.cat([prompt[0], tree.tokens[path], nxt[0]])[None]).logits[0, -2:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    cache.close()


def test_serial_tree_pass_is_plain_decoding_bit_for_bit_in_bf16() -> None:
    # Each node's logits equal, bit for bit, plain one-token decode steps along its path: the serial
    # tree pass gives every node a plain decode step's kernels, shapes and KV.
    from transformers import AutoConfig

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=8000)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    prompt = torch.randint(3, 8000, (1, 40))
    tree = DraftTree(torch.randint(3, 8000, (len(PARENTS),)), list(PARENTS)).preorder()[0]
    with torch.no_grad():
        cache = _prefilled(model, DynamicCache(config=config), prompt)
        tree_pass = verify_tree(model, cache, cache_kwarg(model), prompt[0, -1:], tree, serial=True)
        for node in range(len(tree)):
            plain = _prefilled(model, DynamicCache(config=config), prompt)
            for token in [prompt[0, -1]] + [tree.tokens[i] for i in tree.path(node)]:
                logits = model(input_ids=token.view(1, 1), **{cache_kwarg(model): plain}, use_cache=True).logits[0, -1]
            assert torch.equal(tree_pass.logits[node + 1], logits.float()), node


def _tree_drafter(source: str, tiny_checkpoint):
    if source == "ngram":
        return NgramDrafter(branch_depth=6)
    drafter = speculative.make_drafter(f"draft:{tiny_checkpoint('llama')}", _Target())
    drafter.width = 4  # four nodes per draft round: a CPU test's time goes to per-token forwards
    return drafter


class _Target:
    """The bits of a target `make_drafter` reads."""

    dtype = torch.float32

    class config:  # noqa: N801 - mimics a transformers config
        @staticmethod
        def get_text_config():
            return type("C", (), {"vocab_size": VOCAB})

    def parameters(self):
        yield torch.zeros(1)


@pytest.mark.parametrize("source", ["ngram", "draft"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_trees_equals_plain(arch, source, reference, tiny_checkpoint) -> None:
    model = reference(arch)
    ids = _prompt()
    speculative.enable(model, None)
    want = model.generate(ids, **GEN)
    try:
        speculative.enable(model, _tree_drafter(source, tiny_checkpoint), tree=8)
        got = model.generate(ids, **GEN)
        stats = model.speculation_stats
    finally:
        speculative.enable(model, None)
    assert torch.equal(got, want)
    assert stats.tree == 8 and stats.emitted == NEW and stats.drafted > 0
    assert stats.serial == supports_serial(model)
    if arch == "llama" and source == "draft":  # the draft is the target itself: its first choices hold
        assert stats.tokens_per_pass > 2 and stats.ranks.hazards[0].accepted > 0


@pytest.mark.parametrize("kv_host", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_greedy_with_trees_equals_plain_streamed(arch, kv_host, reference, tiny_checkpoint) -> None:
    # Streamed layers (and host-tier KV): the tree pass, its per-layer crops and the kept path's KV
    # go through the ring and the cache tiers; ngram and draft-model trees alike.
    from test_placement import load_tiny

    from overspill.api import placement_of

    ids = _prompt(3)
    want = reference(arch).generate(ids, **GEN)
    extra = {"kv_gpu_memory": "96KiB"} if kv_host else {}
    model = load_tiny(tiny_checkpoint(arch), resident=3, **extra)
    assert placement_of(model).plan.streamed_layers
    if kv_host:
        assert placement_of(model).plan.kv_host_layers
    for source in ("ngram", "draft"):
        speculative.enable(model, _tree_drafter(source, tiny_checkpoint), tree=6)
        got = model.generate(ids, **GEN)
        assert torch.equal(got, want), source
        assert model.speculation_stats.passes <= NEW


def test_tree_sampling_matches_plain_sampling(reference) -> None:
    # The joint distribution of the first two sampled tokens (top-2, 4 outcomes) with draft trees holding
    # the target's own two best tokens at each step matches plain sampling's.
    model = reference("llama")
    ids = _prompt(8)
    gen = dict(max_new_tokens=2, min_new_tokens=2, do_sample=True, top_k=2, temperature=1.5, pad_token_id=0)

    def histogram(runs: int, seed: int) -> dict[tuple[int, int], int]:
        torch.manual_seed(seed)
        out: dict[tuple[int, int], int] = {}
        for _ in range(runs):
            pair = tuple(model.generate(ids, **gen)[0, -2:].tolist())
            out[pair] = out.get(pair, 0) + 1
        return out

    runs = 120
    plain = histogram(runs, 1)
    speculative.enable(model, ModelDrafter(reference("llama"), VOCAB, top_k=2, width=3), tree=6)
    try:
        spec = histogram(runs, 2)
        assert model.speculation_stats.accepted > 0
    finally:
        speculative.enable(model, None)
    keys = set(plain) | set(spec)
    assert len(keys) >= 3
    chi2 = sum((plain.get(k, 0) - spec.get(k, 0)) ** 2 / (plain.get(k, 0) + spec.get(k, 0)) for k in keys)
    assert chi2 < 25, (chi2, plain, spec)  # ~chi-square with <= 3 dof: p < 0.0001 at 25


def test_ngram_tree_holds_every_earlier_continuation() -> None:
    # "5 6" was followed by "7 8 9", then "7 1 2", then "3": branches share "7"; the latest comes first.
    seq = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 3, 4, 5, 6]])
    tree = NgramDrafter(max_ngram=2, branch_depth=3).propose_tree(seq, 16)
    paths = {tuple(tree.tokens[tree.path(i)].tolist()) for i in range(len(tree)) if not tree.children()[i]}
    assert {(3, 4, 5), (7, 1, 2), (7, 8, 9)} <= paths
    assert tree.tokens[tree.path(2)].tolist() == NgramDrafter(max_ngram=2).propose(seq, 3).tokens.tolist()
    assert len(NgramDrafter().propose_tree(seq, 4)) == 4


def test_model_drafter_tree_is_best_first_and_leaves_its_cache_at_the_sequence(reference) -> None:
    drafter = ModelDrafter(reference("llama"), VOCAB, top_k=3)
    ids = _prompt(7)
    tree = drafter.propose_tree(ids, 10)
    assert len(tree) == 10 and drafter._cache.get_seq_length() == ids.shape[1]
    # taken in order of the draft's cumulative probability: recompute it per node from fresh forwards
    logp = []
    for node in range(len(tree)):
        parent = tree.parents[node]
        seq = torch.cat([ids[0], tree.tokens[tree.path(parent)] if parent >= 0 else ids[0, :0]])[None]
        with torch.no_grad():
            row = torch.log_softmax(drafter.model(seq).logits[0, -1], dim=-1)
        logp.append(float(row[tree.tokens[node]]) + (logp[parent] if parent >= 0 else 0.0))
    assert all(a >= b - 1e-4 for a, b in zip(logp, logp[1:])), logp
    assert int(tree.tokens[0]) == int(drafter.propose(ids, 1).tokens[0])  # the best first token comes first


def test_expected_tokens_of_trees() -> None:
    assert depths([-1, 0, 1, 0, -1]) == [1, 2, 3, 2, 1]
    assert expected_tokens([-1, 0, 1], [0.8, 0.8, 0.8]) == pytest.approx(chain_tokens(0.8, 3))
    assert expected_tokens([-1, -1, 0], [0.5, 0.3, 0.5]) == pytest.approx(1 + 0.5 + 0.3 + 0.25)
    with pytest.raises(ValueError):
        expected_tokens([0], [0.5])  # a node cannot be its own parent
    chain = best_tree([0.8], 8)
    assert chain.parents == tuple(range(-1, 7)) and chain.tokens_per_pass == pytest.approx(chain_tokens(0.8, 8))
    # where the draft's second choice is often right, the best tree of 8 beats the chain of 8
    wide = best_tree([0.6, 0.25], 8)
    assert wide.tokens_per_pass > chain_tokens(0.6, 8) and wide.depth < 8 and 1 in wide.ranks
    assert wide.tokens_per_pass == pytest.approx(
        expected_tokens(list(wide.parents), [[0.6, 0.25][r] for r in wide.ranks]))
    assert wide.tokens_per_pass == pytest.approx(1 + sum(wide.reach)) and list(wide.reach) == sorted(wide.reach)[::-1]


def test_rank_acceptance_starts_at_the_prior_and_follows_the_sibling_taken() -> None:
    # Each rank's hazard starts at AcceptanceTracker's prior; one miss at a single-child node moves rank 0
    # by the tracker's weight, to 0.45, not to 0. Ranks never offered have no rate: the draft drew chains.
    ranks = RankAcceptance(ranks=3)
    assert ranks.visits == 0 and [h.rate for h in ranks.hazards] == [0.5, 0.5, 0.5]
    ranks.update([Choice(offered=1, rank=None)])
    assert ranks.visits == 1 and ranks.rates == pytest.approx([0.45, 0.0, 0.0])
    # Rank 1 taken at a node of two children: a miss for rank 0's hazard, a hit for rank 1's (from its prior).
    ranks.update([Choice(offered=2, rank=1)])
    assert [h.rate for h in ranks.hazards] == pytest.approx([0.405, 0.55, 0.5])
    assert ranks.rates == pytest.approx([0.405, 0.595 * 0.55, 0.0])


def test_single_child_nodes_do_not_bias_the_later_ranks() -> None:
    # The target takes the draft's first choice at half the nodes and its second at the others; every other
    # node offered one child only. Counting those against rank 1 (a visit without its hit) said 0.25 for
    # it; counted where it was offered, rank 1's rate is the 0.5 it is.
    ranks = RankAcceptance()
    for i in range(200):
        offered, taken = 1 + i % 2, (i // 2) % 2
        ranks.update([Choice(offered, taken if taken < offered else None)])
    assert ranks.rates[0] == pytest.approx(0.5, abs=0.06) and ranks.rates[1] == pytest.approx(0.5, abs=0.06)
    assert sum(ranks.rates) <= 1.0
    # single-child nodes alone leave rank 1's hazard where it was, however often the first choice misses
    before = [h.rate for h in ranks.hazards]
    ranks.update([Choice(offered=1, rank=None)] * 20)
    assert [h.rate for h in ranks.hazards][1:] == before[1:] and ranks.hazards[0].rate < before[0]
