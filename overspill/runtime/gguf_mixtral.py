"""Mixtral GGUFs loaded as transformers' `MixtralForCausalLM`, for `sources.convert_gguf`.

llama.cpp writes Mixtral as general.architecture "llama" plus `llama.expert_count` and fused routed experts
(`blk.N.ffn_{gate,up,down}_exps` [experts, rows, cols], router `blk.N.ffn_gate_inp`). transformers (5.25) maps
"llama" to `LlamaConfig` and drops the experts, so this module builds the `MixtralConfig` from the metadata and
loads the weights as transformers' own GGUF loader would: gguf's dequantization in float32, llama's q/k rows
un-permuted (`LlamaTensorProcessor`), then one rounding into the dtype; gate's rows then up's in each expert of
`mlp.experts.gate_up_proj` [experts, 2 * ffn, hidden] (what transformers does for Qwen2-MoE, and what
`MixtralExperts` chunks back apart), `ffn_down_exps` as `down_proj`. `gguf_blocks` then keeps the codes of the
quantized matrices and experts through `MixtralTensorProcessor` and `weights_map`, as for any GGUF.
Older files store one tensor per expert (`blk.N.ffn_gate.E.weight`); those are refused in one line.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, Qwen2MoeTensorProcessor, read_field

from ..errors import OverspillError
from .gguf_blocks import EXPERTS

PER_EXPERT = re.compile(r"blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight")  # llama.cpp's layout before fused experts


class MixtralTensorProcessor(LlamaTensorProcessor, Qwen2MoeTensorProcessor):
    """llama's q/k row un-permutation (`process`) with Qwen2-MoE's names for fused experts (`ffn_gate_exps` and
    `ffn_up_exps` both map to `mlp.experts.gate_up_proj`)."""


def _expert_count(reader) -> int:
    if read_field(reader, "general.architecture") != ["llama"]:
        return 0
    return int((read_field(reader, "llama.expert_count") or [0])[0])


def is_mixtral(gguf: Path) -> bool:
    """Whether `gguf` is a llama-architecture GGUF with routed experts (llama.cpp's Mixtral)."""
    from gguf import GGUFReader

    return _expert_count(GGUFReader(gguf)) > 0


def _gguf_config(gguf: Path) -> dict:
    """transformers' config dict of `gguf` (llama's keys: heads, kv heads, sizes), what its tensor processors
    read."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]


def _mixtral_config(reader, llama: dict):
    """The `MixtralConfig` of a Mixtral GGUF: transformers' llama config (`_gguf_config`) with the experts, and
    each expert's ffn size (`llama.expert_feed_forward_length` where present, else `feed_forward_length`)."""
    from transformers import MixtralConfig

    config = {k: v for k, v in llama.items() if k != "model_type"}
    config["num_local_experts"] = _expert_count(reader)
    used = read_field(reader, "llama.expert_used_count")
    if not used:
        raise OverspillError("this Mixtral GGUF has llama.expert_count but no llama.expert_used_count (experts a "
                             "token uses): it is incomplete; convert it again with a current llama.cpp")
    config["num_experts_per_tok"] = int(used[0])
    ffn = read_field(reader, "llama.expert_feed_forward_length")
    if ffn:
        config["intermediate_size"] = int(ffn[0])
    config["architectures"] = ["MixtralForCausalLM"]
    return MixtralConfig.from_dict(config)


def weights_map(model: torch.nn.Module) -> dict[str, str]:
    """{GGUF tensor name: parameter name} for a `MixtralForCausalLM`, fused experts named without ".weight"
    (transformers' map through gguf's llama tensor names)."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    return get_gguf_hf_weights_map(model, MixtralTensorProcessor(), model_type="llama")


def _refuse_per_expert(reader, gguf: Path) -> None:
    old = next((t.name for t in reader.tensors if PER_EXPERT.fullmatch(t.name)), None)
    if old is not None:
        raise OverspillError(
            f"{gguf} stores Mixtral's experts one tensor each ({old}, llama.cpp's layout before fused "
            "ffn_*_exps tensors), which overspill does not read: download a newer GGUF of the model, or convert "
            "it again from the Hugging Face checkpoint with a current llama.cpp (convert_hf_to_gguf.py)")


def load(gguf: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A Mixtral GGUF as a `MixtralForCausalLM` in `dtype` (eval mode, on the CPU), weights as transformers'
    GGUF loader computes them (module docstring).

    Raises:
        OverspillError: the experts are stored one tensor each, or a parameter has no tensor in the file.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from .loader import build_skeleton

    reader = GGUFReader(gguf)
    _refuse_per_expert(reader, gguf)
    llama = _gguf_config(gguf)
    config = _mixtral_config(reader, llama)
    model = build_skeleton(config, dtype)
    names, processor = weights_map(model), MixtralTensorProcessor(config=llama)
    _require_all(reader, names, config.tie_word_embeddings, gguf)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)  # float32, as transformers' loader
        experts = EXPERTS.fullmatch(tensor.name)
        if experts:
            _put_experts(state, names.get(tensor.name[: -len(".weight")]), experts[1], weights, dtype)
            continue
        done = processor.process(weights=weights, name=tensor.name)
        if done.name in names:
            state[names[done.name]] = torch.from_numpy(np.copy(done.weights)).to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def _require_all(reader, names: dict[str, str], tied: bool, gguf: Path) -> None:
    """Refuse a file lacking a tensor the model needs (gate or up of a fused pair included): its parameter would
    stay empty."""
    present = {t.name[: -len(".weight")] if EXPERTS.fullmatch(t.name) else t.name for t in reader.tensors}
    absent = sorted(set(names) - present - ({"output.weight"} if tied else set()))
    if absent:
        raise OverspillError(f"{gguf} lacks {len(absent)} of Mixtral's tensors, e.g. {absent[0]}: it is not a "
                             "complete llama.cpp Mixtral GGUF")


def _put_experts(state: dict[str, torch.Tensor], name: str | None, part: str, weights: np.ndarray,
                 dtype: torch.dtype) -> None:
    """One `ffn_{part}_exps` tensor [experts, rows, cols] into its parameter: down as it is, gate and up into
    the first and second half of each expert's gate_up_proj rows, rounded into `dtype` as they land (a float32
    copy of the fused pair would double the largest tensors' transient memory)."""
    if name is None:
        return
    source = torch.from_numpy(np.copy(weights))
    if part == "down":
        state[name] = source.to(dtype)
        return
    experts, rows, cols = source.shape
    if name not in state:
        state[name] = torch.empty(experts, 2 * rows, cols, dtype=dtype)
    fused = state[name]
    fused[:, (0 if part == "gate" else rows) : (rows if part == "gate" else 2 * rows)].copy_(source)
