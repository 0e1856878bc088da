"""`overspill plan --speculate-tree N`: the tree forecast beside the chain's. The budget is the one the runtime
would choose (`best_budget`, as `tree_budget` does on measured ranks) at the plan's pass cost; its tok/s is
`best_tree`'s expected tokens over that pass; the rank acceptance is an assumption, derived from
--acceptance unless --rank-acceptance gives it; bad input is one line. Pure Python: no torch."""

from __future__ import annotations

import json

import pytest

from overspill import cli
from overspill.planning.speculation import PassCost, expected_tokens, plan_pass_cost
from overspill.planning.trees import (
    MIN_TREE, assumed_rank_acceptance, best_budget, best_tree, check_rank_acceptance, plan_tree, tree_budget,
)

from test_plan_cli import one_line_error, plan
from test_plan_speculate import H200_8B

RANKS = [0.6, 0.25, 0.1]  # a draft whose second choice is often right
BASE = ("llama-3-8b", "--gpu-memory", "6GiB", "--profile", "h100-pcie5", "--speculate", "ngram")


class _Measured:
    """What `RankAcceptance` would have measured: `RANKS`, after one visit."""

    visits, rates = 1, RANKS


def test_plan_tree_is_the_best_tree_over_the_planned_pass_cost():
    cost = plan_pass_cost(H200_8B, active_params=7.5e9, matmul_flops_s=780e12, serial=True)
    t = plan_tree(cost, 16, RANKS, derived=False)
    # the budget the runtime would choose with these ranks measured, and the fastest of every budget
    assert t.budget == best_budget(cost, RANKS, 16) == tree_budget(cost, _Measured(), 16)
    rate = {b: best_tree(RANKS, b).tokens_per_pass / cost.step_seconds(b) for b in range(MIN_TREE, 17)}
    assert t.best.tok_s == pytest.approx(rate[t.budget]) == pytest.approx(max(rate.values()))
    assert t.best.tokens_per_pass == pytest.approx(best_tree(RANKS, t.budget).tokens_per_pass)
    assert t.depth == best_tree(RANKS, t.budget).depth < t.budget  # siblings were worth taking
    assert t.at_cap.tok_s == pytest.approx(rate[16])
    # the chain beside it: as many first choices, in the same verify pass, so the same step time
    assert t.chain.chain == t.budget and t.chain.tokens_per_pass == pytest.approx(expected_tokens(0.6, t.budget))
    assert t.best.tok_s > t.chain.tok_s
    assert t.best.speedup == pytest.approx(t.best.tok_s * cost.step_seconds(0))
    for b in range(MIN_TREE, 17):  # at equal budget a tree never yields less than a chain
        assert best_tree(RANKS, b).tokens_per_pass >= expected_tokens(0.6, b) - 1e-12
    # a draft whose first choice is its only one: the best tree is the chain
    chain_only = plan_tree(cost, 16, [0.6], derived=False)
    assert chain_only.best.tokens_per_pass == pytest.approx(chain_only.chain.tokens_per_pass)
    assert chain_only.depth == chain_only.budget


def test_assumed_rank_acceptance_splits_the_first_choices_misses():
    # each further choice catches a quarter of what the ones before it missed
    assert assumed_rank_acceptance(0.7) == pytest.approx([0.7, 0.075, 0.05625])
    assert assumed_rank_acceptance(1.0) == pytest.approx([1.0, 0.0, 0.0])
    for a in (0.0, 0.3, 0.9):
        ranks = assumed_rank_acceptance(a)
        assert ranks[0] == a and sum(ranks) <= 1.0
        check_rank_acceptance(ranks)


def test_check_rank_acceptance_says_what_to_pass():
    check_rank_acceptance([0.5, 0.5])
    for bad in ([0.8, 0.4], [1.2], [-0.1, 0.2]):
        with pytest.raises(ValueError, match="summing to at most 1") as err:
            check_rank_acceptance(bad)
        assert "pass e.g. 0.7,0.08,0.05" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="at least 2"):
        plan_tree(PassCost(1.0), 1, RANKS, derived=False)


def test_plan_json_carries_the_tree_forecast_at_the_planned_pass_cost(capsys):
    code, out, _ = plan(capsys, *BASE, "--speculate-tree", "16", "--rank-acceptance", "0.6,0.25,0.1", "--json")
    assert code == 0
    s = json.loads(out)["speculation"]
    tree, c = s["tree"], s["pass_cost"]
    cost = PassCost(c["base_s"], c["per_token_s"], c["draft_per_token_s"], c["dispatch_per_token_s"],
                    c["compute_per_token_s"])
    assert tree["cap"] == 16 and tree["rank_acceptance"] == RANKS and tree["rank_acceptance_derived"] is False
    assert tree["rank_acceptance_assumed"] is True and s["acceptance"] == 0.6  # the first rank is the chain's
    assert tree["budget"] == best_budget(cost, RANKS, 16)
    e = best_tree(RANKS, tree["budget"]).tokens_per_pass
    assert tree["tokens_per_pass"] == pytest.approx(e)
    assert tree["tok_s"] == pytest.approx(e / cost.step_seconds(tree["budget"]))
    assert tree["speedup"] == pytest.approx(tree["tok_s"] / s["chains"][0]["tok_s"])
    chain = tree["chain"]
    assert chain["chain"] == tree["budget"] and chain["tok_s"] == pytest.approx(s["chains"][tree["budget"]]["tok_s"])
    assert tree["tok_s"] >= chain["tok_s"] and tree["tok_s"] >= s["best_tok_s"]
    # without --rank-acceptance: derived from --acceptance (default 0.7), and labelled so
    code, out, _ = plan(capsys, *BASE, "--speculate-tree", "8", "--json")
    tree = json.loads(out)["speculation"]["tree"]
    assert tree["rank_acceptance"] == pytest.approx(assumed_rank_acceptance(0.7)) and tree["rank_acceptance_derived"]
    code, out, _ = plan(capsys, *BASE, "--json")
    assert "tree" not in json.loads(out)["speculation"]


def test_plan_table_shows_the_tree_beside_the_chain(capsys):
    code, out, _ = plan(capsys, *BASE, "--speculate-tree", "16", "--rank-acceptance", "0.6,0.25,0.1")
    assert code == 0
    assert "rank acceptance 0.6 / 0.25 / 0.1 (the target's token is the draft's 1st / 2nd / 3rd choice) is an " \
           "ASSUMPTION (--rank-acceptance sets it" in out
    assert "tree (chosen budget)" in out and "chain, as many tokens" in out and "tree budget: " in out
    code, out, _ = plan(capsys, *BASE, "--speculate-tree", "16", "--acceptance", "0.8")
    assert "rank acceptance 0.8 / 0.05 / 0.0375" in out and "--acceptance 0.80 split as assumed" in out


def test_plan_says_trees_run_as_chains_under_cuda_graphs(capsys):
    code, out, _ = plan(capsys, *BASE, "--speculate-tree", "16", "--cuda-graphs", "--json")
    s = json.loads(out)["speculation"]
    assert code == 0 and "tree" not in s
    assert any("run as chains under --cuda-graphs" in n for n in s["notes"])
    code, out, _ = plan(capsys, *BASE, "--speculate-tree", "16", "--cuda-graphs")
    assert "note: draft trees (--speculate-tree 16) run as chains" in out and "tree budget:" not in out


@pytest.mark.parametrize("args, words", [
    (["--speculate", "ngram", "--speculate-tree", "1"], ["--speculate-tree", "at least 2"]),
    (["--speculate-tree", "8"], ["--speculate-tree", "draft source"]),
    (["--speculate", "ngram", "--speculate-tree", "8", "--rank-acceptance", "0.8,0.4"],
     ["--rank-acceptance", "summing to at most 1", "0.8,0.4"]),
    (["--speculate", "ngram", "--speculate-tree", "8", "--rank-acceptance", "0.5,x"],
     ["--rank-acceptance", "separated by commas", "'0.5,x'"]),
    (["--speculate", "ngram", "--rank-acceptance", "0.5"], ["--rank-acceptance", "--speculate-tree N"]),
    (["--speculate", "ngram", "--speculate-tree", "8", "--rank-acceptance", "0.5,0.1", "--acceptance", "0.7"],
     ["--rank-acceptance", "--acceptance is 0.7"]),
])
def test_plan_refuses_bad_tree_input_in_one_line(capsys, args, words):
    one_line_error(*plan(capsys, "llama-3-8b", "--profile", "h100-pcie5", *args), *words)


def test_plan_help_documents_the_tree_flags():
    parser = cli._build_parser()
    text = " ".join(next(a for a in parser._subparsers._group_actions).choices["plan"].format_help().split())
    for flag in ("--speculate-tree", "--rank-acceptance", "ASSUMES", "run as chains"):
        assert flag in text, flag
