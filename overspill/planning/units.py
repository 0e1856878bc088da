"""Byte sizes: parse what users type ("6GiB", "500MB", 123) and print sizes back."""

from __future__ import annotations

import math
import re

from ..errors import OverspillError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str, what: str | None = None, auto: bool = False) -> int:
    """Parse a size like accelerate's `max_memory` values: 6GiB, 6GB (10^9), 512MiB, or a byte count.

    Args:
        what: the option it came from (e.g. "--kv-gpu-memory"), named in the error.
        auto: the option also takes "auto" (`parse_budget`), so the error lists it.

    Raises:
        OverspillError: for anything else, saying which forms are accepted.
    """
    where = f"{what}: " if what else ""
    forms = "'6GiB', '500MB', '80GB', 'auto'" if auto else "'6GiB', '500MB', '80GB'"
    if isinstance(value, bool):
        raise OverspillError(f"{where}invalid memory size {value!r}: use e.g. {forms} or a byte count")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise OverspillError(f"{where}invalid memory size {value!r}: it must be a finite, non-negative number")
        return int(value)
    match = _PATTERN.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise OverspillError(f"{where}invalid memory size {value!r}: use e.g. {forms} or a byte count")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_budget(value: int | float | str | None, what: str | None = None) -> int | str | None:
    """A GPU budget: None (no limit given), the string 'auto', or bytes."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return parse_bytes(value, what, auto=True)


def format_bytes(n: float) -> str:
    """Binary units, three significant figures: 1.5 GiB, 436 MiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{int(n)} B"
