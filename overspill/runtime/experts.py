"""Routed experts that stay in pinned host memory and cross the link only when the router picks them.

A streamed MoE layer's ring slot carries everything but its routed experts (`planning.moe`). Its
experts module is wrapped: after the router has run, the wrapper reads which experts the batch
selected (one sync), makes sure they sit in the `ExpertCache` (a GPU slot per expert, shared by every
streamed MoE layer; misses are copied on a side stream and compute waits for them), and runs the
experts with the cache as their weights. The math is transformers' own:

- experts modules under transformers' `use_experts_implementation` (Mixtral, Qwen2/3-MoE,
  DeepSeek-V3) run their own dispatched forward (grouped_mm, batched_mm, ...) with the cache tensors
  as weights and the router's indices mapped to cache slots: each (token, expert) pair meets the
  same weights, and the weighted sum runs over each token's top-k in the router's order. The eager
  loop sums experts in index order, so for it the module runs once per selected expert, in that
  order, on the expert's slot (no expert is copied).
- Llama 4's `Llama4TextMoe` multiplies every token by every expert (unselected ones get a routing
  score of 0, so they add exact zeros). `Llama4RoutedMoe` computes only the experts some token
  selected, puts their outputs in the same [experts, tokens, hidden] sum, and adds the shared expert
  as transformers does, so the result is the same sum. Each expert runs as a bmm over two entries
  (its input and zeros, its weights expanded): cuBLAS rounds a one-entry bmm (and mm) differently from
  transformers' 16-entry one below 256 tokens, while 2, 4, 8 and 16 entries agree bit for bit (H100,
  torch 2.11: bench/results/llama4-identity-20261206-233527.json), for +0.09 ms a layer at 1 token.

With `HostExperts` (`load(cpu_experts=...)`, `planning.host_experts`) some missing experts are not
copied: the host computes them from their pinned buffers while the link brings the others, and their
rows are added to the GPU's sum (in which their routing weights are zeroed). The host rounds
differently, so those layers match the resident model within float noise, not bit for bit.

Experts that keep a checkpoint's codes (`expert_codes.ExpertCodes`, a converted GGUF's) cross as one block
each into a staging buffer and expand into their slot; the host holds no compute-dtype copy of them to compute on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..planning.host_experts import host_count, refused
from ..planning.moe import RESIDENT_ROUTED_PAIRS
from ..planning.routing import RoutingStats
from .expert_codes import ExpertCodes
from .streams import new_stream

GROUPED = frozenset({"grouped_mm", "batched_mm"})  # implementations that sum over top-k, not over expert index


class HostExperts:
    """Which of a layer's missing experts the host computes (`planning.host_experts`): all of them ("on"),
    or the ones routed to the fewest tokens while that shortens the layer at the probed rates ("auto")."""

    def __init__(self, mode: str, expert_bytes: int, expert_params: int, link_bytes_s: float = 0.0,
                 host_params_s: float = 0.0):
        self.mode = mode
        self.expert_bytes, self.expert_params = expert_bytes, expert_params
        self.link_bytes_s, self.host_params_s = link_bytes_s, host_params_s

    def pick(self, missing: list[int], tokens: list[int], free_slots: int = 0) -> set[int]:
        """The misses the host computes. "on" copies into the cache's `free_slots` first (the misses routed
        to most tokens), so the cache still holds what it can; once it is full every miss stays on the host."""
        order = sorted(zip(tokens, missing))
        if self.mode == "on":
            return {e for _, e in order[: max(0, len(order) - free_slots)]}
        k = host_count([n for n, _ in order], self.expert_bytes, self.expert_params, self.link_bytes_s,
                       self.host_params_s)
        return {e for _, e in order[:k]}


class ExpertCache:
    """GPU slots for routed experts, shared by all expert-streamed layers: frequency-aware eviction.

    A slot holds one expert of one layer (one tensor per expert parameter, [slots, *shape]). Victims
    are the slots whose experts the router picked for the fewest tokens so far, least recently used
    first among equals, never one the current call needs; so slots beyond one layer's working set
    keep the experts routed to most.

    Args:
        shapes: per expert parameter, its shape without the expert dimension and its dtype.
        slots: experts the cache holds (at least the experts of one layer).
        device: where the slots live; on CUDA misses are copied on a high-priority side stream.
    """

    def __init__(self, shapes: list[tuple[tuple[int, ...], torch.dtype]], slots: int, device: torch.device):
        self.tensors = [torch.empty((slots, *shape), dtype=dtype, device=device) for shape, dtype in shapes]
        self.slots = slots
        self.device = device
        self.stream = new_stream(device, priority=-1) if device.type == "cuda" else None
        self.slot_of: dict[tuple[int, int], int] = {}
        self.owner: list[tuple[int, int] | None] = [None] * slots
        self.routed: dict[tuple[int, int], int] = {}  # tokens routed to each (layer, expert) so far
        self.seen: dict[int, int] = {}  # tokens each layer's router saw so far (with `routed`: `routing_stats`)
        self.experts_of: dict[int, int] = {}  # experts of each layer the cache serves (`serve`)
        self.last_use = [0] * slots
        self.calls = 0
        self.hits = self.misses = self.bytes_copied = self.host_computed = 0
        self.expert_nbytes = sum(t[0].numel() * t.element_size() for t in self.tensors)
        self.host_policy: HostExperts | None = None  # `enable_host_experts`: misses the host computes
        self.staging: torch.Tensor | None = None  # a coded miss's block lands here (`reserve_codes`)
        self.scratch: torch.Tensor | None = None  # and expands through this (int4's unpacked codes)

    def reserve_codes(self, staging: int, scratch: int) -> None:
        """Hold device buffers for coded experts' misses: a block of `staging` bytes and `scratch` bytes to
        expand it through (grown to the largest layer's; misses expand one after another on one stream)."""
        if self.staging is None or self.staging.numel() < staging:
            self.staging = torch.empty(staging, dtype=torch.uint8, device=self.device)
        if self.scratch is None or self.scratch.numel() < scratch:
            self.scratch = torch.empty(scratch, dtype=torch.uint8, device=self.device)

    def fetch(self, layer: int, experts: list[int], tokens: list[int],
              host: list[torch.Tensor] | ExpertCodes) -> list[int]:
        """Slots holding `experts` of `layer` (copied from `host`, per parameter [experts, ...], or expanded from
        its coded blocks, on a miss); compute on the current stream is ordered after the copies. `tokens`:
        tokens routed to each."""
        self.calls += 1
        needed = {(layer, e) for e in experts}
        out = []
        missing = []
        for e, n in zip(experts, tokens):
            key = (layer, e)
            self.routed[key] = self.routed.get(key, 0) + n
            slot = self.slot_of.get(key)
            if slot is None:
                missing.append(e)
                out.append(-1)
            else:
                self.hits += 1
                self.last_use[slot] = self.calls
                out.append(slot)
        if missing:
            # ascending, so the missing experts (ascending) land in ascending slots: where no hit sits between
            # them, slot order is expert order and grouped_mm's sort groups rows exactly as for the resident model
            victims = sorted(self._victims(len(missing), needed))
            self._copy(layer, missing, victims, host)
            it = iter(victims)
            out = [s if s >= 0 else next(it) for s in out]
        return out

    def _victims(self, count: int, needed: set[tuple[int, int]]) -> list[int]:
        if count > self.slots:
            raise RuntimeError(f"a pass selected {count} experts of one layer but the expert cache holds {self.slots}")
        free = [s for s in range(self.slots) if self.owner[s] is None][:count]
        if len(free) == count:
            return free
        taken = [s for s in range(self.slots) if self.owner[s] is not None and self.owner[s] not in needed]
        taken.sort(key=lambda s: (self.routed[self.owner[s]], self.last_use[s]))
        return free + taken[: count - len(free)]

    def _copy(self, layer: int, experts: list[int], slots: list[int], host: list[torch.Tensor] | ExpertCodes) -> None:
        """Copy each expert's tensors into its slot (coded blocks: through the staging buffer, expanded). The
        router's result was read on the host, so every compute enqueued before it (the last readers of these
        slots) has finished; the copy stream still waits for the compute stream, which costs nothing then and
        keeps the order explicit."""
        for e, slot in zip(experts, slots):
            old = self.owner[slot]
            if old is not None:
                del self.slot_of[old]
            self.owner[slot] = (layer, e)
            self.slot_of[layer, e] = slot
            self.last_use[slot] = self.calls
        self.misses += len(experts)
        coded = isinstance(host, ExpertCodes)
        self.bytes_copied += len(experts) * (host.stride if coded else self.expert_nbytes)
        if self.stream is None:
            self._fill(experts, slots, host, coded, non_blocking=False)
            return
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            self._fill(experts, slots, host, coded, non_blocking=True)
        current.wait_stream(self.stream)

    def _fill(self, experts: list[int], slots: list[int], host: list[torch.Tensor] | ExpertCodes, coded: bool,
              non_blocking: bool) -> None:
        """The copies (and expansions) of `_copy`, on the current stream. A coded expert's block lands in the one
        staging buffer and expands from it before the next block overwrites it (stream order)."""
        for e, slot in zip(experts, slots):
            if coded:
                block = self.staging[: host.stride]
                block.copy_(host.rows[e], non_blocking=non_blocking)
                host.expand(block, [t[slot] for t in self.tensors], self.scratch)
                continue
            for dst, src in zip(self.tensors, host):
                dst[slot].copy_(src[e], non_blocking=non_blocking)

    def serve(self, layer: int, experts: int) -> None:
        """Register a streamed MoE layer of `experts` experts (its `routing_stats` row exists before it runs)."""
        self.experts_of[layer] = experts
        self.seen.setdefault(layer, 0)

    def routing_stats(self) -> RoutingStats:
        """Tokens seen and routed per expert of every layer served, since load (not reset by `reset_stats`:
        the counts that drive eviction are the ones the planner's measured routing needs)."""
        routed, seen = self.routed.copy(), self.seen.copy()  # copies are atomic: a metrics thread may read mid-step
        layers = tuple(sorted(self.experts_of))
        return RoutingStats(layers, tuple(float(seen.get(i, 0)) for i in layers),
                            tuple(tuple(float(routed.get((i, e), 0)) for e in range(self.experts_of[i]))
                                  for i in layers))

    @property
    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0

    def reset_stats(self) -> None:
        self.hits = self.misses = self.bytes_copied = self.host_computed = 0


def _selection(counts: torch.Tensor) -> tuple[list[int], list[int]]:
    """(selected experts, tokens routed to each) from per-expert token counts: the one host sync."""
    counts = counts.tolist()
    experts = [e for e, n in enumerate(counts) if n]
    return experts, [counts[e] for e in experts]


def host_share(cache: ExpertCache, layer: int, experts: list[int], tokens: list[int]) -> set[int]:
    """The selected experts of `layer` the host computes (`HostExperts.pick` over the cache's misses)."""
    if cache.host_policy is None:
        return set()
    missing = [(e, n) for e, n in zip(experts, tokens) if (layer, e) not in cache.slot_of]
    free = sum(1 for owner in cache.owner if owner is None)
    picked = cache.host_policy.pick([e for e, _ in missing], [n for _, n in missing], free)
    for e, n in missing:  # routed counts drive eviction: the host's experts count as used too
        if e in picked:
            cache.routed[layer, e] = cache.routed.get((layer, e), 0) + n
    return picked


class RoutedExperts(nn.Module):
    """Stands in for a transformers experts module (`forward(hidden, top_k_index, top_k_weights)`),
    computing with the selected experts from the `ExpertCache`.

    `experts` keeps the module; its expert parameters point at the cache's tensors while it runs
    and at their pinned host buffers ([experts, ...] each) otherwise (`codes`: at placeholders, the
    experts' host copy being their coded blocks).
    """

    def __init__(self, experts: nn.Module, layer: int, names: list[str], cache: ExpertCache,
                 codes: ExpertCodes | None = None):
        super().__init__()
        self.experts = experts
        self.layer = layer
        self.names = names
        self.host = [experts._parameters[n].data for n in names]
        self.num_experts = self.host[0].shape[0]
        self.codes = codes
        object.__setattr__(self, "cache", cache)
        cache.serve(layer, self.num_experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        inner = self.experts
        rows = top_k_index.numel() // max(top_k_index.shape[-1], 1)  # [tokens, k]: the tokens the router saw
        self.cache.seen[self.layer] = self.cache.seen.get(self.layer, 0) + rows
        experts, tokens = _selection(torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts))
        on_host = host_share(self.cache, self.layer, experts, tokens)
        if on_host:  # the GPU's copies go first, so the link works while the host computes its share
            kept = [(e, n) for e, n in zip(experts, tokens) if e not in on_host]
            experts, tokens = [e for e, _ in kept], [n for _, n in kept]
            rows = hidden_states.cpu(), top_k_index.cpu(), top_k_weights.cpu()
        slots = self.cache.fetch(self.layer, experts, tokens, self.host if self.codes is None else self.codes)
        host_out = self._on_host(*rows, sorted(on_host)).to(hidden_states.device) if on_host else None
        if not experts:  # every selected expert computed on the host (or no token routed here)
            return host_out if host_out is not None else torch.zeros_like(hidden_states)
        impl = getattr(getattr(inner, "config", None), "_experts_implementation", None) or "eager"
        if not any(name in impl for name in GROUPED):
            out = self._expert_by_expert(hidden_states, top_k_index, top_k_weights, experts, slots)
            return out if host_out is None else out + host_out
        lookup = torch.zeros(self.num_experts, dtype=torch.long)  # also overspill's graph routers over them
        lookup[experts] = torch.tensor(slots)
        sentinels = bool(on_host) and "grouped_mm" in impl
        if sentinels:  # past the last slot: grouped_mm's sentinel rows, sorted last, skipped and zeroed
            lookup[sorted(on_host)] = self.cache.slots
        elif on_host:  # batched_mm computes every row: a slot this call filled (an unfilled one may hold NaN bits)
            lookup[sorted(on_host)] = slots[0]
        index = lookup.to(top_k_index.device, non_blocking=True)[top_k_index]
        if host_out is None:
            return self._run(self.cache.tensors, self.cache.slots, hidden_states, index, top_k_weights)
        host_rows = torch.isin(top_k_index, torch.tensor(sorted(on_host), device=top_k_index.device))
        out = self._run(self.cache.tensors, self.cache.slots, hidden_states, index,
                        top_k_weights.masked_fill(host_rows, 0), sentinels)  # host experts add exact zeros
        return out + host_out

    def _on_host(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 experts: list[int]) -> torch.Tensor:
        """The host's experts' weighted sum over their tokens, as transformers' eager loop computes one
        expert (gate_up, the module's gate, down, the routing weight), from the pinned host buffers."""
        inner = self.experts
        gate_up_w, down_w = self.host
        final = torch.zeros_like(hidden_states)
        for expert in experts:
            top_k_pos, token_idx = torch.where((top_k_index == expert).transpose(0, 1))
            gated = inner._apply_gate(nn.functional.linear(hidden_states[token_idx], gate_up_w[expert]))
            out = nn.functional.linear(gated, down_w[expert]) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        self.cache.host_computed += len(experts)
        return final

    def _expert_by_expert(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                          experts: list[int], slots: list[int]) -> torch.Tensor:
        """The eager loop's sum, bit for bit, without copying a cached expert: transformers adds each
        expert's rows into zeros in expert-index order, so run the module on one expert at a time (its
        slot's views, its own tokens in the loop's order) and add in that order. Copying the selected
        experts into index order instead took their bytes again (Mixtral at prefill: all 8, 2.8 GB)."""
        final = torch.zeros_like(hidden_states)
        for expert, slot in zip(experts, slots):
            top_k_pos, token_idx = torch.where((top_k_index == expert).transpose(0, 1))  # as the loop's mask
            out = self._run([t[slot : slot + 1] for t in self.cache.tensors], 1, hidden_states[token_idx],
                            torch.zeros_like(token_idx).unsqueeze(1), top_k_weights[token_idx, top_k_pos, None])
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def _run(self, weights: list[torch.Tensor], count: int, hidden_states: torch.Tensor, index: torch.Tensor,
             top_k_weights: torch.Tensor, sentinels: bool = False) -> torch.Tensor:
        """The transformers module over `count` experts whose parameters are `weights` (then the host buffers again).

        `sentinels`: rows whose index is `count` belong to no slot (the host computes them). transformers'
        grouped_mm skips such rows and zeroes their output: always in 5.17, under `_is_expert_parallel` in
        later releases, so that flag is raised for the call. Their routing weights are zero too."""
        inner = self.experts
        for name, tensor in zip(self.names, weights):
            inner._parameters[name].data = tensor
        inner.num_experts = count
        if sentinels:
            parallel = getattr(inner, "_is_expert_parallel", None)
            inner._is_expert_parallel = True
        try:
            return inner(hidden_states, index, top_k_weights)
        finally:
            if sentinels:
                inner._is_expert_parallel = parallel
            inner.num_experts = self.num_experts
            for name, tensor in zip(self.names, self.host):
                inner._parameters[name].data = tensor


class Llama4RoutedMoe(nn.Module):
    """`Llama4TextMoe` computing only the selected experts (module docstring); keeps its router,
    shared expert and experts module (whose weights are the pinned host buffers, or the GPU's where resident).

    Without a cache the layer is resident and its experts' own GPU weights serve: transformers' module
    multiplies every token by all 16 experts, reading 16x the weights one token needs at batch 1 (Scout:
    4 GB a layer, ~30 ms a step over its resident layers, a step the link could not overlap). Above
    `RESIDENT_ROUTED_PAIRS` (token, expert) pairs the module runs as transformers wrote it: one bmm over all
    experts beats a sync and a two-entry bmm per selected expert there."""

    def __init__(self, moe: nn.Module, layer: int, cache: ExpertCache | None):
        super().__init__()
        self.moe = moe
        self.layer = layer
        experts = moe.experts
        self.host = [experts.gate_up_proj.data, experts.down_proj.data]  # [E, H, 2I], [E, I, H]; GPU tensors where resident
        object.__setattr__(self, "cache", cache)
        if cache is not None:
            cache.serve(layer, self.host[0].shape[0])

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moe = self.moe
        hidden_states = hidden_states.reshape(-1, moe.hidden_dim)
        if self.cache is None and hidden_states.shape[0] * moe.top_k > RESIDENT_ROUTED_PAIRS:
            return moe(hidden_states)
        router_scores, router_logits = moe.router(hidden_states)  # [T, E]: sigmoid(top-k logits), 0 elsewhere
        num_experts = router_scores.shape[1]
        routed_in = hidden_states.repeat(num_experts, 1)
        routed_in = routed_in * router_scores.transpose(0, 1).reshape(-1, 1)
        experts, tokens = _selection((router_scores != 0).sum(dim=0))
        per_expert = routed_in.view(num_experts, -1, moe.hidden_dim)  # [E, T, H]
        routed_out = torch.zeros_like(per_expert)
        act = moe.experts.act_fn
        if self.cache is None:  # resident: each selected expert's own weights
            weights, slots = self.host, experts
        else:
            weights, experts, slots = self._fetch(per_expert, router_scores, experts, tokens, routed_out, act)
        gate_up_w, down_w = weights
        pair = torch.zeros((2, *per_expert.shape[1:]), dtype=per_expert.dtype, device=per_expert.device)
        for e, slot in zip(experts, slots):  # unselected experts' inputs are zero: their outputs too
            pair[0] = per_expert[e]  # entry 1 stays zero: two entries round as transformers' sixteen do
            gate_up = torch.bmm(pair, gate_up_w[slot : slot + 1].expand(2, -1, -1))
            gate, up = gate_up.chunk(2, dim=-1)
            routed_out[e : e + 1] = torch.bmm(up * act(gate), down_w[slot : slot + 1].expand(2, -1, -1))[:1]
        out = moe.shared_expert(hidden_states)
        out.add_(routed_out.sum(dim=0))
        return out, router_logits

    def _fetch(self, per_expert: torch.Tensor, router_scores: torch.Tensor, experts: list[int], tokens: list[int],
               routed_out: torch.Tensor, act) -> tuple[list[torch.Tensor], list[int], list[int]]:
        """A streamed layer's experts: the host's share computed into `routed_out`, the rest fetched into
        the cache; returns the cache's weights, the experts the GPU computes and their slots."""
        self.cache.seen[self.layer] = self.cache.seen.get(self.layer, 0) + router_scores.shape[0]
        on_host = sorted(host_share(self.cache, self.layer, experts, tokens))
        if on_host:  # their inputs to the host first; then the GPU's copies, which run while the host computes
            kept = [(e, n) for e, n in zip(experts, tokens) if e not in on_host]
            experts, tokens = [e for e, _ in kept], [n for _, n in kept]
            host_in, host_scores = per_expert[on_host].cpu(), router_scores[:, on_host].cpu()
        slots = self.cache.fetch(self.layer, experts, tokens, self.host)
        if on_host:
            routed_out[on_host] = self._on_host(host_in, host_scores, on_host, act).to(routed_out.device)
        return self.cache.tensors, experts, slots

    def _on_host(self, host_in: torch.Tensor, scores: torch.Tensor, experts: list[int], act) -> torch.Tensor:
        """The host's experts over their routed tokens' rows of `host_in` ([experts, tokens, hidden]), as the
        GPU loop computes them, from the pinned buffers ([E, H, 2I] and [E, I, H]). Unrouted rows are zero
        inputs, whose outputs are exact zeros (silu(0) * 0), so they are not multiplied."""
        gate_up_w, down_w = self.host
        out = torch.zeros_like(host_in)
        for i, e in enumerate(experts):
            rows = scores[:, i].nonzero().squeeze(1)
            gate, up = torch.mm(host_in[i, rows], gate_up_w[e]).chunk(2, dim=-1)
            out[i, rows] = torch.mm(up * act(gate), down_w[e])
        self.cache.host_computed += len(experts)
        return out


def expert_params(layer: nn.Module) -> list[tuple[str, list[str], nn.Module]]:
    """(qualified module name, parameter names, module) of each routed-experts module in a decoder layer:
    a module named `experts` whose parameters all lead with the expert dimension."""
    found = []
    for name, module in layer.named_modules():
        if name.split(".")[-1] != "experts" or isinstance(module, (RoutedExperts, nn.ModuleList)):
            continue
        params = list(module.named_parameters(recurse=False))
        if params and len({p.shape[0] for _, p in params}) == 1:
            found.append((name, [n for n, _ in params], module))
    return found


def wrap_experts(layer: nn.Module, index: int, cache: ExpertCache, codes: ExpertCodes | None = None) -> None:
    """Replace the routed-experts module of `layer` (or Llama 4's whole MoE block) by its expert-streamed
    form; its expert parameters must already hold their pinned host buffers, or `codes` their coded blocks
    (one transformers experts module)."""
    found = expert_params(layer)
    if codes is not None:
        if len(found) != 1 or not hasattr(found[0][2], "has_gate"):
            raise NotImplementedError("coded experts stream for one transformers experts module a layer: "
                                      "load with stream_format='bf16'")
        name, names, module = found[0]
        _replace(layer, name, RoutedExperts(module, index, names, cache, codes))
        return
    for name, names, module in found:
        parent_name, parent, leaf = _owner(layer, name)
        if type(parent).__name__ == "Llama4TextMoe":
            _replace(layer, parent_name, Llama4RoutedMoe(parent, index, cache))
        elif hasattr(module, "has_gate"):  # transformers' `use_experts_implementation` experts
            setattr(parent, leaf, RoutedExperts(module, index, names, cache))
        else:
            raise NotImplementedError(f"expert streaming does not know {type(parent).__name__}.{leaf} "
                                      f"({type(module).__name__}): load with moe_streaming='dense'")


def route_resident(layer: nn.Module, index: int) -> None:
    """Llama 4's MoE block in a resident `layer` computing only its selected experts from their GPU weights, as
    the expert-streamed layers do (`Llama4RoutedMoe` without a cache): the same sums. Other models' experts
    modules compute only the routed experts already."""
    for name, _, _ in expert_params(layer):
        parent_name, parent, _ = _owner(layer, name)
        if type(parent).__name__ == "Llama4TextMoe":
            _replace(layer, parent_name, Llama4RoutedMoe(parent, index, None))


def _owner(layer: nn.Module, name: str) -> tuple[str, nn.Module, str]:
    """(owner's name, owner, leaf) of the submodule or parameter `name` of `layer`."""
    owner_name, _, leaf = name.rpartition(".")
    return owner_name, layer.get_submodule(owner_name) if owner_name else layer, leaf


def _replace(layer: nn.Module, name: str, module: nn.Module) -> None:
    _, owner, leaf = _owner(layer, name)
    setattr(owner, leaf, module)


def expert_shapes(layer: nn.Module) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Per expert parameter of a layer, its shape without the expert dimension and its dtype (cache slots)."""
    return [(tuple(p.shape[1:]), p.dtype) for _, names, m in expert_params(layer) for p in
            (m._parameters[n] for n in names)]


def stats(cache: ExpertCache | None) -> dict[str, Any]:
    """Hits, misses, hit rate and bytes copied since the last `reset_stats` (an empty dict without a cache)."""
    if cache is None:
        return {}
    return {"expert_slots": cache.slots, "hits": cache.hits, "misses": cache.misses, "hit_rate": cache.hit_rate,
            "expert_bytes_copied": cache.bytes_copied, "experts_computed_on_host": cache.host_computed}


HOST_SUPPORTED = ["gate_up_proj", "down_proj"]


def enable_host_experts(model: nn.Module, cache: ExpertCache | None, mode: str, link_bytes_s: float,
                        host_params_s: float) -> str | None:
    """Let the host compute missing experts (`planning.host_experts`) in every expert-streamed layer;
    returns a plan note, or raises OverspillError where "on" cannot apply. "auto" without probed rates
    (no GPU, no probe) computes nothing on the host."""
    from ..errors import OverspillError

    if mode == "off":
        return None
    wrapped = [m for m in model.modules() if isinstance(m, (RoutedExperts, Llama4RoutedMoe)) and m.cache is not None]
    unsupported = sorted({type(m.moe if isinstance(m, Llama4RoutedMoe) else m.experts).__name__ for m in wrapped
                          if not _host_computable(m)})
    coded = any(getattr(m, "codes", None) is not None for m in wrapped)
    if cache is None or not wrapped or unsupported or coded:
        why = ("no layer streams its experts (expert streaming is off)" if cache is None or not wrapped else
               "experts that cross as a checkpoint's codes have no host copy to compute on" if coded else
               f"{', '.join(unsupported)} experts are not computed on the host yet")
        if mode == "on":
            raise OverspillError(refused(why))
        return f"cpu experts auto: off ({why})"
    params = cache.expert_nbytes // cache.tensors[0].element_size()
    cache.host_policy = HostExperts(mode, cache.expert_nbytes, params, link_bytes_s, host_params_s)
    if mode == "auto" and (link_bytes_s <= 0 or host_params_s <= 0):
        return "cpu experts auto: off (no probed link and host rates)"
    return f"cpu experts {mode}: the host computes {'every' if mode == 'on' else 'a share of the'} missing expert" + \
        ("" if mode == "on" else "s where that shortens the layer")


def _host_computable(module: nn.Module) -> bool:
    """Llama 4's MoE, or a transformers experts module whose expert is gate_up (concatenated or the module's
    own gate), then down, without biases, post-expert norms or transposed weights: what the `_on_host`
    methods compute."""
    if isinstance(module, Llama4RoutedMoe):
        return True
    if not isinstance(module, RoutedExperts):
        return False
    inner = module.experts
    return (module.names == HOST_SUPPORTED and getattr(inner, "has_gate", False) and hasattr(inner, "_apply_gate")
            and not getattr(inner, "has_bias", False) and not getattr(inner, "is_transposed", False)
            and not getattr(inner, "has_post_expert_norm", False))
