"""Checkpoints that arrive quantized (GPTQ, AWQ, FP8): the streamed layers keep the checkpoint's codes and
expand to the reference dequantization bit for bit; the model decodes as the same model built resident
from the dequantized weights; the link carries the quantized bytes; unsupported configs are one-line errors.

The checkpoints are built here from a tiny random llama: its decoder matrices quantized by a reference
quantizer of our own and packed as each format lays them out (GPTQ: 8 codes an int32 along the inputs,
low nibble first, v1 storing zero - 1; AWQ: 8 codes an int32 along the outputs in the order
0 2 4 6 1 3 5 7; FP8: e4m3 codes with float32 per-tensor, per-channel or [128, 128] block scales), beside
a plain checkpoint of the same model holding the reference dequantization in float32.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import overspill
from overspill import cli
from overspill.api import placement_of
from overspill.errors import OverspillError
from overspill.planning.prequantized import scheme_of
from overspill.runtime import quant
from overspill.runtime.formats import Expander, LossyLayer
from overspill.runtime.layout import LayerLayout
from overspill.runtime.prequantized import QuantizedReader

from conftest import SPECIAL

LAYERS = 6
CONFIG = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 256, "max_position_embeddings": 256,
          "initializer_range": 0.1, **SPECIAL}
MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GEN = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
# name -> (quantization_config, how the test packs it)
SCHEMES = {
    "gptq-sym": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                  "checkpoint_format": "gptq"}, "gptq"),
    "gptq-asym-v1": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
                      "checkpoint_format": "gptq"}, "gptq"),
    "gptq-asym-v2": ({"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False, "sym": False,
                      "checkpoint_format": "gptq_v2"}, "gptq"),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}, "awq"),
    "fp8-tensor": ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": None}, "tensor"),
    "fp8-block": ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, "block"),
    "ct-fp8-channel": ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}},
        "ignore": ["lm_head"]}, "channel"),
}


# --- a reference quantizer and the checkpoints' packings -----------------------------------------------

def pack(x: torch.Tensor, order=tuple(range(8)), dim: int = 0) -> torch.Tensor:
    """Integers 0..15 of `x` packed eight an int32 along `dim`: nibble k (bits 4k..4k+3) holds the element
    8c + order[k] of pack c."""
    a = x.numpy().astype(np.uint32)
    a = a if dim == 0 else a.T
    out = np.zeros((a.shape[0] // 8, a.shape[1]), dtype=np.uint32)
    for k, j in enumerate(order):
        out |= a[j::8] << np.uint32(4 * k)
    out = out if dim == 0 else out.T
    return torch.from_numpy(np.ascontiguousarray(out).view(np.int32))


def quantize_int4(w: torch.Tensor, group: int, sym: bool, v1: bool):
    """(codes [out, in] 0..15, zeros [out, groups] integers, fp16 scales [out, groups]) of `w` [out, in]:
    GPTQ's min/max grid (symmetric: zero 8). v1 zeros stay >= 1 (auto-gptq stores zero - 1)."""
    out_f, in_f = w.shape
    group = in_f if group == -1 else group
    g = w.view(out_f, in_f // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    if sym:
        scale = torch.maximum(-lo, hi) * 2 / 15
        zero = torch.full_like(scale, 8)
    else:
        scale = (hi - lo) / 15
        zero = (-lo / scale).round().clamp(1 if v1 else 0, 15)
    scale = scale.clamp(min=1e-4).half()
    q = (g / scale.float()[..., None]).round() + zero[..., None]
    return q.clamp(0, 15).to(torch.int32).view(out_f, in_f), zero.to(torch.int32), scale


def dequantize_int4(q, zero, scale) -> torch.Tensor:
    """The reference: scale * (q - zero) in float32 (exact), by groups."""
    out_f, in_f = q.shape
    groups = scale.shape[1]
    w = (q.view(out_f, groups, -1) - zero[..., None]).float() * scale.float()[..., None]
    return w.view(out_f, in_f)


def gptq_tensors(q, zero, scale, v1: bool, group: int) -> dict[str, torch.Tensor]:
    in_f = q.shape[1]
    return {"qweight": pack(q.t()), "qzeros": pack((zero - int(v1)).t() & 15, dim=1),
            "scales": scale.t().contiguous(), "g_idx": torch.arange(in_f, dtype=torch.int32) // (in_f if group == -1 else group)}


def awq_tensors(q, zero, scale) -> dict[str, torch.Tensor]:
    return {"qweight": pack(q.t(), AWQ_ORDER, dim=1), "qzeros": pack(zero.t(), AWQ_ORDER, dim=1),
            "scales": scale.t().contiguous()}


def quantize_fp8(w: torch.Tensor, how: str):
    """(e4m3 codes, stored scale, the scale of each weight) of `w` [out, in] per tensor, channel or 128x128 block."""
    out_f, in_f = w.shape
    if how == "tensor":
        stored = (w.abs().amax() / 448).reshape(1)
        full = stored.expand(out_f, in_f)
    elif how == "channel":
        stored = (w.abs().amax(1, keepdim=True) / 448).to(torch.bfloat16)  # compressed-tensors keeps the model's dtype
        full = stored.float().expand(out_f, in_f)
    else:
        b = w.new_zeros(-(-out_f // 128), -(-in_f // 128))
        for r in range(b.shape[0]):
            for c in range(b.shape[1]):
                b[r, c] = w[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128].abs().amax() / 448
        stored = b
        full = b.repeat_interleave(128, 0)[:out_f].repeat_interleave(128, 1)[:, :in_f]  # as transformers expands them
    codes = (w / full.float()).to(torch.float8_e4m3fn)
    return codes, stored, full.float()


def build(root: Path, name: str) -> tuple[Path, Path]:
    """(the quantized checkpoint, the plain one holding its reference dequantization) for scheme `name`."""
    qconfig, how = SCHEMES[name]

    def quantize_matrix(base: str, t: torch.Tensor):
        if how in ("gptq", "awq"):
            group, v1 = qconfig["group_size"], qconfig.get("checkpoint_format") == "gptq"
            q, zero, scale = quantize_int4(t, group, qconfig.get("sym", False), v1)
            parts = gptq_tensors(q, zero, scale, v1, group) if how == "gptq" else awq_tensors(q, zero, scale)
            return {f"{base}.{k}": v for k, v in parts.items()}, dequantize_int4(q, zero, scale)
        codes, stored, full = quantize_fp8(t, how)
        scale_key = f"{base}.weight_scale" + ("_inv" if qconfig["quant_method"] == "fp8" else "")
        return {f"{base}.weight": codes, scale_key: stored}, codes.float() * full

    storage = torch.float16 if how in ("gptq", "awq") else torch.bfloat16
    return build_pair(root, name, storage, qconfig, quantize_matrix)


def build_pair(root: Path, name: str, storage: torch.dtype, qconfig: dict, quantize_matrix) -> tuple[Path, Path]:
    """(`root`/`name`-q, the quantized checkpoint, and `root`/`name`-ref, the plain one holding its reference
    dequantization) of the tiny random llama (CONFIG, seed 0): each decoder matrix `base` [out, in] float32
    through `quantize_matrix(base, w)` -> (the quantized checkpoint's tensors for it, its reference
    dequantization), every other tensor in `storage` (the checkpoints' dtype) in both; `qconfig` the
    quantized one's quantization_config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(d.pop("model_type"), **d)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    quantized, plain = {}, {}
    for key, t in model.state_dict().items():
        base = key[: -len(".weight")]
        if not any(base.endswith(m) for m in MATRICES) or ".layers." not in key:
            quantized[key] = plain[key] = t.to(storage).contiguous()
            continue
        tensors, plain[key] = quantize_matrix(base, t)
        quantized.update(tensors)
    paths = []
    for kind, tensors, extra in (("q", quantized, {"quantization_config": qconfig}), ("ref", plain, {})):
        path = root / f"{name}-{kind}"
        path.mkdir()
        save_file(tensors, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": str(storage)[6:], **extra}))
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`checkpoints(name)`: `build`'s pair for scheme `name`, built once."""
    return functools.cache(functools.partial(build, tmp_path_factory.mktemp("prequantized")))


def reader_of(qdir: Path) -> QuantizedReader:
    return QuantizedReader(qdir, scheme_of(json.loads((qdir / "config.json").read_text())))


def prompt() -> torch.Tensor:
    return torch.randint(3, CONFIG["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(7))


# --- (a) repacking: the expanded weight is the reference dequantization, bit for bit ---------------------

def check_round_trip(qdir: Path, ref: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Two layers' weights through `parts_of` and `fill_parts` (host buffers, as the loader fills them), then
    expanded on `device` as the ring does: bit for bit the reference dequantization rounded once to `dtype`,
    as is the resident fill."""
    from safetensors import safe_open

    reader = reader_of(qdir)
    scheme = reader.scheme
    try:
        with safe_open(str(ref / "model.safetensors"), "pt") as want:
            for layer in (0, LAYERS - 1):
                prefix = f"model.layers.{layer}."
                names = [f"{m}.weight" for m in MATRICES] + ["input_layernorm.weight"]
                layout = LayerLayout.of([(n, tuple(want.get_tensor(prefix + n).shape), dtype) for n in names])
                encoded = LossyLayer.of(scheme.stream_format, layout, reader.parts_of(prefix))
                assert [t.kind for t in encoded.tensors] == [scheme.stream_format] * len(MATRICES) + ["raw"]
                host = torch.zeros(encoded.nbytes, dtype=torch.uint8)
                reader.fill_layer(prefix, encoded, host)
                slot = torch.full((layout.nbytes,), 0xAB, dtype=torch.uint8, device=device)
                encoded.expand(host.to(device), slot, Expander(device, 0, 0))
                for n, got in zip(names, layout.views(slot)):
                    reference = want.get_tensor(prefix + n).float().to(dtype)  # exact in float32, rounded once
                    assert torch.equal(got.cpu().view(torch.int8), reference.view(torch.int8)), (n, dtype)
                    resident = torch.empty(reference.shape, dtype=dtype, device=device)
                    reader.fill(prefix + n, resident)  # what a resident layer gets
                    assert torch.equal(resident.cpu().view(torch.int8), reference.view(torch.int8)), (n, dtype)
    finally:
        reader.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_streamed_parts_expand_to_the_reference_bit_for_bit(name: str, dtype: torch.dtype, checkpoints) -> None:
    check_round_trip(*checkpoints(name), dtype, torch.device("cpu"))


def test_int4_parts_are_the_checkpoints_4_bit_codes(checkpoints) -> None:
    """GPTQ's codes repacked: [out, in] two a byte (even input high), float32 scale and shift = -z * scale."""
    qdir, _ = checkpoints("gptq-asym-v1")
    reader = reader_of(qdir)
    try:
        name = "model.layers.2.mlp.down_proj.weight"  # [128, 256], groups of 32
        from overspill.runtime.layout import TensorEntry

        kind, shapes = reader.parts_of("model.layers.2.")("int4", TensorEntry("mlp.down_proj.weight", 0, (128, 256),
                                                                             torch.bfloat16))
        assert kind == "int4" and shapes == [((128, 128), torch.uint8), ((128, 8, 1), torch.float32),
                                             ((128, 8, 1), torch.float32)]
        parts = [torch.empty(s, dtype=d) for s, d in shapes]
        reader.fill_parts(name, parts)
        qweight, qzeros, scales = (reader.raw(f"model.layers.2.mlp.down_proj.{k}") for k in ("qweight", "qzeros", "scales"))
        i, o = 77, 5  # input 77 is nibble 5 of qweight row 9; an odd input: the low nibble of byte 38
        q = (int(qweight[77 // 8, o]) >> (4 * (77 % 8))) & 15
        assert int(parts[0][o, 38]) & 15 == q
        z = ((int(qzeros[77 // 32, o // 8]) >> (4 * (o % 8))) & 15) + 1
        assert parts[1][o, 77 // 32, 0] == scales[77 // 32, o].float()
        assert parts[2][o, 77 // 32, 0] == -z * scales[77 // 32, o].float()
    finally:
        reader.close()


# --- (b) loading: streamed quantized layers decode as the resident dequantized model -------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_streamed_checkpoint_decodes_as_the_dequantized_model_resident(name: str, dtype: str, checkpoints) -> None:
    want, model, plan = load_streamed(*checkpoints(name), dtype)
    fmt = SCHEMES[name][0]["quant_method"]
    assert plan.stream_format == ("int4" if fmt in ("gptq", "awq") else "fp8")
    assert not placement_of(want).plan.streamed_layers
    assert any("checkpoint: streamed layers keep its codes" in n for n in plan.notes)
    assert_same_decoding(want, model)


def load_streamed(qdir: Path, ref: Path, dtype: str):
    """(the reference `ref` loaded resident, the checkpoint `qdir` loaded with one or two of its six layers
    resident and the rest streamed, the latter's plan)."""
    want, _ = overspill.load(ref, dtype=dtype, gpu_memory=None, progress=False)
    budget = {"float32": "3.4MiB", "bfloat16": "2MiB"}[dtype]  # one or two of the six layers stay resident
    model, _ = overspill.load(qdir, dtype=dtype, gpu_memory=budget, context=64, progress=False)
    plan = placement_of(model).plan
    assert 0 < len(plan.streamed_layers) < LAYERS
    return want, model, plan


def assert_same_decoding(want, model) -> torch.Tensor:
    """`model` decodes `prompt()` as `want` does, tokens and logits bit for bit; those tokens."""
    with torch.no_grad():
        a = want.generate(prompt(), return_dict_in_generate=True, output_logits=True, **GEN)
        b = model.generate(prompt(), return_dict_in_generate=True, output_logits=True, **GEN)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(torch.stack(a.logits), torch.stack(b.logits))
    return b.sequences


# --- (c) the link carries the quantized bytes ------------------------------------------------------------

@pytest.mark.parametrize("name", ["gptq-sym", "fp8-block"])
def test_streamed_host_bytes_are_the_quantized_bytes(name: str, checkpoints) -> None:
    qdir, _ = checkpoints(name)
    placement = streamed_placement(qdir)
    fmt = placement.plan.stream_format
    params = sum(128 * n for n in (128, 64, 64, 128, 256, 256)) + 256 * 128  # one layer's matrices
    scales = params // (128 if fmt == "int4" else 128) * (8 if fmt == "int4" else 4)  # float32 per group of 128
    codes = params // 2 if fmt == "int4" else params
    norms = 2 * 128 * 2  # two bf16 norms, raw
    for layer in placement.ring.layers:
        assert layer.host.numel() == layer.encoded.nbytes
        assert codes + scales + norms <= layer.host.numel() <= codes + scales + norms + 256 * 10  # + alignment
        assert layer.host.numel() < (0.3 if fmt == "int4" else 0.55) * layer.layout.nbytes  # bf16 would be 1.0


def streamed_placement(qdir: Path):
    """The placement of checkpoint `qdir` loaded in bf16 with 1.8MiB of GPU memory: some layers stream, and the
    link carries their host buffers, the plan's bytes a step."""
    model, _ = overspill.load(qdir, dtype="bfloat16", gpu_memory="1.8MiB", context=64, progress=False)
    placement = placement_of(model)
    assert placement.host_bytes == placement.plan.streamed_bytes_per_step == sum(
        layer.host.numel() for layer in placement.ring.layers)
    return placement


def test_other_stream_formats_dequantize_then_encode(checkpoints) -> None:
    qdir, ref = checkpoints("gptq-sym")
    want, _ = overspill.load(ref, dtype="float32", gpu_memory=None, progress=False)
    model, _ = overspill.load(qdir, dtype="float32", gpu_memory="3.4MiB", context=64, progress=False,
                              stream_format="bf16")
    plan = placement_of(model).plan
    assert plan.stream_format == "bf16" and plan.streamed_layers
    assert any("streamed layers dequantized to the compute dtype" in n for n in plan.notes)
    with torch.no_grad():
        assert torch.equal(want(prompt()).logits, model(prompt()).logits)
    int8, _ = overspill.load(qdir, dtype="float32", gpu_memory="3.4MiB", context=64, progress=False, stream_format="int8")
    assert placement_of(int8).plan.stream_format == "int8"
    assert any("then encoded as int8" in n for n in placement_of(int8).plan.notes)


def test_plan_shows_the_checkpoints_int4_bytes(checkpoints, capsys) -> None:
    qdir, ref = checkpoints("gptq-sym")
    got = plan_json(qdir, capsys)
    own_int4 = plan_json(ref, capsys, "--stream-format", "int4")
    assert got["plan"]["stream_format"] == "int4"
    streamed = got["plan"]["layer_tiers"].count("pinned")
    layer = 2 * (sum(128 * n for n in (128, 64, 64, 128, 256, 256)) + 256 * 128 + 2 * 128)  # bf16 bytes
    params = layer // 2
    assert got["plan"]["streamed_bytes_per_step"] == streamed * (params // 2 + 8 * params // 128)
    # the format's own int4 keeps bf16 scales and zeros (4 bytes a group): the checkpoint's float32 ones 8
    assert own_int4["plan"]["streamed_bytes_per_step"] == own_int4["plan"]["layer_tiers"].count("pinned") * (
        params // 2 + 4 * params // 128)
    table = plan_table(qdir, capsys)
    assert "GPTQ int4 (groups of 128) checkpoint: streamed layers keep its codes (int4)" in table
    assert re.search(r"^int4 .*the checkpoint's own codes$", table, re.M)


PLAN_ARGS = ("--gpu-memory", "129.5MiB", "--context", "64", "--dtype", "bfloat16")


def plan_json(path: Path, capsys, *more: str) -> dict:
    """`overspill plan --json` of `path` at 129.5MiB, context 64, bf16 (and `more`): what it prints."""
    assert cli.main(["plan", str(path), *PLAN_ARGS, *more, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def plan_table(path: Path, capsys) -> str:
    """`overspill plan` of `path` at 129.5MiB, context 64, bf16: the table it prints."""
    assert cli.main(["plan", str(path), *PLAN_ARGS]) == 0
    return capsys.readouterr().out


# --- (d) what is not supported says so in one line -------------------------------------------------------

@pytest.mark.parametrize("change,words", [
    ({"desc_act": True}, "desc_act"),
    ({"bits": 3}, "3 bits"),
    ({"bits": 8}, "8 bits"),
    ({"checkpoint_format": "marlin"}, "'marlin'"),
    ({"group_size": 16}, "group_size 16"),
    ({"quant_method": "awq", "version": "gemv"}, "'gemv'"),
    ({"quant_method": "bitsandbytes"}, "'bitsandbytes'"),
])
def test_unsupported_quantizations_are_one_line_errors(change: dict, words: str, checkpoints, tmp_path) -> None:
    qdir, _ = checkpoints("gptq-sym")
    config = json.loads((qdir / "config.json").read_text())
    config["quantization_config"] = {**config["quantization_config"], **change}
    error = refusal(qdir, tmp_path, "not supported", config=config)
    assert words in error and "\n" not in error
    assert "GPTQ and AWQ (gemm) int4" in error or "groups of 32" in error


def test_act_order_g_idx_is_refused_at_load(checkpoints, tmp_path) -> None:
    """A g_idx that reorders the inputs is act-order whatever desc_act says."""
    from safetensors.torch import load_file

    qdir, _ = checkpoints("gptq-sym")
    tensors = load_file(str(qdir / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.g_idx"  # 256 inputs in two groups
    tensors[key] = tensors[key].flip(0).contiguous()
    refusal(qdir, tmp_path, "act-order", tensors=tensors, gpu_memory=None)


def refusal(qdir: Path, tmp_path: Path, match: str, config: dict | None = None, tensors: dict | None = None,
            **load) -> str:
    """The OverspillError (matching `match`) of loading in float32 (with `load`'s other arguments) a copy of the
    checkpoint `qdir` whose config.json is `config` or whose tensors are `tensors` (else `qdir`'s): its text."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config) if config is not None else (qdir / "config.json").read_text())
    if tensors is None:
        (bad / "model.safetensors").symlink_to(qdir / "model.safetensors")
    else:
        save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(OverspillError, match=match) as err:
        overspill.load(bad, dtype="float32", progress=False, **load)
    return str(err.value)


# --- GGUF Q8_0: a converted GGUF keeps its decoder Q8_0 codes --------------------------------------------

GGUF_LAYERS = 6


@pytest.fixture(scope="module")
def q8_0_gguf(tmp_path_factory, overspill_cache) -> Path:
    """SmolLM2's GGUF (its tokenizer and config) cut to 6 layers whose Q4_1 matrices are requantized as
    Q8_0 by the gguf package (llama.cpp's reference rounding); the embedding stays Q8_0, norms F32."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

    from overspill.runtime.sources import default_gguf_path

    reader = GGUFReader(default_gguf_path())
    arch = reader.fields["general.architecture"].contents()
    path = tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf"
    writer = GGUFWriter(str(path), arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        value = GGUF_LAYERS if field.name == f"{arch}.block_count" else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= GGUF_LAYERS:
            continue
        data = t.data
        if t.tensor_type == GGMLQuantizationType.Q4_1:
            data, kind = quants.quantize(quants.dequantize(t.data, t.tensor_type), GGMLQuantizationType.Q8_0), \
                GGMLQuantizationType.Q8_0
        else:
            kind = t.tensor_type
        writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_q8_0_decoder_weights_stream_as_codes(q8_0_gguf) -> None:
    from gguf import GGUFReader, quants
    from safetensors import safe_open

    from overspill.runtime.sources import convert_gguf

    converted = convert_gguf(q8_0_gguf)
    config = json.loads((converted / "config.json").read_text())
    assert config["quantization_config"]["types"] == ["q8_0"]
    assert config["quantization_config"]["quant_method"] == "gguf"
    assert 0.9 < config["quantization_config"]["shares"]["q8_0"] < 1  # every decoder matrix, not the norms
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "model.layers.0.mlp.down_proj.q8_0_codes" in keys and "model.layers.0.mlp.down_proj.weight" not in keys
        assert f.get_tensor("model.layers.0.mlp.down_proj.q8_0_codes").dtype == torch.int8
        assert "model.embed_tokens.weight" in keys  # outside the decoder layers: dequantized as before
    # the GGUF's own dequantization (gguf.quants, as transformers reads it) of a weight transformers does not permute
    gguf_down = next(t for t in GGUFReader(q8_0_gguf).tensors if t.name == "blk.3.ffn_down.weight")
    reference = torch.from_numpy(quants.dequantize(gguf_down.data, gguf_down.tensor_type))  # float32 [out, in]

    want, _ = overspill.load(q8_0_gguf, dtype="float32", gpu_memory=None, progress=False)
    model, tok = overspill.load(q8_0_gguf, dtype="float32", gpu_memory="187MiB", context=64, progress=False)
    placement = placement_of(model)
    plan = placement.plan
    assert plan.stream_format == "int8" and 0 < len(plan.streamed_layers) < GGUF_LAYERS
    assert any("GGUF Q8_0 checkpoint: streamed layers keep its codes (int8)" in n for n in plan.notes)
    assert torch.equal(want.model.layers[3].mlp.down_proj.weight, reference)  # resident: d * q exactly
    for layer in placement.ring.layers:  # one byte a weight and a float32 scale per 32 over the link
        kinds = {t.entry.name: t.kind for t in layer.encoded.tensors}
        assert kinds["mlp.down_proj.weight"] == "int8" and kinds["input_layernorm.weight"] == "raw"
        down = next(t for t in layer.encoded.tensors if t.entry.name == "mlp.down_proj.weight")
        assert [p.dtype for p in down.parts] == [torch.int8, torch.float32] and down.parts[1].shape[1] == 1536 // 32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = want.generate(ids, return_dict_in_generate=True, output_logits=True, **GEN)
        b = model.generate(ids, return_dict_in_generate=True, output_logits=True, **GEN)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(torch.stack(a.logits), torch.stack(b.logits))


# --- on a GPU (`pytest -m gpu tests/test_prequantized.py` on the GPU machine) ------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_gpu_streamed_parts_expand_to_the_reference_bit_for_bit(name: str, dtype: torch.dtype, checkpoints) -> None:
    check_round_trip(*checkpoints(name), dtype, torch.device("cuda"))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_gpu_streamed_checkpoint_decodes_as_the_dequantized_model_resident(name: str, checkpoints) -> None:
    from test_stream_formats import tiny_plan

    qdir, ref = checkpoints(name)
    plan = tiny_plan(ref, torch.bfloat16, streamed=4)  # the first 4 of 6 layers stream
    want, _ = overspill.load(ref, dtype="bfloat16", gpu_memory=None, device="cuda", probe=False, progress=False)
    model, _ = overspill.load(qdir, dtype="bfloat16", plan=plan, device="cuda", probe=False, progress=False)
    placed = placement_of(model)
    assert placed.plan.stream_format in ("int4", "fp8") and len(placed.plan.streamed_layers) == 4
    assert all(layer.host.is_pinned() for layer in placed.ring.layers)
    ids = prompt().cuda()
    with torch.no_grad():
        a = want.generate(ids, return_dict_in_generate=True, output_logits=True, **GEN)
        b = model.generate(ids, return_dict_in_generate=True, output_logits=True, **GEN)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(torch.stack(a.logits), torch.stack(b.logits))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("shape,group", [((4096, 4096), 128), ((14336, 4096), 128), ((4096, 14336), 128),
                                         ((1024, 4096), 4096), ((512, 4096), 32)])
def test_gpu_int4_kernel_on_float32_scales_matches_the_torch_path(shape, group: int, monkeypatch) -> None:
    """Whether the Triton int4 kernel's arithmetic holds for a pass-through's float32 scales (`STORES` lists
    only bf16 until this passes on a GPU): GPTQ-like parts, fp16 scales as float32. The pass-through stores the
    shift -z * scale, which the torch path adds as it is (`quant._expand_int4` sends float32 stores there);
    the kernel takes a zero, here scale * (8 - z), whose zero - 8 * scale is that shift exactly. Taking
    float32 stores on the GPU then also needs the kernel to add a shift as it is (Q4_K's need not be
    zero - 8 * scale of any float32 zero)."""
    from overspill.runtime import int4_kernel

    pytest.importorskip("triton")
    rows, cols = shape
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8).cuda()
    scale = (torch.rand(rows, cols // group, 1, generator=g) * 0.02 + 1e-3).half().float().cuda()
    z = torch.randint(0, 16, scale.shape, generator=g).float().cuda()
    zero, shift = scale * (8 - z), -z * scale
    monkeypatch.setattr(int4_kernel, "STORES", (torch.bfloat16, torch.float32))
    kernel = int4_kernel.build()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        want = torch.empty(shape, dtype=dtype, device="cuda")
        quant._expand_int4_torch(packed, scale, shift, want, None)
        got = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
        assert int4_kernel.launch(kernel, packed, scale, zero, got)
        assert torch.equal(got.view(torch.int8), want.view(torch.int8)), dtype
        q = torch.stack([packed >> 4, packed & 15], -1).view(rows, cols // group, group).float()
        reference = (scale * (q - z)).view(shape).to(dtype)  # the checkpoint's dequantization
        assert torch.equal(want.view(torch.int8), reference.view(torch.int8)), dtype
