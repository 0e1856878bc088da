"""Megatron-style split of one decoder layer between two ranks: the GPU (first heads and columns)
and the host CPU (the rest), joined twice per layer.

Attention splits by whole KV-head groups: a rank owns KV heads [a, b) and the query heads that
attend to them (GQA groups intact), so it computes its heads' attention from its own KV alone.
q/k/v rows (and their biases) split by head, o_proj by the matching input columns; each rank's
o_proj gives a partial sum of the attention output. The MLP splits column-then-row: gate/up by
output rows, down_proj by the matching input columns, so act(gate) * up stays rank-local and each
rank's down_proj gives a partial sum. Norms run once on the GPU, before and after each join;
o_proj's and down_proj's biases are added once (by the GPU); per-head parts (qk-norm, rotary,
sliding windows, softcapping) are the model's own modules, run on each rank's heads.

Each rank runs a twin of the layer's own attention and MLP modules (same class, same code) whose
parameters are its share, so the model's semantics are its own code's. Supported: llama,
mistral, qwen2, qwen3, phi3, gemma2 (dense layers); others are refused (`check_supported`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import OverspillError
from ..planning.cpu_rank import SPLIT_ARCHS as SUPPORTED
# per-head vectors every rank needs whole (qwen3's qk-norm weights are [head_dim])
SHARED = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
GPU_ONLY_SUFFIXES = ("self_attn.o_proj.bias", "mlp.down_proj.bias")


@dataclass(frozen=True)
class Share:
    """The CPU's part of one layer: its last `kv_heads` KV heads (and their query groups) and its
    last `mlp_cols` intermediate columns. The GPU keeps the rest."""

    kv_heads: int
    mlp_cols: int


@dataclass(frozen=True)
class Dims:
    """The sizes the split needs, from the config."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    hidden: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def column_params(self) -> int:
        """Weights of one MLP intermediate column: a gate and an up row, a down column."""
        return 3 * self.hidden

    @property
    def kv_head_params(self) -> int:
        """Weights of one KV-head group: its query and output heads, its key and value head."""
        return 2 * (self.group + 1) * self.head_dim * self.hidden


def check_supported(config) -> None:
    """Refuse a model whose layers this module cannot split (MoE layers, unknown architectures)."""
    cfg = config.get_text_config()
    kind = getattr(cfg, "model_type", "?")
    if kind not in SUPPORTED:
        raise OverspillError(f"the CPU rank splits {', '.join(SUPPORTED)} layers, not {kind!r}: "
                             f"use cpu_compute='off' (--cpu-compute off)")


def dims_of(config) -> Dims:
    cfg = config.get_text_config()
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Dims(heads, kv, head_dim, cfg.intermediate_size, cfg.hidden_size)


def share_of(dims: Dims, fraction: float, align: int = 1) -> Share:
    """The CPU's share for a wanted fraction of the layer's weights: MLP columns first (to a multiple of
    `align`, a kernel's block), then KV-head groups for what the columns cannot hold, each rounded to the
    nearest whole, the GPU keeping at least one of each.

    Columns first because the host multiplies an MLP share at about twice an attention share's rate: on the
    H100 host at 5638238 (bench/gil_contention.py, 14 threads, 8B shape) 93 M MLP weights took 2.9-4.5 ms
    (21-32 G/s) while 21 M attention weights over a 512-token cache took 1.6-2.1 ms alone (10-13 G/s) and
    2.3-2.7 ms while the Python thread launched GPU work: rotary, the cache update and SDPA are many small ops,
    each waiting for the GIL, and the heads' KV is read from host memory besides."""
    fraction = min(max(fraction, 0.0), 1.0)
    wanted = fraction * (dims.intermediate * dims.column_params + dims.kv_heads * dims.kv_head_params)
    most = (dims.intermediate - 1) // align * align
    cols = min(round(wanted / dims.column_params / align) * align, most)
    rest = wanted - cols * dims.column_params
    kv = min(round(rest / dims.kv_head_params), dims.kv_heads - 1) if cols == most else 0
    return Share(max(kv, 0), max(cols, 0))


def _rows(dims: Dims, share: Share, name: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
    """(GPU row ranges, CPU row ranges) of a row-split tensor (weights and biases alike), or None
    where `name` is not split by rows."""
    d, g = dims.head_dim, dims.group
    q_gpu = (dims.kv_heads - share.kv_heads) * g * d
    kv_gpu = (dims.kv_heads - share.kv_heads) * d
    q_all, kv_all, inter = dims.heads * d, dims.kv_heads * d, dims.intermediate
    i_gpu = inter - share.mlp_cols
    if name.startswith("self_attn.q_proj."):
        return [(0, q_gpu)], [(q_gpu, q_all)]
    if name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
        return [(0, kv_gpu)], [(kv_gpu, kv_all)]
    if name == "self_attn.qkv_proj.weight":  # phi3: [q; k; v] fused
        k0, v0 = q_all, q_all + kv_all
        return ([(0, q_gpu), (k0, k0 + kv_gpu), (v0, v0 + kv_gpu)],
                [(q_gpu, q_all), (k0 + kv_gpu, v0), (v0 + kv_gpu, v0 + kv_all)])
    if name.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
        return [(0, i_gpu)], [(i_gpu, inter)]
    if name == "mlp.gate_up_proj.weight":  # phi3: [gate; up] fused, chunked in half by its forward
        return [(0, i_gpu), (inter, inter + i_gpu)], [(i_gpu, inter), (inter + i_gpu, 2 * inter)]
    return None


def _cols(dims: Dims, share: Share, name: str) -> int | None:
    """First CPU input column of a column-split weight, or None."""
    if name == "self_attn.o_proj.weight":
        return (dims.kv_heads - share.kv_heads) * dims.group * dims.head_dim
    if name == "mlp.down_proj.weight":
        return dims.intermediate - share.mlp_cols
    return None


def split_tensor(dims: Dims, share: Share, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(GPU part, CPU part or None) of one layer parameter; parts are contiguous new tensors (or the
    tensor itself where the GPU keeps it whole: norms, o_proj/down_proj biases)."""
    rows = _rows(dims, share, name)
    if rows is not None:
        gpu, cpu = rows
        return (torch.cat([tensor[a:b] for a, b in gpu]).contiguous(),
                torch.cat([tensor[a:b] for a, b in cpu]).contiguous())
    col = _cols(dims, share, name)
    if col is not None:
        return tensor[:, :col].contiguous(), tensor[:, col:].contiguous()
    if name in SHARED:
        return tensor, tensor.clone()
    if name.startswith(("self_attn.", "mlp.")) and not name.endswith(GPU_ONLY_SUFFIXES):
        raise OverspillError(f"the CPU rank does not know how to split layer parameter {name!r}: "
                             f"use cpu_compute='off'")
    return tensor, None


def twin(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` and its submodules: same class and code, own parameter slots."""
    copied = copy.copy(module)
    copied._parameters = dict(module._parameters)
    copied._buffers = dict(module._buffers)
    copied._modules = {k: twin(m) for k, m in module._modules.items()}
    return copied


def rank_twin(module: nn.Module, prefix: str, params: dict[str, torch.Tensor], heads: int | None,
              kv_heads: int | None, device: torch.device) -> nn.Module:
    """`module` (the layer's `self_attn` or `mlp`, named `prefix`) as one rank runs it: its
    parameters replaced by `params` (layer-relative names; a parameter absent there becomes None, as
    the biases only the GPU adds), its buffers on `device`, and, for attention, the head counts a
    module reads from itself or its config set to the rank's (phi3 splits its fused qkv by them)."""
    copied = twin(module)
    for name, _ in list(module.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        target = copied.get_submodule(owner) if owner else copied
        value = params.get(f"{prefix}.{name}")
        target._parameters[leaf] = None if value is None else nn.Parameter(value, requires_grad=False)
    for sub in copied.modules():
        for key, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[key] = buf.to(device)
    if heads is not None:
        if hasattr(copied, "num_key_value_heads"):
            copied.num_key_value_heads = kv_heads
        if hasattr(copied, "num_heads"):
            copied.num_heads = heads
        if getattr(copied, "config", None) is not None:
            copied.config = copy.copy(copied.config)
            copied.config.num_attention_heads = heads
            copied.config.num_key_value_heads = kv_heads
    return copied


@dataclass(frozen=True)
class Norms:
    """Where a layer normalizes around its two joins (gemma2 normalizes each partial sum's join
    too: post_attention / post_feedforward)."""

    attn_in: str
    attn_out: str | None
    mlp_in: str
    mlp_out: str | None


def norms_of(block: nn.Module) -> Norms:
    if hasattr(block, "pre_feedforward_layernorm") and hasattr(block, "post_feedforward_layernorm"):
        return Norms("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm")
    return Norms("input_layernorm", None, "post_attention_layernorm", None)
