"""Stream formats on the CPU ring: lossless is bit-exact (random tensors with NaN, inf and subnormals,
SmolLM2's tensors, greedy tokens of every tiny architecture); int8, fp8 and int4 stay within their bounds."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig

import overspill
from overspill.api import placement_of
from overspill.errors import OverspillError
from overspill.planning.placement import streaming_plan
from overspill.planning.plan import Workload
from overspill.runtime import formats, quant
from overspill.runtime.formats import Expander, LossyLayer, encode_lossless
from overspill.runtime.layout import LayerLayout
from overspill.runtime.loader import build_skeleton, decoder_layers, footprint

from conftest import ARCHS, N_LAYERS, VOCAB

GEN = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)


def special_values(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """N(0, 0.02) weights salted with NaN, +-inf, +-0, subnormals and extremes of `dtype`."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * 0.02).to(dtype)
    info = torch.finfo(dtype)
    salt = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, info.tiny / 4, -info.tiny / 8,
                         info.smallest_normal, info.max, -info.max, info.eps], dtype=torch.float32).to(dtype)
    where = torch.randperm(n, generator=g)[: len(salt)]
    x[where] = salt
    return x


def lossless_round_trip(layout: LayerLayout, raw: torch.Tensor) -> torch.Tensor:
    """Encode `raw` (flat bytes of `layout`) as the loader does, then expand it as the ring does."""
    size = layout.nbytes
    expander = Expander(torch.device("cpu"), 0, size)
    staging = torch.empty(size, dtype=torch.uint8)
    encoded, coded = encode_lossless(layout, raw, staging, expander)
    assert len(encoded.chunks) == -(-(layout.nbytes // encoded.itemsize) // formats.CODE_CHUNK)
    host = torch.empty(encoded.nbytes, dtype=torch.uint8)  # what the pinned host buffer holds
    host[: encoded.low.nbytes] = staging[: encoded.low.nbytes]
    host[encoded.high.offset :] = coded
    slot = torch.full((size,), 0xAB, dtype=torch.uint8)
    encoded.expand(host, slot, expander)
    return slot


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lossless_round_trip_is_bit_exact_with_special_values(dtype: torch.dtype) -> None:
    layout = LayerLayout.of([("a.weight", (96, 64), dtype), ("b.weight", (64, 96), dtype), ("norm.weight", (64,), dtype)])
    raw = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for i, view in enumerate(layout.views(raw)):
        view.copy_(special_values(view.numel(), dtype, seed=i).view(view.shape))
    slot = lossless_round_trip(layout, raw)
    assert torch.equal(slot, raw)  # every byte, NaN payloads and the sign of zero included
    a = layout.views(slot)[0]
    assert a.isnan().any() and a.isinf().any() and ((a != 0) & (a.abs() < torch.finfo(dtype).smallest_normal)).any()


def test_lossless_high_plane_in_several_coded_chunks(monkeypatch) -> None:
    from overspill.runtime import formats

    monkeypatch.setattr(formats, "CODE_CHUNK", 1000)  # 64 MiB on real layers; 7 chunks here
    layout = LayerLayout.of([("a.weight", (96, 64), torch.bfloat16)])
    raw = torch.zeros(layout.nbytes, dtype=torch.uint8)
    layout.views(raw)[0].copy_(special_values(96 * 64, torch.bfloat16).view(96, 64))
    assert torch.equal(lossless_round_trip(layout, raw), raw)


def test_lossless_round_trip_of_smollm2_layers(default_model_dir) -> None:
    """SmolLM2-135M's own bf16 tensors (the embedded GGUF's Q4_1 weights dequantized, as a resident load
    holds them): two whole decoder layers."""
    model, _ = overspill.load(default_model_dir, dtype="bfloat16", gpu_memory=None, progress=False)
    for layer in (0, 17):
        named = sorted(model.model.layers[layer].state_dict().items())
        assert all(t.dtype == torch.bfloat16 for _, t in named) and len(named) == 9
        layout = LayerLayout.of([(k, tuple(t.shape), t.dtype) for k, t in named])
        raw = torch.zeros(layout.nbytes, dtype=torch.uint8)
        for view, (_, t) in zip(layout.views(raw), named):
            view.copy_(t)
        slot = lossless_round_trip(layout, raw)
        assert torch.equal(slot, raw)
        for view, (_, t) in zip(layout.views(slot), named):
            assert torch.equal(view.view(torch.int16), t.view(torch.int16))


def _layer(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """Encode and expand one weight through `LossyLayer`, as the loader and the ring do."""
    layout = LayerLayout.of([("w", tuple(weight.shape), weight.dtype)])
    raw = torch.zeros(layout.nbytes, dtype=torch.uint8)
    layout.views(raw)[0].copy_(weight)
    layer = LossyLayer.of(kind, layout)
    staging = torch.empty(layer.nbytes, dtype=torch.uint8)
    layer.encode(layout, raw, staging)
    slot = torch.zeros(layout.nbytes, dtype=torch.uint8)
    layer.expand(staging, slot, Expander(torch.device("cpu"), 0, 0))
    return layout.views(slot)[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_error_is_half_a_step_per_group(dtype: torch.dtype) -> None:
    w = (torch.randn(64, 256) * 0.02).to(dtype)
    w[3, 5] = 0.5  # an outlier coarsens its own group of 128 inputs only
    got = _layer("int8", w).float().view(64, 2, 128)
    g = w.float().view(64, 2, 128)
    step = g.abs().amax(dim=-1, keepdim=True) / 127  # the group's scale
    rounding = got.abs() * torch.finfo(dtype).eps  # the expanded value's own rounding
    assert ((got - g).abs() <= step / 2 + rounding + 1e-12).all()
    # the outlier's row: its other groups keep their fine steps, under a quarter of what one scale a row would give
    assert (got - g)[3, 1:].abs().max() < 0.5 / 127 / 2 / 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_error_is_e4m3_rounding(dtype: torch.dtype) -> None:
    w = (torch.randn(64, 256) * 0.02).to(dtype)
    w[3, 5] = 0.5
    got = _layer("fp8", w).float().view(64, 2, 128)
    g = w.float().view(64, 2, 128)
    scale = 2 * g.abs().amax(dim=-1, keepdim=True) / 448  # the largest scale a group may choose
    # e4m3: 3 mantissa bits, half a unit = 2^-4 relative; below 2^-6 (subnormal) half a unit = 2^-10 absolute
    bound = g.abs() * 2**-4 + scale * 2**-10 + got.abs() * torch.finfo(dtype).eps
    assert ((got - g).abs() <= bound + 1e-12).all()


def test_fp8_scales_are_chosen_for_least_error() -> None:
    """Each group's scale errs no more than mapping its largest magnitude to 448 (the first scale tried),
    and over many groups clearly less (~0.79 of the squared error on N(0, 0.02) weights)."""
    w = torch.randn(64, 1024) * 0.02
    g = w.view(64, 8, 128)
    plain = g.abs().amax(dim=-1, keepdim=True) / 448
    plain_error = ((g / plain).to(torch.float8_e4m3fn).float() * plain - g).square().sum(dim=-1)
    error = (_layer("fp8", w).view(64, 8, 128) - g).square().sum(dim=-1)
    assert (error <= plain_error * (1 + 1e-5)).all()
    assert error.sum() < 0.88 * plain_error.sum()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_error_is_half_a_step_per_group(dtype: torch.dtype) -> None:
    w = (torch.randn(16, 512) * 0.02).to(dtype)
    got = _layer("int4", w).float().view(16, 4, 128)
    g = w.float().view(16, 4, 128)
    step = (g.amax(dim=-1, keepdim=True) - g.amin(dim=-1, keepdim=True)) / 15
    # half a step, plus the bf16 rounding of the stored scale and zero and of the expanded value
    slack = (g.abs().amax(dim=-1, keepdim=True) + g.abs()) * 2**-7
    assert ((got - g).abs() <= step / 2 + slack).all()
    # codes are rounded, not truncated: rounding errs by step / 4 on average (as likely to miss it as not), truncating by step / 2
    assert (got - g).abs().mean() < (step / 3).mean()


def test_int4_expands_in_chunks_through_the_planned_scratch_in_one_rounding(monkeypatch) -> None:
    # Each chunk of rows unpacks its codes into the scratch `expand_scratch_bytes` plans, then one fused
    # multiply-add in float32 writes the slot: the value is (q - 8) * scale + zero rounded once, whatever
    # the chunking, and a planned scratch means no allocation.
    from overspill.planning.formats import expand_scratch_bytes, int4_scratch_bytes

    w = (torch.randn(48, 640) * 0.02).to(torch.bfloat16)
    parts = [torch.empty(shape, dtype=dtype) for shape, dtype in quant.part_shapes("int4", tuple(w.shape))]
    quant.encode("int4", w.clone(), parts)
    packed, scale, zero = parts
    q = torch.stack([packed >> 4, packed & 15], dim=-1).view(48, 5, 128).float()
    want = ((q - 8) * scale.float() + zero.float()).view(48, 640).to(torch.bfloat16)
    whole = torch.empty_like(w)
    quant.expand("int4", parts, whole)
    assert torch.equal(whole, want)
    monkeypatch.setattr(quant, "INT4_CHUNK_CODES", 7 * 640)  # 7 rows a chunk: 7 chunks, the last of 6 rows
    scratch = torch.empty(int4_scratch_bytes(7 * 640), dtype=torch.uint8)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: pytest.fail("allocated beside the planned scratch"))
    chunked = torch.zeros_like(w)
    quant.expand("int4", parts, chunked, scratch)
    assert torch.equal(chunked, want)
    assert expand_scratch_bytes("int4", 48 * 640 * 2, 2) == int4_scratch_bytes(48 * 640)  # a layer under a chunk


def test_lossy_formats_keep_vectors_and_odd_shapes_raw() -> None:
    layout = LayerLayout.of([("w", (8, 64), torch.bfloat16), ("odd", (8, 66), torch.bfloat16),
                             ("norm", (66,), torch.bfloat16)])
    int4 = LossyLayer.of("int4", layout)
    assert [t.kind for t in int4.tensors] == ["int4", "raw", "raw"]  # 66 inputs: no group of 32, 64 or 128 divides
    int8 = LossyLayer.of("int8", layout)
    assert [t.kind for t in int8.tensors] == ["int8", "int8", "raw"]
    assert quant.part_shapes("int8", (4, 3, 8)) == [((12, 8), torch.int8), ((12, 1, 1), torch.float32)]  # fused experts


def test_int8_and_fp8_scale_groups_fall_back_as_int4s() -> None:
    # a float32 scale per 128 inputs; else the largest of 64 or 32 that divides the inputs; else one a row
    assert quant.part_shapes("fp8", (8, 1536)) == [((8, 1536), torch.float8_e4m3fn), ((8, 12, 1), torch.float32)]
    assert quant.part_shapes("fp8", (8, 576)) == [((8, 576), torch.float8_e4m3fn), ((8, 9, 1), torch.float32)]
    assert quant.part_shapes("int8", (8, 96)) == [((8, 96), torch.int8), ((8, 3, 1), torch.float32)]
    assert quant.part_shapes("int8", (8, 66)) == [((8, 66), torch.int8), ((8, 1, 1), torch.float32)]
    w = (torch.randn(8, 66) * 0.02).to(torch.bfloat16)  # one scale a row still expands within half its step
    step = w.float().abs().amax(dim=1, keepdim=True) / 127
    got = _layer("int8", w).float()
    assert ((got - w.float()).abs() <= step / 2 + got.abs() * torch.finfo(torch.bfloat16).eps).all()


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_planned_bytes_are_the_encoded_bytes(fmt: str) -> None:
    """The planner's torch-free count (`planning.formats.encoded_bytes`) is the runtime's layout, byte
    for byte, for matrices whose inputs divide into whole groups (a Llama-3-8B layer's shapes)."""
    from overspill.planning.formats import encoded_bytes

    layout = LayerLayout.of([("q", (4096, 4096), torch.bfloat16), ("k", (1024, 4096), torch.bfloat16),
                             ("up", (14336, 4096), torch.bfloat16), ("down", (4096, 14336), torch.bfloat16)])
    assert LossyLayer.of(fmt, layout).nbytes == encoded_bytes(fmt, layout.nbytes, 2)


def tiny_plan(path, dtype: torch.dtype, streamed: int = 6):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = build_skeleton(AutoConfig.from_pretrained(str(path)), dtype)
    fp = footprint(skeleton, decoder_layers(skeleton)[1], dtype)
    return streaming_plan(fp, Workload(64, 1, activation_floor=0), streamed)


def prompt() -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_streaming_gives_bf16_streamings_tokens(arch: str, dtype: torch.dtype, tiny_checkpoint) -> None:
    path = tiny_checkpoint(arch)
    plan = tiny_plan(path, dtype)
    out = {}
    for fmt in ("bf16", "lossless"):
        model, _ = overspill.load(path, dtype=dtype, plan=plan, progress=False, stream_format=fmt)
        placement = placement_of(model)
        assert placement.plan.stream_format == fmt and len(placement.plan.streamed_layers) == 6
        with torch.no_grad():
            gen = model.generate(prompt(), return_dict_in_generate=True, output_logits=True, **GEN)
        out[fmt] = gen.sequences, torch.stack(gen.logits)
        if fmt == "lossless":
            # the link carries the measured encoded bytes; each staging buffer fits the largest encoded layer
            ring = placement.ring
            assert placement.plan.streamed_bytes_per_step == placement.host_bytes < plan.streamed_bytes_per_step
            assert all(layer.encoded is not None for layer in ring.layers)
            assert len(ring.expander.staging) == 2
            assert ring.expander.staging[0].numel() >= max(layer.host.numel() for layer in ring.layers)
            assert placement.plan.expand_bytes == ring.expander.nbytes
    assert torch.equal(out["lossless"][0], out["bf16"][0])
    assert torch.equal(out["lossless"][1], out["bf16"][1])  # same bits in, same logits out


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lossy_formats_stream_every_architecture(arch: str, fmt: str, tiny_checkpoint) -> None:
    path = tiny_checkpoint(arch)
    plan = tiny_plan(path, torch.float32)
    ref, _ = overspill.load(path, dtype="float32", plan=plan, progress=False)
    model, _ = overspill.load(path, dtype="float32", plan=plan, progress=False, stream_format=fmt)
    placement = placement_of(model)
    assert placement.host_bytes == placement.plan.streamed_bytes_per_step < plan.streamed_bytes_per_step
    with torch.no_grad():
        want, got = ref(prompt()).logits, model(prompt()).logits
    assert got.isfinite().all()
    # logits move by the quantization error only: int8 and fp8 closely, int4 more (mixtral: routing can flip)
    agreement = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert agreement > {"int8": 0.995, "fp8": 0.98, "int4": 0.9}[fmt]


def test_budget_plans_count_encoded_slots(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama")
    bf16, _ = overspill.load(path, gpu_memory="1MiB", dtype="float32", context=64, progress=False)
    int8, _ = overspill.load(path, gpu_memory="1MiB", dtype="float32", context=64, progress=False, stream_format="int8")
    a, b = placement_of(bf16).plan, placement_of(int8).plan
    assert b.slot_bytes == a.slot_bytes and b.expand_bytes > 0 and b.device_bytes <= 2**20
    assert b.streamed_bytes_per_step < a.streamed_bytes_per_step * len(b.streamed_layers) / len(a.streamed_layers) / 3
    assert len(b.streamed_layers) <= N_LAYERS
    # encoded copies land in the two staging buffers, so their ring keeps one slot fewer (`placement.ring_slots`)
    assert (a.slots, b.slots) == (3, 2) and placement_of(int8).ring.n_slots == 2


def test_a_two_slot_encoded_ring_gives_bf16_streamings_tokens(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama")
    out = {}
    for fmt in ("bf16", "lossless"):
        model, _ = overspill.load(path, gpu_memory="1MiB", dtype="float32", context=64, progress=False,
                                  stream_format=fmt)
        assert placement_of(model).ring.n_slots == (3 if fmt == "bf16" else 2)
        with torch.no_grad():
            out[fmt] = model.generate(prompt(), **GEN)
    assert torch.equal(out["lossless"], out["bf16"])


def test_stream_format_errors_say_what_to_do(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama")
    with pytest.raises(OverspillError, match="use one of bf16, int8, fp8, int4, lossless, auto"):
        overspill.load(path, dtype="float32", progress=False, stream_format="int5")


@pytest.mark.parametrize("fmt", ["lossless", "int4"])
def test_encoded_layers_are_cached_for_the_next_load(fmt: str, tiny_checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OVERSPILL_CACHE", str(tmp_path))
    path = tiny_checkpoint("qwen3")
    plan = tiny_plan(path, torch.bfloat16)
    runs = []
    for _ in range(2):
        model, _ = overspill.load(path, dtype="bfloat16", plan=plan, progress=False, stream_format=fmt)
        with torch.no_grad():
            runs.append((model.generate(prompt(), **GEN), placement_of(model)))
    (first, a), (second, b) = runs
    assert not any("encoded cache" in n for n in a.plan.notes)
    assert any(n.startswith("6 ") and "read from the encoded cache" in n for n in b.plan.notes)
    assert torch.equal(first, second)
    for x, y in zip(a.ring.layers, b.ring.layers):
        assert torch.equal(x.host, y.host) and x.encoded == y.encoded
    folder = next((tmp_path / "encoded").iterdir())
    assert len(list(folder.glob("*.bin"))) == 6 and folder.name.startswith(f"{path.name}-{fmt}-")


def test_a_changed_checkpoint_gets_a_new_cache_key(tmp_path) -> None:
    from overspill.runtime.encoded_cache import cache_folder

    (tmp_path / "model.safetensors").write_bytes(b"x")
    before = cache_folder(tmp_path, "int8", torch.bfloat16, "torch")
    (tmp_path / "model.safetensors").write_bytes(b"xy")
    assert cache_folder(tmp_path, "int8", torch.bfloat16, "torch") != before
    assert cache_folder(tmp_path, "int4", torch.bfloat16, "torch") != cache_folder(tmp_path, "int8", torch.bfloat16, "torch")


def test_the_self_draft_needs_bf16_host_buffers(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama")
    with pytest.raises(OverspillError, match="use --stream-format bf16 with it"):
        overspill.load(path, dtype="float32", progress=False, plan=tiny_plan(path, torch.float32),
                       speculate="self", stream_format="int8")


def test_the_cache_is_not_written_where_the_disk_lacks_room(tmp_path, monkeypatch) -> None:
    from overspill.runtime.encoded_cache import EncodedCache

    monkeypatch.setenv("OVERSPILL_CACHE", str(tmp_path))
    layout = LayerLayout.of([("w", (8, 64), torch.bfloat16)])
    layer = LossyLayer.of("int8", layout)
    buffer = torch.zeros(layer.nbytes, dtype=torch.uint8)
    full = EncodedCache(tmp_path / "encoded" / "m-int8-x", "int8", total_bytes=2**62)  # more than any disk
    full.write(0, layout, layer, buffer)
    assert not full.writable and not (tmp_path / "encoded").exists()
    roomy = EncodedCache(tmp_path / "encoded" / "m-int8-x", "int8", total_bytes=layer.nbytes)
    roomy.write(0, layout, layer, buffer)
    assert roomy.writes == 1 and roomy.read(0, layout, lambda n: torch.empty(n, dtype=torch.uint8))[0] == layer


def test_staging_grown_past_the_budget_is_noted(tiny_checkpoint) -> None:
    """Lossless is planned at a prior ratio; layers that code worse grow their staging after load, and
    the placed plan says by how much it then exceeds the budget (its device total is the measured one)."""
    from types import SimpleNamespace

    from overspill.runtime.loader import _measured_format

    plan = tiny_plan(tiny_checkpoint("llama"), torch.float32)
    layers = [SimpleNamespace(host=torch.empty(1000, dtype=torch.uint8), layout=SimpleNamespace(nbytes=1200))]
    expander = SimpleNamespace(nbytes=0, grow_staging=lambda n: None, codec=lambda: SimpleNamespace(name="zlib"))
    ring = SimpleNamespace(layers=layers, expander=expander)
    fits = _measured_format(replace(plan, stream_format="lossless", budget_bytes=plan.device_bytes), ring, None)
    assert fits.streamed_bytes_per_step == 1000 and not any("more than the budget" in n for n in fits.notes)
    expander.nbytes = plan.expand_bytes + 3 * 2**20
    over = _measured_format(replace(plan, stream_format="lossless", budget_bytes=plan.device_bytes), ring, None)
    assert over.device_bytes == plan.device_bytes + 3 * 2**20
    assert any("3 MiB more than the budget" in n and "--stream-format bf16" in n for n in over.notes)


def test_auto_format_stays_bf16_where_the_load_streams_only_uncompressed_layers() -> None:
    """What a load asks for that cannot stream encoded layers makes "auto" pick bf16 instead of a refusal."""
    from overspill.planning.formats import format_blocker

    assert format_blocker("auto", False, None) is None
    assert format_blocker("auto", True, None) == "CUDA graphs"
    assert format_blocker("managed", False, None) == "streaming='managed'"
    assert format_blocker("mapped", True, None) == "streaming='mapped'"
    assert format_blocker("copy", True, "self") == "speculate='self'"
    assert format_blocker(cpu_compute=0.5) == format_blocker(cpu_compute="on") == "the CPU rank"
    assert format_blocker(cpu_compute="auto") is None  # the CPU rank's auto turns itself off beside lossless


def test_lossless_without_nvcomp_on_a_gpu_is_one_clear_error_and_auto_falls_back(monkeypatch) -> None:
    # issue 15: without the codec `lossless` is a one-line error saying what to install; `auto` streams bf16 with a note
    from overspill import api
    from overspill.runtime import lossless_codec

    monkeypatch.setattr(lossless_codec, "codec_installed", lambda: False)
    cuda = torch.device("cuda", 0)
    with pytest.raises(OverspillError, match=r"lossless needs nvCOMP on a GPU: pip install 'overspill\[compress\]'"):
        api._stream_format("lossless", cuda, None)
    fmt, note = api._stream_format("auto", cuda, None)
    assert fmt == "bf16" and "pip install 'overspill[compress]'" in note
    assert api._stream_format("lossless", torch.device("cpu"), None) == ("lossless", None)  # zlib on the CPU


def test_the_probed_decode_rate_replaces_the_prior(monkeypatch) -> None:
    # issue 15: the probe measures the codec on this GPU; auto, the expansion time and `plan` use it
    from overspill import api
    from overspill.planning import formats as plan_formats
    from overspill.planning.formats import choose, with_format
    from overspill.planning.placement import plan_for
    from overspill.planning.profile import REFERENCE_PROFILES, Profile
    from overspill.runtime import lossless_codec

    from test_formats_plan import LLAMA3_8B, PARAMS, GiB

    H100 = REFERENCE_PROFILES["h100-pcie5"]

    assert H100.lossless_decode_bytes_s == 0 and H100.decode_bytes_s == plan_formats.ANS_DECODE_BYTES_S
    slow = replace(H100, lossless_decode_bytes_s=40e9)  # slower than the 54 GB/s link
    assert Profile.from_json(slow.to_json()) == slow and "lossless decode" in slow.summary()
    monkeypatch.setattr(lossless_codec, "codec_installed", lambda: True)
    assert api._stream_format("auto", torch.device("cuda", 0), H100) == ("lossless", None)
    fmt, note = api._stream_format("auto", torch.device("cuda", 0), slow)
    assert fmt == "bf16" and "decodes at 40 GB/s, no faster than the 54 GB/s link" in note
    lossless = with_format(LLAMA3_8B, choose(LLAMA3_8B, "lossless"))
    fast_plan, slow_plan = (plan_for(lossless, p, Workload(), 6 * GiB) for p in (H100, slow))
    layers = len(fast_plan.streamed_layers)
    extra = layers * (PARAMS / 40e9 - PARAMS / plan_formats.ANS_DECODE_BYTES_S)  # the high plane at the slower rate
    assert slow_plan.prediction.expand_s == pytest.approx(fast_plan.prediction.expand_s + extra)
