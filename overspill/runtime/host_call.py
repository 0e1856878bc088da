"""A chain of host modules run by the CPU rank's worker as one TorchScript call.

Every eager torch op the worker runs returns to Python and must take the GIL back, while the Python thread
holds it to launch the device's share of the step: the worker then waits up to the switch interval (5 ms by
default) per op. At 5638238 on the H100 host a 0.5 ms interval alone took the split from 0.82x to 1.19x plain
streaming (bench/results/cpu-rank-gil-h100-20261207-5638238.log), so those waits were a large part of the step.
A traced chain releases the GIL for the whole call (its ops run in TorchScript's interpreter), so the norm and
MLP share of a layer (twelve ops for Llama) take the GIL once instead of twelve times. The same aten ops run, so
the result is the eager chain's bit for bit; a chain whose trace does not reproduce its eager output, or cannot
be traced, runs eagerly. `torch.jit.trace` is deprecated (torch 2.13 says so, and points at torch.compile and
torch.export, whose compiled graphs still return to Python between kernels or need a compiler at load); until it is
removed it is the one way to run a chain of ops under one GIL release, and without it the chain runs eagerly.
Unmeasured on a GPU host: bench/cpu_rank.py --also-eager compares the two.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


# torch 2.13 warns at every trace that TorchScript is deprecated (module docstring): said once here, not per trace
DEPRECATED = r"`torch\.jit\.trace(_method)?` is deprecated"
# traced shapes per chain: each trace keeps ~360 KB in torch's global compilation unit for the process's life
MOST_SHAPES = 8


class HostCall:
    """`modules` applied in order, traced once per input shape and dtype (a trace may fix shapes, such as a
    reshape's, as constants) and checked against the eager chain on that first input. Only decode passes (one
    token a sequence) are traced, at most `MOST_SHAPES` of them: the split computes wider passes on the host only
    below `max_tokens`, rarely and at shapes that vary. Traced calls run without TorchScript's optimizing
    executor: it would profile the first calls and may fuse ops, which changes bits."""

    def __init__(self, *modules: nn.Module):
        self.chain = nn.Sequential(*modules)
        self._calls: dict[tuple, object] = {}

    def __call__(self, x: torch.Tensor, traced: bool = True) -> torch.Tensor:
        if not traced or x.dim() < 2 or x.shape[-2] != 1:
            return self.chain(x)
        call = self._calls.get((tuple(x.shape), x.dtype))
        if call is None:
            return self._trace(x) if len(self._calls) < MOST_SHAPES else self.chain(x)
        with torch.jit.optimized_execution(False):
            return call(x)

    def warm(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Trace for inputs of `shape` now (a random input), so the first pass that uses them does not wait."""
        with torch.no_grad():
            self._trace(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype))

    def _trace(self, x: torch.Tensor) -> torch.Tensor:
        """The eager chain's output for `x`, keeping for its shape the traced chain, or the eager one where tracing
        fails or gives other bits."""
        want = self.chain(x)
        call = self.chain
        warnings.filterwarnings("ignore", message=DEPRECATED, category=DeprecationWarning)
        try:
            with torch.jit.optimized_execution(False):
                traced = torch.jit.trace(self.chain, (x,), check_trace=False)
                if torch.equal(traced(x), want):
                    call = traced
        except Exception:  # noqa: BLE001 - whatever tracing raises, the eager chain serves
            pass
        self._calls[(tuple(x.shape), x.dtype)] = call
        return want

    @property
    def traced_shapes(self) -> list[tuple[int, ...]]:
        """Input shapes whose calls run traced (tests and benchmarks read them)."""
        return [key[0] for key, call in self._calls.items() if call is not self.chain]
