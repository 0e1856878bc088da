"""Pairs of `overspill.load` options on the CPU: each combination either gives the resident model's greedy tokens
or is refused before loading in one line, by `load` and `overspill plan` alike.

- Llama 4's chunked-attention layers under draft trees (`speculate_tree`): the tree pass handed the model a mask
  dict without a "chunked_attention" entry (KeyError deep in transformers); masking them as sliding windows instead
  would attend across a chunk boundary. They now get a chunk mask.
- Llama 4 under `speculate="self"`: the int4 draft's experts took transformers 5's routed signature, which
  `Llama4TextExperts` does not (TypeError at the first draft step).
- `speculate="self"` beside `moe_streaming="experts"`: silently placed whole layers where every other draft
  source is refused; `cpu_experts="on"` then blamed "every MoE layer is resident" for streamed layers.
- `plan --speculate self --stream-format int8` forecast a plan that `load` refuses.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import overspill
from overspill import cli
from overspill.errors import OverspillError
from overspill.planning.plan import ACTIVATION_FLOOR_BYTES
from overspill.runtime.loader import decoder_layers
from overspill.runtime.self_draft import build_self_draft, quantizable

from test_cli import check_one_line_error
from test_moe import BASE, CONTEXT, MOE_CONFIGS
from test_moe import checkpoint as moe_checkpoint  # noqa: F401 - fixture
from test_placement import load_tiny, resident_budget
from test_self_draft import _dequantized

GEN = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
REPEATS = torch.tensor([[5, 6, 7, 8, 9] * 3 + [5, 6, 7]])  # 18 tokens ngram drafts from
RANDOM = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(1234))


def _llama4(chunk: int) -> AutoModelForCausalLM:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model("llama4_text", **{**BASE, **MOE_CONFIGS["llama4_text"],
                                                        "attention_chunk_size": chunk})
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llama4_chunked(tmp_path_factory):
    """(path, resident model) of a tiny Llama 4 whose chunks of 8 positions split every prompt + answer."""
    model = _llama4(chunk=8)
    path = tmp_path_factory.mktemp("llama4-chunk8")
    model.save_pretrained(str(path))
    return path, model


def _load(path, gpu_memory, **kwargs):
    model, _ = overspill.load(path, gpu_memory=gpu_memory, dtype="float32", context=CONTEXT, progress=False, **kwargs)
    return model


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
def test_llama4_draft_trees_mask_each_chunk(llama4_chunked, streamed: bool) -> None:
    path, reference = llama4_chunked
    budget = resident_budget(path, 2) if streamed else None
    model = _load(path, budget, speculate="ngram", speculate_tree=6, moe_streaming="dense")
    assert bool(model.overspill.plan.streamed_layers) == streamed
    for ids in (REPEATS, RANDOM):  # 18 + 12 and 12 + 12 positions: the answer crosses a chunk boundary
        assert torch.equal(model.generate(ids, **GEN), reference.generate(ids, **GEN))
    assert model.speculation_stats.tree == 6 and model.speculation_stats.accepted > 0


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
def test_llama4_self_draft_gives_plain_greedy(moe_checkpoint, streamed: bool) -> None:  # noqa: F811
    path, reference = moe_checkpoint("llama4_text")
    model = _load(path, resident_budget(path, 2) if streamed else None, speculate="self")
    assert bool(model.overspill.plan.streamed_layers) == streamed
    for ids in (REPEATS, RANDOM):
        assert torch.equal(model.generate(ids, **GEN), reference.generate(ids, **GEN))
    assert model.speculation_stats.drafted > 0


def test_llama4_int4_experts_read_their_weights_input_major() -> None:
    """`Llama4TextExperts` keeps [experts, in, out]: on the int4 grid the draft computes the target's logits."""
    model = _llama4(chunk=8192)
    _, layers = decoder_layers(model)
    with torch.no_grad():
        for module in layers.modules():
            if isinstance(module, torch.nn.Linear) and quantizable(tuple(module.weight.shape), 32, "cpu"):
                module.weight.copy_(_dequantized(module.weight, 32))
            if type(module).__name__ == "Llama4TextExperts":
                for weights in (module.gate_up_proj, module.down_proj):
                    for e in range(weights.shape[0]):
                        weights[e].copy_(_dequantized(weights[e].t().contiguous(), 32).t())
        ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(1))
        want, got = model(ids).logits[0], build_self_draft(model, group=32)(ids).logits[0]
    assert (got - want).norm() / want.norm() < 0.06


def test_self_draft_beside_expert_streaming_is_refused_as_any_draft_is(moe_checkpoint) -> None:  # noqa: F811
    path, reference = moe_checkpoint("mixtral")
    budget = resident_budget(path, 2)
    for source in ("ngram", "self"):
        with pytest.raises(OverspillError) as refused:
            _load(path, budget, speculate=source, moe_streaming="experts")
        assert str(refused.value) == ("expert streaming does not combine with speculative decoding yet: "
                                      "use moe_streaming='dense'"), source
    model = _load(path, budget, speculate="self")  # auto: whole layers, saying why
    plan = model.overspill.plan
    assert plan.moe_streaming == "dense" and plan.streamed_layers
    assert any(n.startswith("MoE layers stream whole (dense): expert streaming does not combine with speculative")
               for n in plan.notes)
    assert torch.equal(model.generate(REPEATS, **GEN), reference.generate(REPEATS, **GEN))
    with pytest.raises(OverspillError, match="expert streaming does not combine with speculative decoding"):
        _load(path, budget, speculate="self", cpu_experts="on")  # not "every MoE layer is resident"


@pytest.mark.parametrize("fmt", ["int8", "lossless"])
def test_plan_refuses_a_self_draft_over_encoded_layers_as_load_does(fmt: str, tiny_checkpoint, capsys) -> None:
    path = tiny_checkpoint("llama")
    capsys.readouterr()
    with pytest.raises(OverspillError) as refused:
        load_tiny(path, resident=2, speculate="self", stream_format=fmt)
    budget = resident_budget(path, 2) + ACTIVATION_FLOOR_BYTES  # the CPU load keeps no activation floor
    code = cli.main(["plan", str(path), "--gpu-memory", str(budget), "--context", str(CONTEXT), "--dtype", "float32",
                     "--profile", "h100-pcie5", "--speculate", "self", "--stream-format", fmt])
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, ["use --stream-format bf16"])
    assert out.err.strip() == f"overspill: error: {refused.value}"


def test_plan_refuses_and_notes_a_self_draft_beside_expert_streaming_as_load_does(capsys) -> None:
    """`plan --speculate self` placed expert streaming that `load` refuses (helper-64's fix 3 was load's only)."""
    args = ["plan", "mixtral-8x7b", "--gpu-memory", "40GiB", "--speculate", "self", "--moe-streaming"]
    code = cli.main([*args, "experts"])
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, ["expert streaming does not combine with speculative decoding"])
    assert cli.main([*args, "auto"]) == 0
    assert "MoE layers stream whole (dense): expert streaming does not combine with speculative" in \
        capsys.readouterr().out


def test_plan_refuses_encoded_layers_under_cuda_graphs_as_load_does(capsys) -> None:
    """`plan --cuda-graphs --stream-format int8` placed and forecast what `load` refuses (the check lived in api)."""
    code = cli.main(["plan", "llama-3-8b", "--gpu-memory", "6GiB", "--cuda-graphs", "--stream-format", "int8"])
    out = capsys.readouterr()
    check_one_line_error(code, out.out, out.err, ["stream format int8 decodes eagerly", "drop --cuda-graphs"])
