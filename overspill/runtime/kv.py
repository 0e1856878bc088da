"""`TieredCache`: a transformers cache whose chosen layers keep their KV in pinned host memory.

Layers on the GPU tier are transformers' own dynamic layers. A host-tier layer (`HostKVLayer`)
stores its KV token-major (`[capacity, batch, kv_heads, head_dim]`) in pinned host memory, so the
first `n` tokens are one contiguous range and move in one copy. New tokens are written on the
device: the partial last block (the tail) stays there, and each block that fills up is copied to
host memory on the compute stream (stream order makes it visible to the next prefetch).

When the model runs, the host-tier layers' KV visits a ring of device staging slots, like
streamed weights: `KVRing` copies layer i+depth's host blocks on a side stream while layer i
attends, cyclically across decode steps, with no host synchronisation. A slot is marked done
when the next host-tier layer starts (its attention has been enqueued by then).

The cache does not share blocks between sequences yet (prefix reuse builds on
`overspill.planning.kvblocks`), and beam reordering of host-tier layers is refused (crop works: speculative decoding needs it).

Device-tier full-attention layers are `PresizedLayer`s: each allocates its KV for the whole
sequence once, at its first update, and writes new tokens in place. transformers' `DynamicLayer`
grows by concatenation instead, which holds two copies of a layer's KV during each update and,
over a 128k-token chunked prefill, fragmented the allocator by ~9 GiB on the 70B shape.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..errors import OverspillError
from .layout import host_tensor
from .streams import CudaCopier, HostCopier

DEFAULT_BLOCK_TOKENS = 256


class KVRing:
    """Stages host-tier layers' KV on the device, `depth` layers ahead, cyclically over steps."""

    def __init__(self, depth: int = 2):
        self.depth = depth
        self.layers: list[HostKVLayer] = []
        self.slots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.copier: CudaCopier | HostCopier | None = None
        self.visit: int | None = None
        self.issued = 0
        self.pending_done: int | None = None
        self.restarts = 0

    def add(self, layer: "HostKVLayer") -> int:
        self.layers.append(layer)
        return len(self.layers) - 1

    def ensure_slots(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        """Allocate staging slots once the first layer knows batch, heads and head size."""
        if self.slots:
            if self.slots[0][0].shape != shape:
                raise OverspillError("a TieredCache serves one batch shape; create a new cache for a new batch")
            return
        n = min(self.depth + 1, len(self.layers))
        self.slots = [
            (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(n)
        ]
        self.copier = CudaCopier(device, n) if device.type == "cuda" else HostCopier()

    def _issue(self, visit: int) -> None:
        layer = self.layers[visit % len(self.layers)]
        slot = visit % len(self.slots)
        k, v = self.slots[slot]
        n = layer.host_tokens if layer.is_initialized else 0
        pairs = [(k[:n], layer.host_k[:n]), (v[:n], layer.host_v[:n])] if n else []
        self.copier.copy_many(pairs, slot)

    def enter(self, position: int) -> int:
        """Layer `position` is about to attend: returns its staging slot holding its host tokens."""
        count = len(self.layers)
        if self.pending_done is not None:
            self.copier.mark_done(self.pending_done)
            self.pending_done = None
        if self.visit is None or self.visit % count != position:
            self.copier.synchronize()
            self.restarts += 1
            self.visit = position
            self.issued = position
        while self.issued <= self.visit + len(self.slots) - 1:
            self._issue(self.issued)
            self.issued += 1
        slot = self.visit % len(self.slots)
        self.copier.wait_ready(slot)
        self.pending_done = slot
        self.visit += 1
        return slot


class HostKVLayer(DynamicLayer):
    """A full-attention layer's KV in pinned host memory, staged on the device through a `KVRing`."""

    def __init__(self, ring: KVRing, capacity: int, block_tokens: int = DEFAULT_BLOCK_TOKENS):
        super().__init__()
        self.ring = ring
        self.position = ring.add(self)
        self.capacity = -(-capacity // block_tokens) * block_tokens
        self.block_tokens = block_tokens
        self.length = 0  # tokens held (host blocks + device tail)
        self.host_tokens = 0  # tokens in host memory, a multiple of block_tokens

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, head_dim = key_states.shape
        shape = (self.capacity, batch, heads, head_dim)
        pinned = self.device.type == "cuda"
        self.host_k = host_tensor(shape, self.dtype, pinned)
        self.host_v = host_tensor(shape, self.dtype, pinned)
        self.tail_k = torch.empty((self.block_tokens, batch, heads, head_dim), dtype=self.dtype, device=self.device)
        self.tail_v = torch.empty_like(self.tail_k)
        self.ring.ensure_slots(shape, self.dtype, self.device)
        self.keys = self.values = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        total = self.length + new
        if total > self.capacity:
            raise OverspillError(
                f"sequence of {total} tokens exceeds the KV capacity of {self.capacity}; load with a larger context"
            )
        slot = self.ring.enter(self.position)
        sk, sv = self.ring.slots[slot]
        start, tail = self.host_tokens, self.length - self.host_tokens
        if tail:
            sk[start : self.length].copy_(self.tail_k[:tail])
            sv[start : self.length].copy_(self.tail_v[:tail])
        sk[self.length : total].copy_(key_states.permute(2, 0, 1, 3))
        sv[self.length : total].copy_(value_states.permute(2, 0, 1, 3))
        sealed = total // self.block_tokens * self.block_tokens
        if sealed > start:  # whole blocks spill to host; stream order puts them before the next prefetch
            self.host_k[start:sealed].copy_(sk[start:sealed], non_blocking=True)
            self.host_v[start:sealed].copy_(sv[start:sealed], non_blocking=True)
            self.host_tokens = sealed
        rest = total - self.host_tokens
        if rest:
            self.tail_k[:rest].copy_(sk[self.host_tokens : total])
            self.tail_v[:rest].copy_(sv[self.host_tokens : total])
        self.length = total
        # [batch, heads, tokens, head_dim] views of the staging slot, as attention expects
        return sk[:total].permute(1, 2, 0, 3), sv[:total].permute(1, 2, 0, 3)

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        self.length = self.host_tokens = 0

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` tokens (negative: drop that many), as `DynamicLayer.crop` does.

        Rejected draft tokens usually sit in the device tail. When the cut falls inside sealed host
        blocks, the kept part of the last such block comes back into the tail (one small copy)."""
        keep = self.length + max_length if max_length < 0 else min(max_length, self.length)
        if keep >= self.host_tokens:
            self.length = max(keep, 0)
            return
        sealed = keep // self.block_tokens * self.block_tokens
        rest = keep - sealed
        if rest:
            self.tail_k[:rest].copy_(self.host_k[sealed:keep], non_blocking=False)
            self.tail_v[:rest].copy_(self.host_v[sealed:keep], non_blocking=False)
        self.host_tokens, self.length = sealed, keep

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise OverspillError("beam search over host-tier KV layers is not supported yet; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise OverspillError("expanding a TieredCache batch is not supported; pass one row per sequence")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise OverspillError("selecting rows of a TieredCache is not supported yet")


class PresizedLayer(DynamicLayer):
    """A full-attention layer's KV in one `[batch, heads, capacity, head_dim]` buffer per K and V.

    `keys`/`values` stay views of the first `length` tokens, so every `DynamicLayer` method that
    reads them (lengths, masks, crop) works unchanged. The buffer is allocated at the first update,
    when batch, heads and dtype are known; an update past `capacity`, or keys replaced by beam
    reordering or row selection, moves the KV into a new buffer (rare paths, one copy).
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        total = length + key_states.shape[-2]
        self._reserve(key_states, length, total)
        self._k[:, :, length:total].copy_(key_states)
        self._v[:, :, length:total].copy_(value_states)
        self.keys, self.values = self._k[:, :, :total], self._v[:, :, :total]
        return self.keys, self.values

    def _reserve(self, key_states: torch.Tensor, length: int, total: int) -> None:
        """Make `_k`/`_v` hold `total` tokens with the current `length` tokens in place."""
        k = self._k
        batch, heads, _, dim = key_states.shape
        fits = (k is not None and k.shape[0] == batch and k.shape[1] == heads and k.shape[3] == dim
                and k.dtype == key_states.dtype and k.device == key_states.device and k.shape[2] >= total)
        in_place = length == 0 or (k is not None and self.keys.data_ptr() == k.data_ptr()
                                   and self.keys.stride() == k.stride())
        if fits and in_place:
            return
        old_k, old_v = self.keys, self.values
        if not fits:
            shape = (batch, heads, max(self.capacity, total), dim)
            self._k = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
            self._v = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
        if length:
            self._k[:, :, :length].copy_(old_k)
            self._v[:, :, :length].copy_(old_v)

    def reset(self) -> None:
        """Empty the layer and keep its buffer for the next sequence of the same shape (transformers'
        own `DynamicLayer.reset` differs between 5.17 and 5.25, so it is not relied on)."""
        if self._k is not None:
            self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]


def presized_cache(config, capacity: int) -> DynamicCache:
    """transformers' `DynamicCache` for `config`, its full-attention layers presized to `capacity` tokens
    (sliding-window layers keep their own, window-bounded growth)."""
    cache = DynamicCache(config=config)
    presize(cache, capacity)
    return cache


def presize(cache: DynamicCache, capacity: int) -> None:
    """Replace `cache`'s plain dynamic layers (full attention, on the device) by `PresizedLayer`s."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = PresizedLayer(capacity)


class TieredCache(DynamicCache):
    """`DynamicCache` with the full-attention layers in `host_layers` keeping KV in host memory.

    Args:
        config: the model config (layer types, sliding windows come from it).
        host_layers: indices of decoder layers whose KV lives in pinned host memory.
        capacity: most tokens per sequence (prompt + generated) the host layers hold.
        block_tokens: tokens per host block; whole blocks move to host as they fill.
        depth: how many host-tier layers ahead the staging ring copies.
    """

    def __init__(
        self, config, host_layers: set[int] | list[int], capacity: int,
        block_tokens: int = DEFAULT_BLOCK_TOKENS, depth: int = 2,
    ):
        super().__init__(config=config)
        self.ring = KVRing(depth)
        for i in sorted(host_layers):
            if i >= len(self.layers):
                raise OverspillError(f"layer {i} does not exist: the model has {len(self.layers)} layers")
            if getattr(self.layers[i], "is_sliding", False):
                continue  # a sliding window keeps few tokens: it stays on the device
            self.layers[i] = HostKVLayer(self.ring, capacity, block_tokens)
        presize(self, capacity)

    @property
    def host_layer_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, HostKVLayer)]

    def memory(self) -> dict[str, int]:
        """Bytes of KV per tier and in staging, for the planner and the server's metrics."""
        host = device = staging = 0
        for layer in self.layers:
            if isinstance(layer, HostKVLayer) and layer.is_initialized:
                host += 2 * layer.host_k[: layer.host_tokens].numel() * layer.host_k.element_size()
                device += 2 * layer.tail_k.numel() * layer.tail_k.element_size()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                device += 2 * layer.keys.numel() * layer.keys.element_size()
        for k, v in self.ring.slots:
            staging += 2 * k.numel() * k.element_size()
        return {"host_bytes": host, "device_bytes": device, "staging_bytes": staging}


def kv_dims(config) -> tuple[int, int, int]:
    """(decoder layers, KV heads, head size) of a transformers config's text model: GQA-aware."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or heads, head_dim


def layer_kv(cache: DynamicCache, index: int, start: int, end: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of tokens [start, end) of layer `index`, batch row `row`, as [tokens, heads, dim].

    Works on any dynamic cache (a `TieredCache` or transformers' own), for storing prefix blocks.
    """
    layer = cache.layers[index]
    if isinstance(layer, HostKVLayer):
        parts_k, parts_v = [], []
        if start < layer.host_tokens:
            stop = min(end, layer.host_tokens)
            parts_k.append(layer.host_k[start:stop, row].to(layer.device))
            parts_v.append(layer.host_v[start:stop, row].to(layer.device))
        if end > layer.host_tokens:
            lo = max(start, layer.host_tokens) - layer.host_tokens
            parts_k.append(layer.tail_k[lo : end - layer.host_tokens, row])
            parts_v.append(layer.tail_v[lo : end - layer.host_tokens, row])
        return torch.cat(parts_k), torch.cat(parts_v)
    if getattr(layer, "is_sliding", False):
        raise OverspillError("a sliding-window layer keeps only its window; its prefix KV cannot be read back")
    return layer.keys[row, :, start:end].transpose(0, 1), layer.values[row, :, start:end].transpose(0, 1)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward/generate keyword for a cache: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: TieredCache) -> dict[str, TieredCache]:
    """`generate` keyword arguments passing a user cache."""
    return {cache_kwarg(model): cache}
