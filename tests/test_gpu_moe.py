"""Expert-aware MoE streaming on CUDA (`pytest -m gpu tests/test_gpu_moe.py` on the GPU machine): the expert
cache's side-stream copies are ordered against compute, tokens equal the resident model's for every tiny MoE
architecture with a cold and a warm cache, the Mixtral-8x7B shape at 24 GiB gives dense streaming's
tokens within its planned memory while moving fewer bytes per step, and Llama 4 Scout's block and a 6-layer
cut of it match transformers bit for bit and token for token."""

from __future__ import annotations

import pytest
import torch

import overspill
from conftest import gpu_memory_before
from test_moe import ARCHS, CONTEXT, GEN, checkpoint, experts_plan, generate, prompts  # noqa: F401 - fixture

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_streaming_on_cuda_matches_resident(arch: str, warm: bool, dtype: torch.dtype, checkpoint) -> None:
    path, _ = checkpoint(arch)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to("cuda").eval()
    model, _ = overspill.load(path, plan=experts_plan(arch, 0, warm), dtype=dtype, context=CONTEXT, batch=2,
                              progress=False, device="cuda")
    assert model.overspill.experts.tensors[0].is_cuda
    single, batch, mask = prompts()
    for ids, m in ((single, None), (batch, mask)):
        ids = ids.cuda()
        m = None if m is None else m.cuda()
        want, _ = generate(reference, ids, m)
        got, _ = generate(model, ids, m)
        assert torch.equal(got, want), (arch, warm, dtype, m is not None)
    assert model.overspill.experts.misses > 0


def test_mixtral_shape_at_24gib() -> None:
    """Full-size Mixtral-8x7B shape, random weights: expert-aware greedy tokens equal dense streaming's,
    peak GPU memory stays within the budget, and fewer bytes cross per step."""
    results = {}
    for mode in ("dense", "experts"):
        before = gpu_memory_before()
        model, _ = overspill.load("mixtral-8x7b", gpu_memory="24GiB", random_weights=True, context=256,
                                  progress=False, moe_streaming=mode)
        plan = model.overspill.plan
        assert plan.moe_streaming == mode
        ids = torch.randint(2, 32000, (1, 32), generator=torch.Generator().manual_seed(0)).cuda()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, pad_token_id=0)
        assert torch.cuda.max_memory_allocated() - before <= plan.budget_bytes, mode
        results[mode] = out.tolist(), plan.streamed_bytes_per_step
        del model
    assert results["experts"][0] == results["dense"][0]
    assert results["experts"][1] < results["dense"][1] / 2


@pytest.mark.parametrize("tokens", [1, 8, 32, 256])
def test_llama4_routed_block_is_transformers_bit_for_bit_at_scout_sizes(tokens: int) -> None:
    """One Llama-4-Scout-sized MoE block: the expert-aware block's output equals `Llama4TextMoe`'s bit for bit.
    A one-entry bmm per expert differed below 256 tokens on the H100 (max 0.03); two entries agree."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from llama4_identity import build, routed_module

    device = torch.device("cuda")
    moe, config = build(False, "cuda")
    routed = routed_module(moe, device)
    x = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(tokens)).to(device,
                                                                                                     torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(routed(x)[0], moe(x)[0])


def test_llama4_expert_streaming_gives_resident_tokens_at_scout_sizes() -> None:
    """A Llama-4-Scout cut to 6 layers at 20 GiB: expert-aware streaming decodes the resident model's greedy tokens
    at batches 1 and 8 (dense streaming did, expert-aware did not before its experts ran as two-entry bmms)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from llama4_identity import whole

    rows: list[dict] = []
    whole(6, "20GiB", False, rows)
    assert all("error" not in r for r in rows), rows
    checked = [r for r in rows if r["way"] != "resident"]
    assert {(r["way"], r["batch"]) for r in checked} == {(w, b) for w in ("dense", "experts") for b in (1, 8)}
    assert any(r["moe_streaming"] == "experts" and r["streamed_layers"] for r in checked)
    assert all(r["identical_to_resident"] for r in checked), [(r["way"], r["batch"]) for r in checked]
