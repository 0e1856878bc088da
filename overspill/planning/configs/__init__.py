"""Hugging Face ``config.json`` files shipped with overspill.

They let planning and tests size real models without network access or
downloaded weights. Pure Python on purpose: no torch, no transformers.
"""

from __future__ import annotations

import json
from importlib import resources

SHIPPED: dict[str, str] = {
    "llama-3-8b": "llama-3-8b.json",
    "llama-3-70b": "llama-3-70b.json",
    "mixtral-8x7b": "mixtral-8x7b.json",
    "qwen2.5-7b": "qwen2.5-7b.json",
    "llama-4-scout-109b": "llama-4-scout-109b.json",
    "qwen3-30b-a3b": "qwen3-30b-a3b.json",
    "deepseek-v3": "deepseek-v3.json",
}


def shipped_names() -> list[str]:
    """Names accepted by :func:`shipped_config`, sorted."""
    return sorted(SHIPPED)


def shipped_config(name: str) -> dict:
    """Return a fresh copy of the shipped config ``name``.

    Raises ``ValueError`` (not ``KeyError``) so callers that also accept paths
    can report one kind of "unknown model" error.
    """
    try:
        filename = SHIPPED[name]
    except KeyError:
        raise ValueError(
            f"unknown shipped config {name!r}; known: {', '.join(shipped_names())}"
        ) from None
    text = resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")
    return json.loads(text)
