"""GGUF Q8_0 decoder weights kept as codes when a GGUF is converted (`sources.convert_gguf`).

A Q8_0 block is 32 weights of one row: an fp16 scale d and 32 int8 codes q, w = d * q. transformers
dequantizes every tensor of a GGUF (into bf16 here); for the decoder layers' Q8_0 matrices the conversion
keeps the codes instead, as `X.q8_0_codes` (int8 [out, in]) and `X.q8_0_scales` (fp16 [out, in / 32]) in
place of `X.weight`, and marks the config (`quantization_config` {"quant_method": "gguf", "types": ["q8_0"]},
`planning.prequantized`), so streamed layers carry one byte a weight over the link (the int8 stream format
with groups of 32 and float32 scales) and expand on the GPU to d * q in float32 rounded once: the value
transformers' conversion gives, which each kept weight is checked against (a weight whose GGUF-to-HF name
map or row permutation did not reproduce it stays as transformers wrote it).

Q4_0 / Q4_1 / Q4_K / Q6_K and the others stay dequantized: not supported yet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CODES, SCALES = ".q8_0_codes", ".q8_0_scales"  # the kept weight's keys, after its name without ".weight"
Q8_0_BLOCK = 32
MARK = {"quant_method": "gguf", "types": ["q8_0"]}


def q8_0_weights(gguf: Path, model: torch.nn.Module, layers_path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{parameter name: (int8 codes [out, in], fp16 scales [out, in / 32])} of the decoder-layer matrices
    (under `layers_path`) that `gguf` stores as Q8_0 and transformers placed in `model` (dequantized) as
    exactly d * q rounded once."""
    from gguf import GGMLQuantizationType, GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    reader = GGUFReader(gguf)
    blocks = [t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q8_0 and len(t.shape) == 2]
    if not blocks:
        return {}
    architecture = read_field(reader, "general.architecture")[0]
    config = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
    names = get_gguf_hf_weights_map(model, processor)
    params = dict(model.named_parameters())
    kept = {}
    for tensor in blocks:
        raw = np.asarray(tensor.data).reshape(tensor.data.shape[0], -1, 2 + Q8_0_BLOCK)  # [out, in / 32, d q..]
        scales = np.ascontiguousarray(raw[..., :2]).view(np.float16)[..., 0]  # [out, in / 32]
        codes = np.ascontiguousarray(raw[..., 2:]).view(np.int8).reshape(raw.shape[0], -1)  # [out, in]
        try:  # the row permutation transformers applies (llama's q and k), to codes and scales alike
            done = processor.process(weights=codes, name=tensor.name)
            codes, scales = done.weights, processor.process(weights=scales, name=tensor.name).weights
        except Exception:  # noqa: BLE001 - a processor that needs more than a row permutation: left dequantized
            continue
        name = names.get(done.name)
        param = params.get(name) if name is not None else None
        if param is None or not name.startswith(f"{layers_path}.") or param.dim() != 2:
            continue
        codes, scales = torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(np.ascontiguousarray(scales))
        if tuple(codes.shape) != tuple(param.shape) or not torch.equal(dequantize(codes, scales).to(param.dtype), param):
            continue
        kept[name] = (codes, scales)
    return kept


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """d * q in float32 (exact: 8 + 11 significant bits), [out, in]."""
    out, cols = codes.shape
    return (codes.float().view(out, -1, Q8_0_BLOCK) * scales.float()[..., None]).view(out, cols)


def save(model: torch.nn.Module, kept: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> None:
    """The model's tensors into one safetensors file, each kept weight as its codes and scales instead
    (tensors sharing storage, tied embeddings, written once: the reader maps tied names onto each other)."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        where = (t.data_ptr(), tuple(t.shape), t.dtype)
        if name in kept or where in seen:
            continue
        seen.add(where)
        tensors[name] = t.contiguous()
    for name, (codes, scales) in kept.items():
        base = name[: -len(".weight")]
        tensors[base + CODES], tensors[base + SCALES] = codes, scales
    save_file(tensors, str(path), metadata={"format": "pt"})
