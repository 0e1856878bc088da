"""Decode steps replayed as CUDA graphs, streamed-layer copies included.

Why: at batch 1 a resident decode is host-bound. HF launches ~15 kernels per layer, about
0.5-0.8 ms of host time per layer on the H100, where an 8B layer reads its weights from HBM in
~0.15 ms. A graph replays a whole step's launches with one call.

How: `generate` gets a `GraphCache` (transformers' `StaticCache`, so every tensor keeps its
address). Prefill runs eagerly. A decode step copies its inputs (embeddings, positions, the
padding mask) into fixed buffers and replays the graph captured for it. Attention sees a 4D mask
built inside the graph from the padding mask and the cache's own length counter, so the host
only advances inputs; `decode_attention` computes it without copying K and V per query head. Streamed layers are captured too: their copies on the copy stream, the
event waits and the prefetch of the next step's first layers. Their ring slots repeat every
slots / gcd(layers, slots) steps, so one graph is captured per phase (see `LayerRing.step_phase`).
The first step of each phase runs eagerly on the capture stream, which also warms it up, and is
then captured. On the CPU (and when capture is off) the same fixed-buffer step runs eagerly,
so CI checks everything but the capture.

Side effects on the model, all installed once by `enable_graphs`:
- `config._attn_implementation` (and `_experts_implementation`) name routers registered in
  transformers' interfaces: inside `decode_forward` they run `decode_attention` (and the
  graph-safe `batched_mm` experts), elsewhere the model's own kernels. transformers reads these
  names at every call, so choosing per call needs a router; flipping the names around each step
  mutated config that every other caller of the model shares.
- `model.forward` is replaced by `GraphedDecode.step`, and `generate` is given the static cache:
  `generate` calls the model's forward for every step, and PyTorch has no hook that can skip a
  forward and return another output, so replaying a graph in its place needs the replacement.
  The serving engine calls the original forward (`GraphedDecode.original`).
`load` names the experts router for every MoE model, graphs or not (`keep_grouped_experts`), and
plans graphed steps' batched_mm gathers in the workspace (`Workload.graphs`).
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
from contextvars import ContextVar
from typing import Any, Callable

import torch
from transformers import AttentionInterface, StaticCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import OverspillError
from .kv import cache_kwarg
from .loader import placement_of, provide_cache
from .streams import new_stream

log = logging.getLogger(__name__)

# keyword arguments a decode step may carry and still replay a graph
_STEP_KEYS = {"input_ids", "attention_mask", "position_ids", "past_key_values", "cache", "use_cache", "return_dict",
              "logits_to_keep", "output_attentions", "output_hidden_states"}


# True while `decode_forward` runs a step. A context variable, not a call kwarg: transformers passes
# call kwargs on to attention but not to MoE experts, and one flag serves both routers.
_GRAPHED_STEP: ContextVar[bool] = ContextVar("overspill_graphed_step", default=False)


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of one new token per sequence over the static cache: grouped-query heads without copies.

    Why: with a mask, transformers' SDPA path repeats K and V for every query head (two copies of
    the whole cache per layer) and PyTorch picks the memory-efficient kernel, which parallelises
    over query blocks: one block at decode. On the H100 that was 60 us a layer for a 1k cache,
    ~2 ms of a 10.6 ms 8B step. Here each KV head's query group is one small batched matmul.

    query [b, heads, 1, d]; key, value [b, kv_heads, L, d]; attention_mask bool, broadcastable to
    [b, 1, 1, L] (True: attend). Returns [b, 1, heads, d], as transformers' attention functions do.
    """
    b, heads, q_len, d = query.shape
    kv_heads = key.shape[1]
    scale = d**-0.5 if scaling is None else scaling
    q = (query * scale).reshape(b, kv_heads, heads // kv_heads * q_len, d)
    scores = torch.matmul(q, key.transpose(-1, -2))
    if q_len != 1:  # rows are (head, query) pairs; the mask varies by query
        scores = scores.view(b, kv_heads, heads // kv_heads, q_len, -1)
        mask = attention_mask.view(b, 1, 1, q_len, -1)
    else:
        mask = attention_mask.view(b, 1, 1, -1)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs.view(b, kv_heads, -1, key.shape[2]), value)
    return out.view(b, heads, q_len, value.shape[-1]).transpose(1, 2), None


ROUTER_PREFIX = "overspill_graphed_or_"


def route_decode_kernels(model: torch.nn.Module) -> None:
    """Point the model's attention (and experts) implementation at routers, once: graphed steps get
    `decode_attention` (and `batched_mm` experts), every other call the kernels the model had."""
    for config in _configs(model):
        own = getattr(config, "_attn_implementation", None)
        if own is not None:
            config._attn_implementation = _attention_router(own)
        experts = getattr(config, "_experts_implementation", None)
        if experts is not None:
            config._experts_implementation = _experts_router(experts)


def keep_grouped_experts(model: torch.nn.Module) -> None:
    """Eager passes run the experts kernel the model was built with, decode steps included.

    On a GPU transformers' `generate` renames "grouped_mm" to "batched_mm" while it decodes, and
    batched_mm gathers the weights of every routed (token, expert) pair: Mixtral at batch 1 copies two
    experts (672 MiB) per MoE layer call, 32 sequences 21 GB, none of it in any plan (an H100 run of
    Mixtral-8x7B at 24 GiB peaked 0.54 GiB past its plan in those copies). grouped_mm copies no weight.
    Naming the experts router (`_experts_router`) instead of "grouped_mm" leaves that switch nothing to
    switch; graphed steps still take batched_mm through the same router."""
    for config in _configs(model):
        if getattr(config, "_experts_implementation", None) == "grouped_mm":
            config._experts_implementation = _experts_router("grouped_mm")


def _configs(model: torch.nn.Module) -> list[Any]:
    """The model's config and its sub-configs (a multimodal model's text config carries the kernels too)."""
    config = model.config
    subs = (getattr(config, key, None) for key in getattr(config, "sub_configs", {}))
    return [config] + [sub for sub in subs if sub is not None]


def _attention_router(own: str) -> str:
    """The registered name of "`decode_attention` in graphed steps, else `own`" (sdpa or eager)."""
    if own.startswith(ROUTER_PREFIX):
        return own
    name = f"{ROUTER_PREFIX}{own}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"] if own == "sdpa" else None

        def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
            if _GRAPHED_STEP.get():
                return decode_attention(module, query, key, value, attention_mask, **kwargs)
            # eager attention is each architecture's own, beside its modeling code (where it would find it)
            fallback = sdpa or vars(sys.modules[type(module).__module__])["eager_attention_forward"]
            return fallback(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[own])  # the same masks as `own`
    return name


def _experts_router(own: str) -> str:
    """The registered name of "`batched_mm` experts in graphed steps, else `own`". In a graph, "eager"
    loops over the experts hit (nonzero: a host sync) and grouped_mm copied host offsets in float32
    on the H100: batched_mm is graph-safe."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if own.startswith(ROUTER_PREFIX):  # `keep_grouped_experts` named it at load
        return own
    name = f"{ROUTER_PREFIX}{own}"
    if name not in ALL_EXPERTS_FUNCTIONS:
        def experts(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
            if _GRAPHED_STEP.get():
                return ALL_EXPERTS_FUNCTIONS["batched_mm"](module, *args, **kwargs)
            # "eager" is the experts class's own forward, which transformers' dispatcher wraps
            fallback: Callable = ALL_EXPERTS_FUNCTIONS[own] if own != "eager" else type(module).forward.__wrapped__
            return fallback(module, *args, **kwargs)

        ExpertsInterface.register(name, experts)
    return name


class GraphCache(StaticCache):
    """A static KV cache reused across `generate` calls, so graphs captured over it stay valid.

    Not compileable on purpose: transformers would otherwise `torch.compile` the forward itself
    when it sees a static cache on CUDA. Croppable, for speculative decoding: a crop moves the
    layers' device counters back (graphs read them, and masks hide what lies past them) and tells
    `on_crop`, the host's count of cached tokens.
    """

    on_crop: Callable[[int], None] | None = None
    croppable = True  # whatever transformers' StaticLayer says of itself

    @property
    def is_compileable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (positive: keep that many), as transformers' caches do."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            return
        length = int(layers[0].cumulative_length)
        keep = min(tokens_to_remove, length) if tokens_to_remove > 0 else max(length + tokens_to_remove, 0)
        if keep == length:
            return
        with torch.inference_mode():  # counters made under inference mode may be cropped outside it
            for layer in layers:
                layer.cumulative_length.sub_(length - keep)
        if self.on_crop is not None:
            self.on_crop(length - keep)


def graphs_supported(model: torch.nn.Module, placement) -> str | None:
    """Why this model's decode cannot be graphed here, or None when it can."""
    config = model.config.get_text_config()
    if placement.plan.kv_host_layers:
        return "some layers keep their KV in host memory"
    if placement.plan.streaming == "managed" and placement.plan.streamed_layers:
        return "managed weights move by prefetch calls, which are not captured"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "it has sliding-window layers"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "it has a sliding window"
    if getattr(config, "attn_logit_softcapping", None):
        return "its attention soft-caps logits"
    if config._attn_implementation not in ("sdpa", "eager"):
        return f"attention '{config._attn_implementation}' takes no 4D mask"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = str(rope.get("rope_type", rope.get("type", ""))) if isinstance(rope, dict) else ""
    if "dynamic" in kind or kind == "longrope":  # they compare max(position) on the host each step
        return f"its '{kind}' rotary embedding reads positions on the host"
    return None


def decode_forward(forward: Callable, key: str, cache, embeds: torch.Tensor, mask: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """One decode step's logits through `forward` (the model's own), as graphs capture it: attention
    by `decode_attention` over the bool 4D `mask`, MoE experts through a kernel without host syncs
    (the routers of `route_decode_kernels` read the flag set here, on this thread only)."""
    graphed = _GRAPHED_STEP.set(True)
    try:
        out = forward(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                      return_dict=True, **{key: cache})
    finally:
        _GRAPHED_STEP.reset(graphed)
    return out.logits


class StepGraphs:
    """Replays decode steps as CUDA graphs, one per (shape key, ring phase), capturing each on first use.

    `run(body, key)` runs `body()` (a step over fixed buffers that returns its output tensor): the
    first time for a key and phase eagerly on the capture stream (its warm-up), then captured;
    later as a replay of that graph. Streamed layers' copies are captured with it: their ring slots
    repeat every slots / gcd(layers, slots) steps, hence one graph per phase. A capture failure turns
    capture off for good, said once (a verify pass's: for that pass size only); `capture=False` runs
    every step eagerly (the CPU path).
    """

    def __init__(self, placement, capture: bool):
        self.ring = placement.ring
        self.capture = capture
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, list]] = {}
        self.replays = 0
        self.eager_steps = 0
        self.eager_keys: set[tuple] = set()  # step kinds whose capture failed (verify passes only)
        self.stream = new_stream(placement.device) if capture else None
        self.pool = torch.cuda.graph_pool_handle() if capture else None  # one pool: steps replay one at a time

    def run(self, body, key: tuple = ()) -> torch.Tensor:
        phase = 0 if self.ring is None else self.ring.step_phase()
        if not self.capture or phase is None or key in self.eager_keys:
            self.eager_steps += 1
            return body()
        if (key, phase) in self.graphs:
            graph, out, _ = self.graphs[(key, phase)]
            copier = self.ring.copier if self.ring is not None else None
            if copier is not None:
                copier.before_replay()
            graph.replay()
            if copier is not None:
                copier.after_replay()
                self.ring.advance()
            self.replays += 1
            return out
        return self._warm_and_capture(body, (key, phase))

    def _warm_and_capture(self, body, key: tuple) -> torch.Tensor:
        """Run this step eagerly on the capture stream (its warm-up), then capture it under `key`."""
        main = torch.cuda.current_stream(self.stream.device)
        ring = self.ring
        before = ring.snapshot() if ring is not None else None
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            result = body()
        main.wait_stream(self.stream)
        self.eager_steps += 1
        after = ring.snapshot() if ring is not None else None
        graph, out, events = torch.cuda.CUDAGraph(), None, []
        torch.cuda.synchronize(self.stream.device)
        gc.collect()  # a finalizer during capture (unlocking pinned pages syncs) would break it
        gc.disable()
        try:
            if ring is not None:
                ring.restore(before)
            with torch.cuda.stream(self.stream):
                # thread-local: a server thread touching CUDA meanwhile must not break the capture
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    if ring is not None:
                        ring.copier.begin_capture()
                    out = body()
                finally:
                    if ring is not None and ring.copier.capturing:
                        ring.copier.end_capture()  # join the copy stream, or capture_end fails on it
                    graph.capture_end()
            if ring is not None:
                events = ring.copier.captured_events
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager, said once
            if key[0][:1] == ("verify",):  # a verify pass that cannot be captured runs eagerly; decode steps stay graphed
                self.eager_keys.add(key[0])
                log.warning("verify passes of %d tokens run eagerly (%s: %s)", key[0][1], type(err).__name__, err)
            else:
                self.capture = False
                log.warning("CUDA graphs off for this model (%s: %s); decoding eagerly", type(err).__name__, err)
        finally:
            gc.enable()
            if ring is not None:
                ring.copier.capturing = False
                ring.restore(after)
        if self.capture and key[0] not in self.eager_keys:
            self.graphs[key] = (graph, out, events)
        return result


class GraphedDecode(StepGraphs):
    """`generate`'s decode steps as graphs: owns the static cache and the fixed step buffers.

    Args:
        model: a model placed by `overspill.load`.
        placement: its `Placement` (the ring of streamed layers, if any).
        context: tokens the static cache holds (prompt + new tokens).
        capture: capture CUDA graphs (False: run the same fixed-buffer step eagerly).
    """

    def __init__(self, model: torch.nn.Module, placement, context: int, capture: bool):
        super().__init__(placement, capture)
        self.model = model
        self.original = model.forward
        self.key = cache_kwarg(model)  # generate passes the cache under the name forward takes
        self.context = context
        self.cache: GraphCache | None = None
        self.length = 0  # tokens in the cache, counted on the host (reading the device counter would sync)
        self._buffers: dict[str, torch.Tensor] = {}
        self._verify: dict[int, torch.Tensor] = {}  # verify passes' embedding buffers by token count

    def install(self) -> None:
        """Route `model(...)` through `step`, and give `generate` the static cache."""
        @functools.wraps(self.original)  # generate reads the forward's signature
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self.step(*args, **kwargs)

        self.model.forward = forward
        provide_cache(self.model, self.fresh_cache)

    def fresh_cache(self, batch: int, tokens: int = 0) -> GraphCache:
        """The static cache of the plan's context, emptied in place (its graphs stay valid), or a new one
        for a new batch size; `tokens` (what this generate call needs) is checked as steps run."""
        if self.cache is not None and self._buffers.get("embeds") is not None and self._buffers["embeds"].shape[0] == batch:
            with torch.inference_mode():  # counters made under inference mode may be reset outside it
                for layer in self.cache.layers:
                    if layer.is_initialized:
                        layer.cumulative_length.zero_()
        else:
            self.cache = GraphCache(config=self.model.config, max_cache_len=self.context)
            self.cache.on_crop = self._cropped
            self.graphs.clear()
            self._buffers.clear()
            self._verify.clear()
        self.length = 0
        return self.cache

    def _cropped(self, removed: int) -> None:
        self.length -= removed

    def step(self, *args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get(self.key)
        if cache is None or cache is not self.cache:
            return self.original(*args, **kwargs)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        new = (ids if ids is not None else embeds).shape[1]
        self._check_room(new)
        decode = (not args and ids is not None and new == 1 and set(kwargs) <= _STEP_KEYS
                  and not kwargs.get("output_attentions") and not kwargs.get("output_hidden_states")
                  and (kwargs.get("attention_mask") is None or kwargs["attention_mask"].dim() == 2))
        if not decode:
            out = self.original(*args, **kwargs)
            self.length += new
            return out
        self._load_inputs(ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        logits = self.run(self._body)
        self.length += 1
        return CausalLMOutputWithPast(logits=logits, past_key_values=self.cache)

    def verify(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [tokens, vocab] of a speculative verify pass over `ids` ([1, tokens], one unpadded
        sequence) after the cached tokens, graphed like a decode step: each layer runs the tokens one
        at a time while its weights sit in their slot (`token_serial`), with the kernels, shapes and
        mask rows a graphed decode step gives each token, so the logits are plain graphed decoding's
        bit for bit and the weights cross the link once. One graph per token count (and ring phase);
        the output is the graph's buffer, valid until the next step."""
        tokens = ids.shape[1]
        self._check_room(tokens)
        embeds = self.model.get_input_embeddings()(ids)
        self._ensure_buffers(embeds)
        buffer = self._verify.get(tokens)
        if buffer is None:
            buffer = self._verify[tokens] = torch.empty_like(embeds)
        buffer.copy_(embeds)
        self._buffers["pad"].fill_(True)
        logits = self.run(functools.partial(self._verify_body, buffer), ("verify", tokens))
        self.length += tokens
        return logits[0]

    def _check_room(self, tokens: int) -> None:
        if self.length + tokens > self.context:
            raise OverspillError(f"{self.length + tokens} tokens exceed the static KV cache of {self.context}; "
                                 "load with a larger context")

    def _verify_body(self, embeds: torch.Tensor) -> torch.Tensor:
        """A verify pass over the fixed buffers: token j attends up to the cached tokens and itself."""
        from .token_serial import serial_tokens

        b = self._buffers
        tokens = embeds.shape[1]
        seen = self.cache.layers[0].cumulative_length + b["arange"][:tokens]  # each token's position
        mask = (b["pad"][:, None, :] & (b["arange"][None, None, :] <= seen[None, :, None]))[:, None]
        with serial_tokens(self.model, mask_rows=True):
            return decode_forward(self.original, self.key, self.cache, embeds, mask, seen[None])

    def _ensure_buffers(self, embeds: torch.Tensor) -> None:
        b = self._buffers
        if not b:
            batch, device = embeds.shape[0], embeds.device
            b["embeds"] = torch.empty_like(embeds[:, :1])
            b["positions"] = torch.empty((batch, 1), dtype=torch.long, device=device)
            b["pad"] = torch.ones((batch, self.context), dtype=torch.bool, device=device)
            b["arange"] = torch.arange(self.context, device=device)

    def _load_inputs(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None) -> None:
        embeds = self.model.get_input_embeddings()(ids)
        self._ensure_buffers(embeds)
        b = self._buffers
        b["embeds"].copy_(embeds)
        if mask is None:
            b["pad"].fill_(True)
        else:
            b["pad"][:, : mask.shape[1]].copy_(mask)
        if positions is None:  # what the model computes without them: tokens already cached
            b["positions"].copy_(self.cache.layers[0].cumulative_length.view(1, 1).expand_as(b["positions"]))
        else:
            b["positions"].copy_(positions[:, -1:])

    def _body(self) -> torch.Tensor:
        """One decode step over the fixed buffers: what a graph captures."""
        b = self._buffers
        seen = self.cache.layers[0].cumulative_length  # tokens before this one
        mask = (b["pad"] & (b["arange"] <= seen))[:, None, None, :]
        return decode_forward(self.original, self.key, self.cache, b["embeds"], mask, b["positions"])


def enable_graphs(model: torch.nn.Module, capture: bool | None = None) -> GraphedDecode | None:
    """Decode `model` (from `overspill.load`) through fixed-buffer steps, replayed as CUDA graphs.

    `capture` defaults to whether the model runs on CUDA. Returns None, after saying why, when the
    model's decode cannot be graphed (host-tier KV, sliding windows, an attention without 4D masks).
    """
    placement = placement_of(model)
    reason = graphs_supported(model, placement)
    if reason is not None:
        log.warning("CUDA graphs off: %s; decoding eagerly", reason)
        return None
    if capture is None:
        capture = placement.device.type == "cuda"
    route_decode_kernels(model)
    graphed = GraphedDecode(model, placement, placement.plan.workload.context, capture)
    graphed.install()
    placement.graphs = graphed
    return graphed
