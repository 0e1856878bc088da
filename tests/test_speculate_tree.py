"""Draft trees on every surface (issue 14): `load(speculate_tree=N)` and so `generate` and `pipeline`,
`overspill run --speculate-tree N`, and the engine behind `serve` and `batch`. Greedy stays plain greedy
token for token with streamed layers; the budget adapts to the acceptance measured; bad input is one line."""

from __future__ import annotations

import socket

import pytest
import torch

import overspill
from overspill import cli
from overspill.planning.speculation import PassCost
from overspill.planning.trees import MIN_TREE, RankAcceptance, check_tree, tree_budget
from overspill.runtime import speculative
from overspill.runtime.drafts import OracleDrafter
from overspill.serving.engine import GenerationRequest

from conftest import VOCAB
from test_engine import IdsTokenizer
from test_placement import load_tiny
from test_serve_speculative import NEW as ENGINE_NEW
from test_serve_speculative import PROMPTS, _engine, _run
from test_speculative import GEN, NEW, _prompt, reference  # noqa: F401 - `reference` is a fixture

COST = PassCost(1.0, 0.02)  # a pass of n tokens costs 1 + 0.02 n: extra nodes are cheap, not free


class _Measured:
    """Rank acceptance as measured (`RankAcceptance`'s `visits` and `rates`), given outright."""

    def __init__(self, *rates: float):
        self.visits, self.rates = 1, list(rates)


def test_tree_budget_grows_with_acceptance() -> None:
    # E(b) / (pass(b + 1)): nothing accepted -> the floor; a coin-flip draft -> 4; a good one -> the whole budget
    assert tree_budget(COST, _Measured(0.0), 8) == MIN_TREE
    assert tree_budget(COST, _Measured(0.5), 8) == 4  # 1.94 / 1.10 at 4 beats 1.97 / 1.12 at 5
    assert tree_budget(COST, _Measured(0.9), 8) == 8
    # a draft whose second choice is often right is worth more nodes than its first choice alone
    assert tree_budget(COST, _Measured(0.5, 0.3), 16) > tree_budget(COST, _Measured(0.5), 16)
    assert tree_budget(PassCost(1.0), _Measured(0.0), 8) == MIN_TREE  # ties go to the smaller budget
    assert tree_budget(COST, RankAcceptance(), 8) == 8  # nothing measured yet: the budget asked for


def test_check_tree_says_what_to_do() -> None:
    check_tree(None, None)
    check_tree(MIN_TREE, "ngram")
    with pytest.raises(ValueError, match="at least 2 tokens, got 1: pass 2 or more"):
        check_tree(1, "ngram")
    with pytest.raises(ValueError, match="turn speculation on"):
        check_tree(8, None)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_speculate_tree_is_plain_greedy_with_streamed_layers(arch, reference, tiny_checkpoint) -> None:
    from overspill.api import placement_of

    ids = _prompt(3)
    want = reference(arch).generate(ids, **GEN)
    model = load_tiny(tiny_checkpoint(arch), resident=3, speculate="ngram", speculate_tree=8)
    assert placement_of(model).plan.streamed_layers
    assert torch.equal(model.generate(ids, **GEN), want)
    stats = model.speculation_stats
    assert stats.tree == 8 and stats.budgets[0] == 8 and all(MIN_TREE <= b <= 8 for b in stats.budgets)
    assert stats.accepted > 0 and stats.passes < NEW  # the prompt's repeat was drafted and taken


def test_load_speculate_tree_through_pipeline_on_smollm2(default_model_dir) -> None:
    # The real model and tokenizer: transformers' pipeline over `load(speculate_tree=...)` answers what the
    # same model answers with speculation off, and the quoted sentence is drafted and accepted through trees.
    from pathlib import Path

    from transformers import pipeline

    text = (Path(__file__).resolve().parents[1] / "bench" / "data" / "declaration.txt").read_text()
    chat = [{"role": "user", "content": f"Copy the first sentence of this text exactly:\n\n{text}"}]
    model, tok = overspill.load(default_model_dir, gpu_memory=None, dtype="float32", progress=False,
                                speculate="ngram", speculate_tree=16)
    got = pipeline("text-generation", model=model, tokenizer=tok)(chat, max_new_tokens=40, do_sample=False)
    stats = model.speculation_stats
    speculative.enable(model, None)
    want = pipeline("text-generation", model=model, tokenizer=tok)(chat, max_new_tokens=40, do_sample=False)
    assert got[0]["generated_text"][-1] == want[0]["generated_text"][-1]
    assert stats.tree == 16 and stats.accepted > 10 and stats.tokens_per_pass > 1.5, stats


def test_adaptive_budget_follows_acceptance_and_keeps_the_tokens(reference, tiny_checkpoint, monkeypatch) -> None:
    # The pass cost is fixed so the rule alone decides: a draft that is always right keeps the whole
    # budget; one that is never right falls, pass by pass as its rate leaves the prior, to the floor.
    # Adapting is `enable`'s default. Tokens are plain greedy's either way.
    monkeypatch.setattr(speculative.PassCostFit, "cost", lambda self: COST)
    ids = _prompt(4)
    want = reference("llama").generate(ids, **GEN)
    model = load_tiny(tiny_checkpoint("llama"), resident=3)
    budgets = {}
    for acceptance in (1.0, 0.0):
        drafter = OracleDrafter(want[0, ids.shape[1]:], ids.shape[1], acceptance, VOCAB)
        speculative.enable(model, drafter, tree=8)
        assert torch.equal(model.generate(ids, **GEN), want), acceptance
        budgets[acceptance] = model.speculation_stats.budgets
    assert set(budgets[1.0]) == {8}
    falling = budgets[0.0]
    assert falling[0] == 8 and falling[1] > MIN_TREE  # one miss moves the rate from its prior, not to 0
    assert falling == sorted(falling, reverse=True) and falling[-1] == MIN_TREE
    # `adapt_tree=False` (the acceptance bench's equal-budget runs) drafts the budget asked for every pass
    speculative.enable(model, OracleDrafter(want[0, ids.shape[1]:], ids.shape[1], 0.0, VOCAB), tree=8, adapt_tree=False)
    assert torch.equal(model.generate(ids, **GEN), want)
    assert set(model.speculation_stats.budgets) == {8}
    speculative.enable(model, None)


def test_load_speculate_tree_samples_reproducibly_with_adaptation(tiny_checkpoint) -> None:
    # Sampled decoding through `load(speculate_tree=...)`: the walk draws from the global generator as plain
    # sampling does, so a seed repeats the tokens, while the budget adapts within [MIN_TREE, 8].
    model = load_tiny(tiny_checkpoint("llama"), resident=3, speculate="ngram", speculate_tree=8)
    ids = _prompt(5)
    gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, top_k=3, temperature=0.7, pad_token_id=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append((model.generate(ids, **gen), list(model.speculation_stats.budgets)))
    (first, budgets), (again, budgets_again) = runs
    assert torch.equal(first, again) and budgets == budgets_again
    assert first.shape[1] == ids.shape[1] + NEW and model.speculation_stats.accepted > 0
    assert budgets[0] == 8 and all(MIN_TREE <= b <= 8 for b in budgets) and len(budgets) > 1


def test_bad_tree_input_is_one_line_before_loading(tiny_checkpoint, capsys) -> None:
    path = str(tiny_checkpoint("llama"))
    with pytest.raises(overspill.OverspillError, match=r"--speculate-tree.*at least 2"):
        overspill.load(path, speculate="ngram", speculate_tree=1, progress=False)
    with pytest.raises(overspill.OverspillError, match=r"--speculate-tree.*draft source"):
        overspill.load(path, speculate_tree=8, progress=False)
    for argv, words in ((["run", path, "--speculate", "ngram", "--speculate-tree", "0"], "at least 2"),
                        (["serve", "--speculate-tree", "1"], "at least 2"),
                        (["batch", "in.jsonl", "out.jsonl", "--speculate", "ngram", "--speculate-tree", "1"],
                         "at least 2")):
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("overspill: error: ") and "--speculate-tree" in err[0], err
        assert words in err[0]


def test_run_flag_reaches_the_runtime(tiny_checkpoint, capsys) -> None:
    path = str(tiny_checkpoint("llama"))
    code = cli.main(["run", path, "--dtype", "float32", "--context", "256", "--max-new-tokens", "16",
                     "--speculate", "ngram", "--speculate-tree", "6"])
    assert code == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("speculation (ngram):"))
    assert "trees of up to 6 tokens, last budget " in line, line


def test_engine_trees_give_the_plain_engines_tokens_greedy_and_seeded(tiny_checkpoint, monkeypatch) -> None:
    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    plain, tree = _engine(model), _engine(model, speculate="ngram", speculate_tree=6)
    monkeypatch.setattr(tree.runner, "verify", lambda *a: pytest.fail("a chain was verified instead of a tree"))
    try:
        assert tree.speculator.tree == 6
        greedy = [GenerationRequest(p, n) for p, n in zip(PROMPTS, ENGINE_NEW)]
        seeded = [GenerationRequest(PROMPTS[1], 12, temperature=0.8, top_k=40, top_p=0.9, seed=7)]
        want, got = _run(plain, greedy + seeded), _run(tree, greedy + seeded)
        assert [t for t, _ in got] == [t for t, _ in want]  # a tree walk draws as plain steps draw
        usages = [u for _, u in got]
        assert all(u is not None and u.passes for u in usages) and sum(u.accepted for u in usages) > 0
        assert max(d for d, _, _ in tree.metrics.passes) > 1  # trees were drafted, not only empty passes
        assert tree.live_requests() == 0 and tree.kv_stats().used_blocks == 0
    finally:
        plain.close()
        tree.close()


def test_engine_tree_budget_adapts_per_request_and_is_reported(tiny_checkpoint, monkeypatch) -> None:
    # No default source: the requests opt in through `speculate`. With the pass cost fixed, a draft that is
    # always right keeps the engine's budget of 6 and one that is never right falls to MIN_TREE; each
    # response's usage says which budgets its passes drafted, and its tokens are the plain engine's. The
    # server's `/metrics` (a `Metrics` over this engine, as `create_app` builds it) has every pass's budget.
    pytest.importorskip("prometheus_client")
    from overspill.serving.metrics import Metrics

    monkeypatch.setattr(speculative.PassCostFit, "cost", lambda self: COST)
    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    plain, tree = _engine(model), _engine(model, speculate_tree=6)
    try:
        request = GenerationRequest(PROMPTS[0], 20, speculate="ngram")
        [(want, _)] = _run(plain, [request])
        continuation = torch.tensor([int(t) for t in want.split()])
        budgets = {}
        for acceptance in (1.0, 0.0):
            tree.speculator._drafters["ngram"] = OracleDrafter(continuation, len(request.prompt_ids), acceptance, VOCAB)
            [(got, usage)] = _run(tree, [request])
            assert got == want, acceptance
            assert len(usage.tree_budgets) == usage.passes
            budgets[acceptance] = usage.tree_budgets
        assert set(budgets[1.0]) == {6}
        falling = budgets[0.0]
        assert falling[0] == 6 and falling == sorted(falling, reverse=True) and falling[-1] == MIN_TREE
        assert usage.as_dict()["tree_budgets"] == {str(b): falling.count(b) for b in set(falling)}
        every = budgets[1.0] + falling
        metric = Metrics([tree], 0, None).registry.get_sample_value
        assert metric("overspill_speculative_tree_budget_count") == len(every)
        assert metric("overspill_speculative_tree_budget_sum") == sum(every)
        for le in (2, 3, 4, 6, 8):
            assert metric("overspill_speculative_tree_budget_bucket", {"le": f"{le}.0"}) == sum(b <= le for b in every)
        assert metric("overspill_speculative_tree_budget_bucket", {"le": "+Inf"}) == len(every)
    finally:
        plain.close()
        tree.close()


def test_auto_speculation_off_says_the_tree_budget_is_unused(tiny_checkpoint) -> None:
    # A resident plan: speculate="auto" decodes plainly, and the plan says the tree budget went unused.
    from overspill.api import placement_of

    model, _ = overspill.load(str(tiny_checkpoint("llama")), gpu_memory=None, dtype="float32", progress=False,
                              speculate="auto", speculate_tree=4)
    notes = placement_of(model).plan.notes
    assert "generate" not in model.__dict__
    assert any("speculate_tree=4 is unused" in note and "speculate='ngram'" in note for note in notes), notes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Loaded(Exception):
    """Stops a command once it handed the engine its options."""


@pytest.mark.parametrize("default", [["--speculate", "ngram"], []])
@pytest.mark.parametrize("command", ["serve", "batch"])
def test_serve_and_batch_hand_the_tree_budget_to_the_engine(command, default, tiny_checkpoint, tmp_path,
                                                           monkeypatch) -> None:
    # Without --speculate too: requests may name a source in their body, and then draft trees.
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from overspill.serving import batch, server

    model = load_tiny(tiny_checkpoint("llama"), resident=4)
    seen = []

    def engine_built(engine, *args, **kwargs):
        seen.append(engine.speculator)
        raise _Loaded

    monkeypatch.setattr(server, "load_for_serving", lambda args: (model, IdsTokenizer()))
    monkeypatch.setattr(batch, "load_for_serving", lambda args: (model, IdsTokenizer()))
    monkeypatch.setattr(batch, "run_batch", engine_built)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: engine_built(app.state.engine))
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "Hi"}}\n')  # one request: an empty input is refused before loading
    where = (["--port", str(_free_port()), "--host", "127.0.0.1"] if command == "serve"
             else [str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")])
    args = cli._build_parser().parse_args([command, *where, *default, "--speculate-tree", "5"])
    with pytest.raises(_Loaded):
        args.func(args)
    assert seen[0].default == (default[1] if default else None) and seen[0].tree == 5
