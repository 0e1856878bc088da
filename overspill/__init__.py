"""overspill: run Hugging Face causal LMs whose weights do not fit in GPU memory.

`load` is imported lazily so that the pure planning modules (`overspill.planning.spec`,
`overspill.planning.plan`) stay importable without torch.
"""

from typing import Any

__all__ = ["load", "enable_unified_memory", "OverspillError"]
__version__ = "0.1.0"

from .errors import OverspillError


def __getattr__(name: str) -> Any:
    if name == "load":
        from .api import load

        return load
    if name == "enable_unified_memory":
        from .runtime.unified import enable_unified_memory

        return enable_unified_memory
    raise AttributeError(f"module 'overspill' has no attribute {name!r}")
