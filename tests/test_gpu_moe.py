"""Expert-aware MoE streaming on CUDA (`pytest -m gpu tests/test_gpu_moe.py` on the GPU machine): the expert
cache's side-stream copies are ordered against compute, tokens equal the resident model's for every tiny MoE
architecture with a cold and a warm cache, and the Mixtral-8x7B shape at 24 GiB gives dense streaming's
tokens within its planned memory while moving fewer bytes per step."""

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
