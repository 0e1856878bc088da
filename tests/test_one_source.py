"""One definition per decision, used by every caller: the dtype table, the cuDNN attention switch
and the CLI's defaults (each stated where the planner defines it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from overspill import cli
from overspill.api import DTYPES, parse_dtype
from overspill.errors import OverspillError
from overspill.planning.plan import DEFAULT_CONTEXT, DEFAULT_DEPTH, STREAMING
from overspill.planning.spec import DEFAULT_DTYPE, DTYPE_ALIASES, DTYPE_BYTES, dtype_name
from overspill.runtime import hardware

ROOT = Path(__file__).resolve().parents[1]


def test_load_dtypes_are_named_and_sized_by_the_planners_table() -> None:
    for name, dtype in DTYPES.items():
        assert DTYPE_BYTES[name] == dtype.itemsize and dtype_name(dtype) == name
    for alias, name in DTYPE_ALIASES.items():  # every alias `plan` takes, `load` takes for the same dtype
        if name in DTYPES:
            assert parse_dtype(alias) is DTYPES[name] and parse_dtype(alias.upper()) is DTYPES[name]
    assert parse_dtype("auto", torch.device("cuda", 0)) is DTYPES[DEFAULT_DTYPE]
    assert parse_dtype("auto", torch.device("cpu")) is torch.float32
    assert parse_dtype(torch.float16) is torch.float16


@pytest.mark.parametrize("dtype", ["int3", "float8_e4m3fn", "fp8", torch.int8])
def test_dtypes_load_cannot_compute_in_are_one_line(dtype) -> None:
    with pytest.raises(OverspillError, match="use auto, bfloat16, float16 or float32"):
        parse_dtype(dtype)


def test_cudnn_sdpa_is_switched_off_in_one_function() -> None:
    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert hardware.disable_cudnn_sdpa() is True and not torch.backends.cuda.cudnn_sdp_enabled()
        assert hardware.disable_cudnn_sdpa() is False
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
    callers = [str(p.relative_to(ROOT)) for p in (ROOT / "overspill").rglob("*.py")
               if "enable_cudnn_sdp(False)" in p.read_text()]
    assert callers == ["overspill/runtime/hardware.py"]


def test_cli_defaults_are_the_planners_constants() -> None:
    sub = next(a for a in cli._build_parser()._subparsers._group_actions).choices
    run = {a.dest: a for a in sub["run"]._actions}
    plan = {a.dest: a for a in sub["plan"]._actions}
    assert run["depth"].default == plan["depth"].default == DEFAULT_DEPTH
    assert run["context"].default == plan["context"].default == DEFAULT_CONTEXT
    assert plan["dtype"].default == DEFAULT_DTYPE and tuple(run["streaming"].choices) == STREAMING
