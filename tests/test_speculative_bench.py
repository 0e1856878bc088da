"""bench/speculative.py's pass-cost fit: the line goes through the one-token pass, so the forecast's plain step
is the measured one and never 0 (a free intercept went below 0 on steep serial costs: ZeroDivisionError)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from speculative import fit  # noqa: E402


def test_fit_goes_through_the_one_token_pass_on_steep_serial_costs() -> None:
    cost = fit({1: 0.0041, 9: 0.0247, 17: 0.1937})
    assert cost.pass_seconds(1) == pytest.approx(0.0041)
    assert cost.per_token_s > 0 and cost.step_seconds(0) > 0


def test_fit_floors_a_negative_slope() -> None:
    cost = fit({1: 0.200, 8: 0.199, 64: 0.198})
    assert cost.per_token_s == 0 and cost.pass_seconds(64) == pytest.approx(0.200)
