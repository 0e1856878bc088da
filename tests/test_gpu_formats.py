"""Stream formats on CUDA (`pytest -m gpu tests/test_gpu_formats.py` on the GPU machine): lossless through
nvCOMP is bit-exact and gives bf16 streaming's tokens; int8 / fp8 / int4 expand on the GPU as on the CPU;
the 8B shape at 6 GiB streams in every format within its budget."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, gpu_memory_before
from test_stream_formats import _layer, special_values, tiny_plan

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]


def nvcomp_or_skip() -> None:
    from overspill.runtime.lossless_codec import codec_installed

    if not codec_installed():
        pytest.skip("nvCOMP is not installed (pip install 'overspill[compress]'; bench/fetch_gpu_wheels.sh)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nvcomp_lossless_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    from overspill.runtime.formats import Expander, encode_lossless
    from overspill.runtime.layout import LayerLayout

    nvcomp_or_skip()
    dev = torch.device("cuda")
    layout = LayerLayout.of([("a", (4096, 1024), dtype), ("b", (1024, 4096), dtype), ("norm", (1024,), dtype)])
    raw = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for i, view in enumerate(layout.views(raw)):
        view.copy_(special_values(view.numel(), dtype, seed=i).view(view.shape))
    raw = raw.to(dev)
    expander = Expander(dev, 0, layout.nbytes)
    staging = torch.empty(layout.nbytes, dtype=torch.uint8, device=dev)
    encoded, coded = encode_lossless(layout, raw, staging, expander)
    assert encoded.nbytes < layout.nbytes  # N(0, 0.02) exponents compress
    packed = torch.empty(encoded.nbytes, dtype=torch.uint8, device=dev)
    packed[: encoded.low.nbytes] = staging[: encoded.low.nbytes]
    packed[encoded.high.offset :] = coded
    slot = torch.full((layout.nbytes,), 0xAB, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # as the ring runs it: on its expand stream
        encoded.expand(packed, slot, expander)
    side.synchronize()
    assert torch.equal(slot, raw)


@pytest.mark.parametrize("kind", ["int8", "fp8", "int4"])
def test_lossy_expansion_on_cuda_matches_the_cpu(kind: str) -> None:
    w = (torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    cpu = _layer(kind, w).float()
    gpu = _cuda_layer(kind, w).float()
    # CUDA's division and rounding may put a value at a half step on the other side, or (fp8) pick
    # another of two near-equal scales for a group: nearly every value equal, the error no larger
    same = torch.isclose(gpu, cpu, rtol=2**-7, atol=1e-6).float().mean()
    assert same >= 0.99
    err = lambda x: float(((x - w.float()) ** 2).sum())  # noqa: E731
    assert err(gpu) <= 1.01 * err(cpu)


def _cuda_layer(kind: str, weight: torch.Tensor) -> torch.Tensor:
    from overspill.runtime.formats import Expander, LossyLayer
    from overspill.runtime.layout import LayerLayout

    dev = torch.device("cuda")
    layout = LayerLayout.of([("w", tuple(weight.shape), weight.dtype)])
    raw = torch.zeros(layout.nbytes, dtype=torch.uint8, device=dev)
    layout.views(raw)[0].copy_(weight)
    layer = LossyLayer.of(kind, layout)
    staging = torch.empty(layer.nbytes, dtype=torch.uint8, device=dev)
    layer.encode(layout, raw, staging)
    slot = torch.zeros(layout.nbytes, dtype=torch.uint8, device=dev)
    layer.expand(staging, slot, Expander(dev, 0, 0))
    return layout.views(slot)[0].cpu()


@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_tokens_equal_bf16_streaming_on_cuda(arch: str, tiny_checkpoint) -> None:
    import overspill
    from overspill.api import placement_of

    nvcomp_or_skip()
    path = tiny_checkpoint(arch)
    plan = tiny_plan(path, torch.bfloat16)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(7)).cuda()
    out = {}
    for fmt in ("bf16", "lossless"):
        model, _ = overspill.load(path, dtype="bfloat16", plan=plan, progress=False, stream_format=fmt)
        placement = placement_of(model)
        assert placement.plan.stream_format == fmt
        gen = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
        out[fmt] = gen.sequences, torch.stack(gen.logits)
        assert placement.ring.restarts == 1
    assert torch.equal(out["lossless"][0], out["bf16"][0])
    assert torch.equal(out["lossless"][1], out["bf16"][1])


@pytest.mark.parametrize("fmt", ["bf16", "int8", "fp8", "int4", "lossless"])
def test_llama3_8b_shape_at_6gib_in_each_format(fmt: str) -> None:
    """Every format plans and runs the 8B shape inside 6 GiB (the slots hold both forms); lossless gives bf16's tokens."""
    import overspill
    from overspill.api import placement_of

    if fmt == "lossless":
        nvcomp_or_skip()
    before = gpu_memory_before()
    ids = torch.randint(0, 128256, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
    model, _ = overspill.load("llama-3-8b", gpu_memory="6GiB", random_weights=True, progress=False, context=256,
                              stream_format=fmt)
    placement = placement_of(model)
    plan = placement.plan
    assert plan.streamed_layers and plan.stream_format == fmt
    got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.cuda.max_memory_allocated() - before <= 6 * 2**30
    assert placement.ring.restarts == 1
    if fmt != "bf16":
        assert plan.streamed_bytes_per_step < 0.9 * sum(layer.layout.nbytes for layer in placement.ring.layers)
    TOKENS[fmt] = got.cpu()
    if fmt == "lossless" and "bf16" in TOKENS:
        assert torch.equal(TOKENS["lossless"], TOKENS["bf16"])


TOKENS: dict[str, torch.Tensor] = {}  # per format, for lossless against bf16 (parametrized in this order)


def test_auto_picks_lossless_where_nvcomp_is_installed(tiny_checkpoint) -> None:
    import overspill
    from overspill.api import placement_of

    nvcomp_or_skip()
    path = tiny_checkpoint("llama")
    model, _ = overspill.load(path, dtype="bfloat16", plan=tiny_plan(path, torch.bfloat16), progress=False)
    assert placement_of(model).plan.stream_format == "lossless"


def _int4_parts(shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """int4 parts of N(0, 0.02) weights whose rows span 2^-10 to 2^10 of that (rounding at every magnitude)."""
    from overspill.runtime import quant

    gen = torch.Generator("cuda").manual_seed(seed)
    w = torch.randn(shape, generator=gen, device="cuda") * 0.02
    w *= 2.0 ** torch.randint(-10, 11, (*shape[:-1], 1), generator=gen, device="cuda")
    parts = [torch.empty(s, dtype=d, device="cuda") for s, d in quant.part_shapes("int4", shape)]
    quant.encode("int4", w.to(torch.bfloat16), parts)
    return parts


def _counting_launches(monkeypatch) -> list:
    from overspill.runtime import int4_kernel

    pytest.importorskip("triton")
    calls, launch = [], int4_kernel.launch
    monkeypatch.setattr(int4_kernel, "launch", lambda *a: calls.append(a[-1].shape) or launch(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336), (1024, 4096), (8, 2048, 1024), (4097, 1024),
                                   (1023, 192), (333, 96)])  # the last two: groups of 64 and 32
def test_int4_triton_expansion_equals_the_torch_path_bit_for_bit(shape, dtype, monkeypatch) -> None:
    from overspill.runtime import int4_kernel, quant

    calls = _counting_launches(monkeypatch)
    parts = _int4_parts(shape)
    rows, cols = quant.rows_cols(shape)
    want = torch.full((rows, cols), float("nan"), dtype=dtype, device="cuda")
    quant._expand_int4_torch(*parts, want, None)
    out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    quant.expand("int4", parts, out)  # as the ring does: on CUDA the Triton kernel, one launch
    assert calls == [(rows, cols)] and int4_kernel._kernel not in (None, False)
    assert torch.equal(out.view(rows, cols), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_triton_expansion_of_any_codes_and_scales_equals_the_torch_path(group, dtype, monkeypatch) -> None:
    # every byte, scales from 2^-54 to 2^14 and zeros around them: ties, fp16 subnormals, underflow to 0 and
    # overflow to inf all round as torch rounds them
    from overspill.runtime import quant

    calls = _counting_launches(monkeypatch)
    gen = torch.Generator("cuda").manual_seed(group)
    rows, cols = 517, 4 * group
    packed = torch.randint(0, 256, (rows, cols // 2), generator=gen, dtype=torch.uint8, device="cuda")
    e = torch.randint(-30, 14, (rows, cols // group, 1), generator=gen, device="cuda").float()
    scale = (torch.rand(e.shape, generator=gen, device="cuda") * 2**e).to(torch.bfloat16)
    zero = (torch.randn(e.shape, generator=gen, device="cuda") * 2 ** (e + 2)).to(torch.bfloat16)
    want = torch.empty(rows, cols, dtype=dtype, device="cuda")
    quant._expand_int4_torch(packed, scale, zero, want, None)
    out = torch.empty(rows, cols, dtype=dtype, device="cuda")
    quant.expand("int4", [packed, scale, zero], out)
    assert len(calls) == 1 and torch.equal(out, want)
