"""The CPU rank's worker runs each layer's norm and MLP share as one traced call (`runtime.host_call`): the
same bits as the eager modules, one trace per input shape, and eager where a trace would differ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from overspill.api import placement_of
from overspill.runtime.host_call import HostCall
from overspill.runtime.host_int8 import Int8Linear

from test_cpu_rank import DENSE, _generate, _split_model
from test_placement import prompts


class Mlp(nn.Module):
    def __init__(self, hidden: int, inter: int, int8: bool = False):
        super().__init__()
        make = (lambda i, o: Int8Linear(torch.randn(o, i).bfloat16(), None)) if int8 else \
            (lambda i, o: nn.Linear(i, o, bias=False).bfloat16())
        self.gate, self.up, self.down = make(hidden, inter), make(hidden, inter), make(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("int8", [False, True])
def test_a_traced_chain_gives_the_eager_bits_per_shape(int8: bool) -> None:
    torch.manual_seed(0)
    norm = nn.RMSNorm(64, eps=1e-5).bfloat16()
    call = HostCall(norm, Mlp(64, 96, int8))
    with torch.no_grad():
        for shape in ((1, 1, 64), (3, 1, 64), (1, 1, 64)):
            x = torch.randn(shape).bfloat16()
            want = call.chain(x)
            assert torch.equal(call(x), want) and torch.equal(call(x), want)  # first call traces, second runs it
            assert torch.equal(call(x, traced=False), want)
    assert call.traced_shapes == [(1, 1, 64), (3, 1, 64)]  # a reshape's sizes may be fixed by a trace: one each


def test_a_chain_whose_trace_differs_runs_eagerly() -> None:
    class Counting(nn.Module):  # Python state a trace cannot follow: the traced call would keep the first value
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return x + self.calls

    counting = Counting()
    call = HostCall(counting)
    x = torch.zeros(1, 1, 2)
    with torch.no_grad():
        outs = [call(x).tolist() for _ in range(3)]
    # the first call ran eagerly (1), the trace fixed the count it saw (2) and so differed: eager from then on
    assert call.traced_shapes == [] and outs[0] == [[[1.0, 1.0]]] and outs[-1] == [[[float(counting.calls)] * 2]]


@pytest.mark.parametrize("arch", DENSE)
def test_split_layers_give_the_same_logits_traced_and_eager(arch: str, tiny_checkpoint) -> None:
    model = _split_model(tiny_checkpoint(arch))
    rank = placement_of(model).cpu_rank
    layers = model.get_submodule(placement_of(model).layers_path)
    single, batch, mask = prompts()
    with torch.no_grad():
        rank.traced = False
        eager = [_generate(model, single), _generate(model, batch, mask)]
        rank.traced = True
        traced = [_generate(model, single), _generate(model, batch, mask)]
    for (tokens, logits), (want_tokens, want_logits) in zip(traced, eager):
        assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits)
    hidden = layers[0].dims.hidden  # decode passes of batch 1 and 2; the prompts' passes ran eagerly
    assert all(layer.mlp_call.traced_shapes == [(1, 1, hidden), (2, 1, hidden)] for layer in layers)


def test_only_decode_passes_are_traced_and_only_so_many() -> None:
    """A pass of several tokens a sequence runs eagerly, and past MOST_SHAPES shapes so do new ones: every trace
    stays in torch's compilation unit for the process's life."""
    from overspill.runtime import host_call

    call = HostCall(nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        call(torch.randn(1, 12, 8))
        assert call.traced_shapes == []
        for batch in range(1, host_call.MOST_SHAPES + 3):
            x = torch.randn(batch, 1, 8)
            assert torch.equal(call(x), call.chain(x))
    assert call.traced_shapes == [(b, 1, 8) for b in range(1, host_call.MOST_SHAPES + 1)]
