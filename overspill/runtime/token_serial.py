"""Verify drafted tokens with plain decoding's own arithmetic: one token at a time inside each layer.

A pass over k tokens multiplies [k, hidden] matrices where plain decoding multiplies [1, hidden]
vectors; in bf16 the two round differently, and on random-weight 8B/70B shapes on the H200 the
greedy tokens parted after 3 tokens (bench/results/speculative-*-20261204-183*.json). On a
streamed model the link, not the GPU, sets the pace (70B at 80 GiB: 1085 ms of link, 36 ms of GPU
per step), so a verify pass can afford to run each decoder layer once per token, in order, while
the layer's weights sit in their ring slot: every token then sees the kernels, shapes and KV a
plain decode step gives it, and the tokens are plain greedy's bit for bit. The weights still
cross the link once per pass.

`serial_tokens(model)` switches the decoder layers, the final norm and the output head to that
mode for the duration of a `with` block. It is offered only where a one-token step needs no mask
(every layer full attention, one unpadded sequence), which is where plain decoding passes none.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import torch
from torch import nn


def _slice_kwargs(kwargs: dict[str, Any], j: int, mask_rows: bool = False) -> dict[str, Any]:
    out = dict(kwargs)
    mask = kwargs.get("attention_mask")
    if mask_rows and isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2] > 1:
        out["attention_mask"] = mask[..., j : j + 1, :]  # the row a one-token graphed step passes
    else:
        out["attention_mask"] = None  # a one-token step over an unpadded sequence attends to all its past
    cos_sin = kwargs.get("position_embeddings")
    if cos_sin is not None:
        out["position_embeddings"] = tuple(t[:, j : j + 1] for t in cos_sin)
    for key in ("position_ids", "cache_position"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[-1] > 1:
            out[key] = value[..., j : j + 1]
    return out


BeforeToken = Callable[[int, int], None]
"""`(layer index, token index)`: called before a layer runs a token, e.g. to crop that layer's KV to
the token's ancestors when the tokens form a draft tree (`trees.py`)."""


def _named(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A decoder block's call arguments after `hidden_states`, all by name: some models pass the mask
    positionally (GPT-2's `block(hidden, past, cache_position, mask, ...)`), which `_slice_kwargs`
    must find by name to drop it."""
    if not args:
        return kwargs
    params = list(inspect.signature(type(layer).forward).parameters.values())[2:]  # after self, hidden_states
    names = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    if len(args) > len(names):
        raise TypeError(f"{type(layer).__name__}.forward takes {len(names)} positional arguments after the "
                        f"hidden states, got {len(args)}")
    return {**dict(zip(names, args)), **kwargs}


def _per_token_layer(layer: nn.Module, index: int, before: BeforeToken | None, mask_rows: bool):
    forward = layer.forward

    def step(hidden_states: torch.Tensor, j: int, kwargs: dict[str, Any]):
        if before is not None:
            before(index, j)
        return forward(hidden_states[:, j : j + 1], **_slice_kwargs(kwargs, j, mask_rows))

    def run(hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if hidden_states.shape[1] == 1:
            return forward(hidden_states, *args, **kwargs)
        named = _named(layer, args, kwargs)
        outs = [step(hidden_states, j, named) for j in range(hidden_states.shape[1])]
        if isinstance(outs[0], tuple):
            return (torch.cat([o[0] for o in outs], dim=1), *outs[-1][1:])
        return torch.cat(outs, dim=1)

    return run


def _per_token_module(module: nn.Module):
    forward = module.forward

    def run(x: torch.Tensor, *args: Any, **kwargs: Any):
        if x.dim() < 3 or x.shape[1] == 1:
            return forward(x, *args, **kwargs)
        return torch.cat([forward(x[:, j : j + 1], *args, **kwargs) for j in range(x.shape[1])], dim=1)

    return run


def _inner(layer: nn.Module) -> nn.Module:
    """The decoder block itself: a streamed layer wraps it (its ring visit must stay one per pass)."""
    return layer._modules.get("block", layer)


def supports_serial(model: nn.Module) -> bool:
    """Full attention in every layer (a one-token step then needs no mask), a known final norm."""
    config = model.config.get_text_config()
    types = getattr(config, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
        return False
    return _final_norm(model) is not None


def _final_norm(model: nn.Module) -> nn.Module | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


@contextlib.contextmanager
def serial_tokens(model: nn.Module, before: BeforeToken | None = None, mask_rows: bool = False) -> Iterator[None]:
    """Within the block, every multi-token forward of `model` runs its layers one token at a time,
    calling `before(layer index, token index)` ahead of each token (None: tokens form a chain).
    `mask_rows`: each token gets its row of a 4D attention mask (a graphed step's mask, which its
    attention needs) instead of none."""
    from .loader import decoder_layers

    _, layers = decoder_layers(model)
    targets = [(_inner(layer), lambda m, i=i: _per_token_layer(m, i, before, mask_rows))
               for i, layer in enumerate(layers)]
    targets += [(_final_norm(model), _per_token_module), (model.get_output_embeddings(), _per_token_module)]
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for module, wrap in targets:
            patched.append((module, module.__dict__.get("forward")))
            module.forward = wrap(module)
        yield
    finally:
        for module, before in patched:
            if before is None:
                del module.forward
            else:
                module.forward = before
