"""int8 host weights for the CPU rank: the host's share of a layer with one int8 byte per weight and a
scale per output row, multiplied by `torch._weight_int8pack_mm`.

A host GEMV is bound by the bytes it reads, so half the bytes is about twice the speed: issue 16
measured 107 G params/s for int8 against 58.7 for bf16 on the H200 host. Lossy (per-row absmax
scales, as `planning.formats` int8), so the GPU-only run's tokens are not guaranteed.

The int8 share replaces the bf16 one in host memory (`quantize_share`): the host holds one byte per
CPU-share weight instead of two, and a pass too wide for the host (`SplitLayer`) copies the int8
bytes to the device and expands them there (`dequantize_into`), so prefill and decode multiply the
same weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .tp_split import twin

SCALE = ".scale"  # suffix of a quantized weight's per-row scales in a packed int8 share
# torch._weight_int8pack_mm on the CPU reads the input features in blocks of 16: at other widths it returned
# garbage or segfaulted (torch 2.13 here: 4096 x 5734 at 7 tokens; the H100 run's int8 CPU rank died the same way,
# its down_proj share being 5734 columns wide). `cpu_rank.enable` aligns int8 shares to it; Int8Linear pads the rest.
K_ALIGN = 16


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, scale per output row in the weight's dtype): symmetric, absmax / 127."""
    w = weight.float()
    if w.shape[1] == 0:  # a share without KV heads: its o_proj has no input columns (and never runs)
        return torch.zeros(w.shape, dtype=torch.int8), torch.ones(w.shape[0], dtype=weight.dtype)
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale.to(weight.dtype)


class Int8Linear(nn.Module):
    """`nn.Linear` over an int8 weight with a scale per output row (symmetric, absmax / 127)."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, *,
                 quantized: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        weight_q, scales = quantized if quantized is not None else quantize_rows(weight)
        self.pad = -weight_q.shape[1] % K_ALIGN
        if self.pad:  # zero columns (a copy: aligned shares never take this path), and zero inputs beside them
            weight_q = nn.functional.pad(weight_q, (0, self.pad))
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach())  # a buffer, not a trace's constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
        if self.pad:
            rows = nn.functional.pad(rows, (0, self.pad))
        out = torch._weight_int8pack_mm(rows, self.weight_q, self.scales).reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


def linear_weights(module: nn.Module, prefix: str) -> set[str]:
    """Layer-relative names of the weights of `module`'s nn.Linear layers (`prefix` is its name)."""
    return {f"{prefix}.{name}.weight" for name, sub in module.named_modules() if isinstance(sub, nn.Linear)}


def quantize_share(tensors: dict[str, torch.Tensor], linear: set[str]) -> dict[str, torch.Tensor]:
    """A rank's share with each Linear weight as int8 rows plus `name + SCALE`; the rest (biases,
    qk-norm weights) as it is. What the host keeps instead of the share itself."""
    out = {}
    for name, tensor in tensors.items():
        if name in linear:
            out[name], out[name + SCALE] = quantize_rows(tensor)
        else:
            out[name] = tensor
    return out


def dequantize_into(packed: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """Write the share `packed` holds (`quantize_share`'s form, on any device) into `out`'s tensors
    (the share's own names, dtypes and shapes): int8 rows times their scales, the rest copied."""
    for name, dst in out.items():
        scale = packed.get(name + SCALE)
        if scale is None:
            dst.copy_(packed[name])
        else:
            torch.mul(packed[name].to(dst.dtype), scale[:, None], out=dst)


def int8_twin(module: nn.Module, prefix: str | None = None, packed: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A twin of a host rank's module (`tp_split.rank_twin`) whose Linear layers hold int8 weights:
    quantized from the module's own weights, or, with `packed` (`quantize_share`'s form, layer-relative
    names, `prefix` the module's name), bound to those tensors, every other parameter included."""
    copied = twin(module)
    for path, sub in list(copied.named_modules()):
        for child_name, child in list(sub._modules.items()):
            if not isinstance(child, nn.Linear):
                continue
            if packed is None:
                sub._modules[child_name] = Int8Linear(child.weight.detach(), child.bias)
                continue
            key = f"{prefix}.{path + '.' if path else ''}{child_name}"
            sub._modules[child_name] = Int8Linear(None, packed.get(f"{key}.bias"),
                                                  quantized=(packed[f"{key}.weight"], packed[f"{key}.weight{SCALE}"]))
    if packed is not None:  # the rest (qk-norm weights): new parameters over the packed tensors
        for name, _ in list(copied.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            target = copied.get_submodule(owner) if owner else copied
            value = packed.get(f"{prefix}.{name}")
            target._parameters[leaf] = None if value is None else nn.Parameter(value, requires_grad=False)
    return copied
