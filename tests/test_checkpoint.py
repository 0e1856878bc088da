"""Random weights are a function of (seed, name) only: the same wherever the tensor lives."""

from __future__ import annotations

import torch

from overspill import checkpoint
from overspill.checkpoint import RandomWeights


def test_random_weights_same_for_any_destination_and_chunked(monkeypatch) -> None:
    source = RandomWeights(seed=3, std=0.02, device=torch.device("cpu"))
    whole = torch.empty(64, 48)
    source.fill("model.layers.0.mlp.up_proj.weight", whole)
    # A view into a flat buffer (how streamed layers are stored) gets the same values.
    flat = torch.empty(64 * 48 + 100)
    view = flat[100:].view(64, 48)
    source.fill("model.layers.0.mlp.up_proj.weight", view)
    assert torch.equal(whole, view)
    # Small chunks (many seeds) stay deterministic and keep the requested scale.
    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", 100)
    a, b = torch.empty(64, 48), torch.empty(64, 48)
    source.fill("w.weight", a)
    source.fill("w.weight", b)
    assert torch.equal(a, b) and 0.015 < a.std().item() < 0.025
    # Norms start at one and biases at zero, like transformers' initialisation.
    norm, bias = torch.empty(8), torch.empty(8)
    source.fill("model.norm.weight", norm)
    source.fill("model.layers.0.self_attn.q_proj.bias", bias)
    assert torch.equal(norm, torch.ones(8)) and torch.equal(bias, torch.zeros(8))
