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

Host blocks are counted by a `KVBlockManager` in its HOST_LAYER tier (one sequence per layer, a block
being `block_tokens` of the manager's tokens of that layer): a serving engine passes its own manager,
so its requests' host-tier KV is counted with the rest of its KV; alone, a cache owns a private one.
The bytes stay in each layer's contiguous buffer (one copy per prefetch), so the manager's block
indices are not used for addressing. The cache does not share blocks between sequences yet (prefix
reuse copies through `prefix.py`), and beam reordering of host-tier layers is refused (crop works:
speculative decoding needs it; its blocks go back through `KVBlockManager.truncate`).
`TieredCache.close` returns the blocks and releases the pinned host tier explicitly.

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
from ..planning.kvblocks import KVBlockManager, KVTier
from .layout import PinnedHost
from .ring import Ring
from .streams import CudaCopier, HostCopier

DEFAULT_BLOCK_TOKENS = 256


class KVRing(Ring):
    """Stages host-tier layers' KV on the device, `depth` layers ahead, cyclically over steps (see
    `ring.Ring`). Slots and copier come with the first update, which knows batch, heads and dtype."""

    def __init__(self, depth: int = 2):
        super().__init__(None, 0)
        self.depth = depth
        self.slots: list[tuple[torch.Tensor, torch.Tensor]] = []

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
        self.n_slots = n
        self.copier = CudaCopier(device, n) if device.type == "cuda" else HostCopier()

    def fill(self, layer: "HostKVLayer", slot: int) -> None:
        """The layer's host blocks (its first `host_tokens` tokens, one range) into the slot."""
        k, v = self.slots[slot]
        n = layer.host_tokens
        pairs = [(k[:n], layer.host_k[:n]), (v[:n], layer.host_v[:n])] if n else []
        self.copier.copy_many(pairs, slot)

    def release(self) -> None:
        """Wait for the staging copies, then drop the slots (the next update allocates them again)."""
        self.reset()
        self.slots, self.n_slots, self.copier = [], 0, None


class HostKVLayer(DynamicLayer):
    """A full-attention layer's KV in pinned host memory, staged on the device through a `KVRing`.

    Its sealed blocks are counted in a `KVBlockManager`'s HOST_LAYER tier (one sequence per layer):
    the manager's token count for the layer is `host_tokens`, so the blocks the manager holds are
    exactly those the layer's host tokens fill, in the manager's block size (which need not be the
    layer's `block_tokens`, the granularity at which KV spills to host memory).
    """

    def __init__(self, ring: KVRing, capacity: int, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                 blocks: KVBlockManager | None = None, pins: PinnedHost | None = None):
        super().__init__()
        self.ring = ring
        self.position = ring.add(self)
        self.capacity = -(-capacity // block_tokens) * block_tokens
        self.block_tokens = block_tokens
        self.blocks = blocks if blocks is not None else KVBlockManager(
            block_tokens, 0, 0, layer_blocks=self.capacity // block_tokens)
        self.pins = pins if pins is not None else PinnedHost()
        self.seq_id = object()  # this layer's sequence in the manager: unique while the manager holds it
        self.length = 0  # tokens held (host blocks + device tail)

    @property
    def host_tokens(self) -> int:
        """Tokens in host memory, a multiple of block_tokens: the manager's count for this layer."""
        return self.blocks.num_tokens(self.seq_id) if self.is_initialized else 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[:2] + key_states.shape[3:] != value_states.shape[:2] + value_states.shape[3:]:
            raise OverspillError(
                "this model caches keys and values of different shapes (DeepSeek's MLA latents), which host-tier "
                "KV does not hold yet; keep KV on the GPU (no kv_gpu_memory / --kv-gpu-memory): MLA's KV is small")
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, head_dim = key_states.shape
        shape = (self.capacity, batch, heads, head_dim)
        pinned = self.device.type == "cuda"
        self.host_k = self.pins.tensor(shape, self.dtype, pinned)
        self.host_v = self.pins.tensor(shape, self.dtype, pinned)
        self.tail_k = torch.empty((self.block_tokens, batch, heads, head_dim), dtype=self.dtype, device=self.device)
        self.tail_v = torch.empty_like(self.tail_k)
        self.ring.ensure_slots(shape, self.dtype, self.device)
        self.blocks.reserve(self.seq_id, 0, KVTier.HOST_LAYER)
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
        slot = self.ring.enter_until_next(self.position)
        sk, sv = self.ring.slots[slot]
        start = self.host_tokens
        tail = self.length - start
        if tail:
            sk[start : self.length].copy_(self.tail_k[:tail])
            sv[start : self.length].copy_(self.tail_v[:tail])
        sk[self.length : total].copy_(key_states.permute(2, 0, 1, 3))
        sv[self.length : total].copy_(value_states.permute(2, 0, 1, 3))
        sealed = total // self.block_tokens * self.block_tokens  # >= start: start is a block edge <= length
        if sealed > start:  # whole blocks spill to host; stream order puts them before the next prefetch
            self._hold(sealed)  # a shared manager may be full: it raises, and nothing has moved
            self.host_k[start:sealed].copy_(sk[start:sealed], non_blocking=True)
            self.host_v[start:sealed].copy_(sv[start:sealed], non_blocking=True)
        rest = total - sealed
        if rest:
            self.tail_k[:rest].copy_(sk[sealed:total])
            self.tail_v[:rest].copy_(sv[sealed:total])
        self.length = total
        # [batch, heads, tokens, head_dim] views of the staging slot, as attention expects
        return sk[:total].permute(1, 2, 0, 3), sv[:total].permute(1, 2, 0, 3)

    def _hold(self, tokens: int) -> None:
        """Make the manager hold `tokens` for this layer, in its HOST_LAYER tier (a shrink gives blocks back)."""
        held = self.host_tokens
        if tokens < held:
            self.blocks.truncate(self.seq_id, tokens)
        elif tokens > held:
            self.blocks.append(self.seq_id, tokens - held, tier=KVTier.HOST_LAYER)  # raises before any change

    def release(self) -> None:
        """Give the layer's blocks back and drop its buffers; the next update allocates them again."""
        if self.is_initialized:
            self.blocks.free(self.seq_id)
            del self.host_k, self.host_v, self.tail_k, self.tail_v
        self.is_initialized = False
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._hold(0)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (0: none; positive, the legacy form: keep that
        many), as `DynamicLayer.crop` does in transformers 5.17 and 5.25 (generate calls `crop(0)`).

        Rejected draft tokens usually sit in the device tail. When the cut falls inside sealed host
        blocks, the kept part of the last such block comes back into the tail (one small copy)."""
        keep = min(tokens_to_remove, self.length) if tokens_to_remove > 0 else self.length + tokens_to_remove
        keep = max(keep, 0)
        if keep >= self.host_tokens:
            self.length = keep
            return
        sealed = keep // self.block_tokens * self.block_tokens
        rest = keep - sealed
        if rest:
            self.tail_k[:rest].copy_(self.host_k[sealed:keep], non_blocking=False)
            self.tail_v[:rest].copy_(self.host_v[sealed:keep], non_blocking=False)
        self._hold(sealed)
        self.length = keep

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise OverspillError("beam search over host-tier KV layers is not supported yet; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise OverspillError("expanding a TieredCache batch is not supported; pass one row per sequence")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise OverspillError("selecting rows of a TieredCache is not supported yet")


class PresizedLayer(DynamicLayer):
    """A full-attention layer's KV in one `[batch, heads, capacity, dim]` buffer per K and V, each of
    its own shape (DeepSeek's MLA caches a 512-wide latent as "keys" and its 64-wide rotary key as
    "values", one head each).

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
        self._reserve(key_states, value_states, length, total)
        self._k[:, :, length:total].copy_(key_states)
        self._v[:, :, length:total].copy_(value_states)
        self.keys, self.values = self._k[:, :, :total], self._v[:, :, :total]
        return self.keys, self.values

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, total: int) -> None:
        """Make `_k`/`_v` hold `total` tokens with the current `length` tokens in place."""
        k, v = self._k, self._v

        def fits(buffer: torch.Tensor | None, states: torch.Tensor) -> bool:
            return (buffer is not None and buffer.shape[:2] == states.shape[:2] and buffer.shape[3] == states.shape[3]
                    and buffer.dtype == states.dtype and buffer.device == states.device and buffer.shape[2] >= total)

        both_fit = fits(k, key_states) and fits(v, value_states)
        in_place = length == 0 or (k is not None and self.keys.data_ptr() == k.data_ptr()
                                   and self.keys.stride() == k.stride())
        if both_fit and in_place:
            return
        old_k, old_v = self.keys, self.values
        if not both_fit:
            tokens = max(self.capacity, total)
            self._k = key_states.new_empty((*key_states.shape[:2], tokens, key_states.shape[3]))
            self._v = value_states.new_empty((*value_states.shape[:2], tokens, value_states.shape[3]))
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
        blocks: the manager whose HOST_LAYER tier counts the sealed tokens of each host layer (in its
            own block size), shared to count this cache with the rest of a serving engine's KV or to
            bound several caches' host tiers together. None: a private one sized to this cache.
    """

    def __init__(
        self, config, host_layers: set[int] | list[int], capacity: int,
        block_tokens: int = DEFAULT_BLOCK_TOKENS, depth: int = 2, blocks: KVBlockManager | None = None,
    ):
        super().__init__(config=config)
        self.ring = KVRing(depth)
        self.pins = PinnedHost()
        host = []
        for i in sorted(host_layers):
            if i >= len(self.layers):
                raise OverspillError(f"layer {i} does not exist: the model has {len(self.layers)} layers")
            if not getattr(self.layers[i], "is_sliding", False):  # a sliding window keeps few tokens: device
                host.append(i)
        self.host_capacity = -(-capacity // block_tokens) * block_tokens  # tokens each host layer holds
        self.blocks = blocks if blocks is not None else KVBlockManager(
            block_tokens, 0, 0, layer_blocks=len(host) * self.host_capacity // block_tokens)
        for i in host:
            self.layers[i] = HostKVLayer(self.ring, capacity, block_tokens, self.blocks, self.pins)
        presize(self, capacity)

    def max_host_blocks(self, block_tokens: int) -> int:
        """Blocks of `block_tokens` tokens the host layers hold at capacity: what a manager's HOST_LAYER
        tier needs per cache."""
        return len(self.host_layer_indices) * -(-self.host_capacity // block_tokens)

    @property
    def host_layer_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, HostKVLayer)]

    @property
    def host_blocks(self) -> int:
        """Blocks this cache's host layers hold in its manager (each layer's sealed tokens, in the manager's blocks)."""
        return sum(len(self.blocks.block_table(layer.seq_id))
                   for layer in self.layers if isinstance(layer, HostKVLayer) and layer.is_initialized)

    def close(self) -> None:
        """Release the host tier now rather than when the garbage collector gets to it: staging copies
        finish, blocks go back to the manager, pinned pages are unlocked (one device sync, so not
        during a graph capture). The cache stays usable: the next update allocates again."""
        self.ring.release()
        for i in self.host_layer_indices:
            self.layers[i].release()
        self.pins.close()

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
