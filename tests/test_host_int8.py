"""int8 host weights for the CPU rank: per-row int8 within half a step of the bf16/float32 weight, the
packed kernel computing exactly the dequantized product, and every tiny dense architecture decoding
with its CPU share in int8 close to resident (lossy: logits compared by cosine, not tokens)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from overspill.runtime import cpu_rank
from overspill.runtime.host_int8 import Int8Linear

from conftest import N_LAYERS
from test_cpu_rank import DENSE, _generate, _reference
from test_placement import load_tiny, prompts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_dequantized_product(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 64, generator=g) * 0.05).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    lin = Int8Linear(w, b)
    scale = lin.scales.float()[:, None]
    dequant = lin.weight_q.float() * scale
    # half a step per row, plus what rounding the scale to the compute dtype moves the 127th step
    rounding = 127 * (2**-8 if dtype == torch.bfloat16 else 1e-6)
    assert ((dequant - w.float()).abs() <= scale * (0.5 + rounding) + 1e-7).all()
    assert lin.weight_q.dtype == torch.int8 and int(lin.weight_q.abs().max()) == 127
    x = torch.randn(3, 5, 64, generator=g).to(dtype)
    want = F.linear(x.float(), dequant) + b.float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(lin(x).float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("arch", DENSE)
def test_int8_host_share_stays_close_to_resident(arch: str, tiny_checkpoint) -> None:
    path = tiny_checkpoint(arch)
    ref = _reference(path)
    model = load_tiny(path, resident=0)
    cpu_rank.enable(model, dict.fromkeys(range(N_LAYERS), 0.5), threads=1, host_format="int8")
    single, _, _ = prompts()
    with torch.no_grad():
        want = ref(single).logits[0]
        got = model(single).logits[0]  # 12 tokens <= max_tokens: the worker's int8 modules compute
    cosine = F.cosine_similarity(got, want, dim=-1)
    assert cosine.min() > 0.99
    assert not torch.allclose(got, want, atol=1e-5)  # the int8 copy is what ran, not the bf16 share
    with torch.no_grad():
        assert _generate(model, single)[0].shape == _generate(ref, single)[0].shape
