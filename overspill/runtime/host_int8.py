"""int8 host weights for the CPU rank: the host's share of a layer with one int8 byte per weight and a
scale per output row, multiplied by `torch._weight_int8pack_mm`.

A host GEMV is bound by the bytes it reads, so half the bytes is about twice the speed: issue 16
measured 107 G params/s for int8 against 58.7 for bf16 on the H200 host. Lossy (per-row absmax
scales, as `planning.formats` int8), so the GPU-only run's tokens are not guaranteed; only the
worker's copy is int8, the bf16 share stays for passes the GPU computes.
"""

from __future__ import annotations

import torch
from torch import nn

from .tp_split import twin


class Int8Linear(nn.Module):
    """`nn.Linear` over an int8 weight with a scale per output row (symmetric, absmax / 127)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight_q", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(weight.dtype))
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
        out = torch._weight_int8pack_mm(rows, self.weight_q, self.scales).reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


def int8_twin(module: nn.Module) -> nn.Module:
    """A twin of a host rank's module (`tp_split.rank_twin`) whose Linear layers hold int8 weights."""
    copied = twin(module)
    for name, sub in list(copied.named_modules()):
        for child_name, child in list(sub._modules.items()):
            if isinstance(child, nn.Linear):
                sub._modules[child_name] = Int8Linear(child.weight.detach(), child.bias)
    return copied
