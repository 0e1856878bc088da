"""Build a model on the meta device and place each tensor straight into the tier its plan names.

Resident tensors are allocated on the device and filled there; each streamed layer gets one flat
pinned host buffer filled tensor by tensor, then its module is wrapped in a `StreamedLayer`. Peak
host memory is the host tier plus one tensor in flight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import OverspillError, one_line
from ..planning.formats import LOSSY, NATIVE, expand_scratch_bytes
from ..planning.plan import MANAGED_MODES, PREFILL_CHUNK_TOKENS, Footprint, Plan, Tier, footprint_from_spec
from ..planning.spec import LayerSpec, ModelSpec, dtype_name, kv_bytes_per_token, kv_windows, trained_positions
from ..planning.units import format_bytes
from .checkpoint import CheckpointReader, RandomWeights, tied_parameters
from .executor import HostEmbedding, LayerRing, StreamedLayer
from .expert_loader import expert_cache, expert_params, expert_ring_bytes, stream_expert_layer
from .experts import route_resident
from .encoded_cache import EncodedCache, cache_folder
from .formats import Expander, LossyLayer, encode_lossless, itemsize_of, lossy_layout, staging_bytes_at_load
from .kv import cache_kwarg, kv_dims
from .layout import LayerLayout, host_bytes
from .prequantized import QuantizedReader
from .streams import CudaCopier, HostCopier, ManagedCopier, MappedCopier, new_stream

log = logging.getLogger(__name__)


@dataclass
class Placement:
    """What `load` did: the plan, the ring that streams, and where things live. Attached to the model."""

    plan: Plan
    device: torch.device
    ring: LayerRing | None
    layers_path: str
    host_bytes: int
    graphs: Any = None  # the `GraphedDecode` when decode replays CUDA graphs
    managed: Any = None  # the `ManagedMemory` holding managed streamed layers (freed with the placement)
    experts: Any = None  # the `experts.ExpertCache` of expert-streamed MoE layers (plan.moe_streaming "experts")

    def summary(self) -> str:
        return self.plan.summary()

    def new_cache(self, config, block_tokens: int = 256, blocks: Any = None):
        """A `TieredCache` that keeps the plan's host-KV layers in pinned memory (None: the default cache does);
        `blocks`, a serving engine's `KVBlockManager`, counts its host blocks with the engine's other KV."""
        if not self.plan.kv_host_layers:
            return None
        from .kv import TieredCache

        depth = max(self.plan.depth, 1)
        return TieredCache(config, self.plan.kv_host_layers, self.plan.workload.context, block_tokens, depth, blocks)

    def generate_cache(self, config, batch: int, tokens: int):
        """The cache `generate` uses for `batch` sequences of up to `tokens` tokens: the plan's
        `TieredCache` when it keeps KV on the host, else a dynamic cache whose KV is allocated once."""
        w = self.plan.workload
        if batch * tokens > w.batch * w.context and self.device.type == "cuda":
            log.warning("generate asks for %d x %d KV tokens, beyond the %d x %d the plan reserved: it may run "
                        "out of GPU memory; load with a larger context or batch", batch, tokens, w.batch, w.context)
        cache = self.new_cache(config)
        if cache is not None:
            return cache
        from .kv import presized_cache

        return presized_cache(config, tokens)


def placement_of(model: nn.Module) -> Placement:
    """The `Placement` of a model returned by `load`."""
    placement = getattr(model, "overspill", None)
    if placement is None:
        raise OverspillError("this model was not loaded by overspill.load")
    return placement


def provide_cache(model: nn.Module, make: Callable[[int, int], Any]) -> None:
    """Make `generate` (and so `pipeline`) use `make(batch_size, max_tokens)` as its cache when the
    caller passes none and asks for no cache implementation of transformers'.

    transformers has no per-model setting for a custom cache class, so this wraps the model
    instance's `_prepare_cache_for_generation` (the one place generate creates its cache).
    """
    key = cache_kwarg(model)
    original = model._prepare_cache_for_generation

    def prepare(generation_config, model_kwargs, *args, **kwargs):
        # (generation_mode, batch_size, max_cache_length): positional in transformers 5
        batch = args[1] if len(args) > 1 else kwargs["batch_size"]
        tokens = args[2] if len(args) > 2 else kwargs["max_cache_length"]
        if model_kwargs.get("inputs_embeds") is not None:  # transformers' chunked prefill splits token ids
            generation_config.prefill_chunk_size = None  # only: embeddings prefill whole (this call's config copy)
        if generation_config.use_cache is False:
            generation_config.prefill_chunk_size = None  # chunked prefill needs a cache (this call's config copy)
        elif model_kwargs.get(key) is None and getattr(generation_config, "cache_implementation", None) is None:
            model_kwargs[key] = make(batch, tokens)
        return original(generation_config, model_kwargs, *args, **kwargs)

    model._prepare_cache_for_generation = prepare


def use_planned_cache(model: nn.Module, placement: Placement) -> None:
    """Make `generate` build the plan's cache: prompt chunks of `PREFILL_CHUNK_TOKENS` (the activations
    the plan reserved) into KV allocated once per call (`Placement.generate_cache`)."""
    model.generation_config.prefill_chunk_size = PREFILL_CHUNK_TOKENS
    provide_cache(model, lambda batch, tokens: placement.generate_cache(model.config, batch, tokens))


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model with parameters on the meta device and real (small) buffers such as rotary tables."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # transformers rejects the config: no causal LM for it, or a size it cannot use
        raise OverspillError(
            f"transformers cannot build a causal LM for model_type {getattr(config, 'model_type', '?')!r} "
            f"from this config.json: {one_line(exc)}"
        ) from None
    return model.eval()


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The `ModuleList` of decoder blocks: the one as long as `num_hidden_layers`."""
    text_config = model.config.get_text_config()
    n = getattr(text_config, "num_hidden_layers", None)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n)
    ]
    if not found:
        raise OverspillError(
            f"unsupported architecture {type(model).__name__}: no ModuleList of {n} decoder layers found; "
            f"overspill supports decoder-only models whose blocks sit in one ModuleList (Llama, Mistral, Qwen, ...)"
        )
    return max(found, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measured_spec(model: nn.Module, layers: nn.ModuleList, dtype: torch.dtype) -> ModelSpec:
    """The `ModelSpec` of a built (meta) model: bytes measured from its tensors, shapes from its config.

    `load` plans from this, through the same `footprint_from_spec` as `overspill plan`, so an
    architecture without a config formula (gpt_neox, falcon, ...) is sized exactly, and for the
    supported ones the measurement and `spec_from_config` agree (tests/test_one_footprint.py).

    Args:
        model: the model from `build_skeleton`, parameters on the meta device or placed.
        layers: its decoder layers (`decoder_layers`).
        dtype: the compute dtype (the dtype of its weights and KV).
    """
    cfg = model.config.get_text_config()
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and head is not None
    itemsize = dtype.itemsize
    _, kv_heads, head_dim = kv_dims(model.config)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0
    active = getattr(cfg, "num_experts_per_tok", None) or 0
    cfg_dict = cfg.to_dict()
    windows = kv_windows(cfg_dict, len(layers))
    kv_per_token = kv_bytes_per_token(cfg_dict, itemsize, kv_heads, head_dim)
    specs = tuple(
        _layer_spec(i, layer, cfg.hidden_size, experts, active, kv_per_token, windows[i])
        for i, layer in enumerate(layers)
    )
    placed = {id(p) for p in layers.parameters()} | {id(p) for p in embed.parameters()}
    head_params = [] if head is None else list(head.parameters())
    placed |= {id(p) for p in head_params}
    other = [p for p in model.parameters() if id(p) not in placed]
    return ModelSpec(
        model_type=str(getattr(cfg, "model_type", "") or "unknown"),
        dtype=dtype_name(dtype),
        dtype_bytes=itemsize,
        hidden_size=cfg.hidden_size,
        vocab_size=int(getattr(cfg, "vocab_size", 0) or 0),
        num_layers=len(layers),
        num_attention_heads=cfg.num_attention_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        layers=specs,
        embed_bytes=_nbytes(embed.parameters()),
        head_bytes=0 if tied else _nbytes(head_params),
        final_norm_bytes=_nbytes(other),
        tied_embeddings=tied,
        buffer_bytes=_nbytes(model.buffers()),
        plain_embedding=type(embed) is nn.Embedding,
        max_positions=trained_positions(cfg_dict),
    )


def _layer_part(name: str, param: nn.Parameter, hidden: int, experts: int) -> str:
    """Which `LayerSpec` field a decoder layer's parameter counts in, from its name and shape."""
    parts = name.split(".")
    if "experts" in parts:
        return "expert"
    if param.dim() == 1 and len(parts) > 1 and ("norm" in parts[-2] or parts[-2].startswith("ln")):
        return "norm"
    if any("attn" in part or "attention" in part for part in parts[:-1]):
        return "attention"
    if experts and param.dim() == 2 and param.shape[1] == hidden and param.shape[0] in (experts, 1):
        return "router"  # the router's [experts, hidden] (and a shared expert's [1, hidden] gate)
    return "mlp"


def _layer_spec(index: int, layer: nn.Module, hidden: int, experts: int, active: int, kv_per_token: int,
                window: int | None) -> LayerSpec:
    sizes = dict.fromkeys(("attention", "mlp", "router", "expert", "norm"), 0)
    for name, param in layer.named_parameters():
        sizes[_layer_part(name, param, hidden, experts)] += param.numel() * param.element_size()
    routed = sizes["expert"] > 0
    return LayerSpec(
        index=index,
        attention_bytes=sizes["attention"],
        mlp_bytes=sizes["mlp"],
        router_bytes=sizes["router"],
        expert_bytes=sizes["expert"] // experts if routed else 0,
        num_experts=experts if routed else 0,
        active_experts=active if routed else 0,
        norm_bytes=sizes["norm"],
        kv_bytes_per_token=kv_per_token,
        sliding_window=window,
        padding_bytes=_layout(layer).nbytes - _nbytes(layer.parameters()),  # as packed in ring slots
    )


def footprint(model: nn.Module, layers: nn.ModuleList, dtype: torch.dtype) -> Footprint:
    """The `Footprint` `load` plans from: `footprint_from_spec` of the measured spec."""
    return footprint_from_spec(measured_spec(model, layers, dtype))


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _fill_resident(module: nn.Module, prefix: str, source, device: torch.device) -> None:
    for name, param in list(module.named_parameters(recurse=True)):
        if param.device.type != "meta":
            continue
        value = torch.empty(param.shape, dtype=param.dtype, device=device)
        source.fill(prefix + name, value)
        _set_param(module, name, value)


def _layout(layer: nn.Module) -> LayerLayout:
    return LayerLayout.of([(name, tuple(p.shape), p.dtype) for name, p in layer.named_parameters()])


def _stream_encoded(layer: nn.Module, prefix: str, index: int, source, ring: LayerRing, pinned: bool,
                    fmt: str, cache: EncodedCache | None) -> tuple[StreamedLayer, int]:
    """Fill a streamed layer in stream format `fmt`: from the encoded cache when it holds the layer,
    else read it into ring slot 0 (on the device), encode it into the first staging buffer, and keep
    only the encoded bytes in an exact-size host buffer (`formats`), written to the cache too."""
    layout = _layout(layer)
    hit = cache.read(index, layout, lambda n: host_bytes(n, pinned)) if cache is not None else None
    if hit is not None:
        encoded, host = hit
    else:
        encoded, host = _encode(layout, prefix, source, ring, pinned, fmt)
        if cache is not None:
            cache.write(index, layout, encoded, host)
    for entry, view in zip(layout.entries, ring.views(layout, 0)):
        _set_param(layer, entry.name, view)
    return StreamedLayer(layer, index, host, layout, ring, encoded), encoded.nbytes


def _stream_passed(layer: nn.Module, prefix: str, index: int, source: QuantizedReader, ring: LayerRing, pinned: bool,
                   encoded: LossyLayer) -> tuple[StreamedLayer, int]:
    """Fill a streamed layer of a pre-quantized checkpoint in its own stream format: the quantized weights'
    codes repacked straight into the host buffer (`QuantizedReader.fill_parts`), the rest raw; nothing
    passes through a slot or is encoded."""
    layout = _layout(layer)
    host = host_bytes(encoded.nbytes, pinned)
    source.fill_layer(prefix, encoded, host)
    for entry, view in zip(layout.entries, ring.views(layout, 0)):
        _set_param(layer, entry.name, view)
    return StreamedLayer(layer, index, host, layout, ring, encoded), encoded.nbytes


def passes_through(source, fmt: str) -> bool:
    """Whether `source` is a pre-quantized checkpoint whose codes stream as `fmt` (its own format)."""
    return isinstance(source, QuantizedReader) and source.scheme.stream_format == fmt


def _lossy(layer: nn.Module, prefix: str, fmt: str, source) -> LossyLayer:
    """A streamed layer's encoded layout: a pre-quantized checkpoint's parts where it passes through, else `fmt`'s."""
    return LossyLayer.of(fmt, _layout(layer), source.parts_of(prefix) if passes_through(source, fmt) else None)


def _encode(layout: LayerLayout, prefix: str, source, ring: LayerRing, pinned: bool, fmt: str):
    """(encoded layout, host buffer of its bytes) of one layer read from `source` and encoded on the ring's device."""
    raw, staging = ring.slot_buffers[0][: layout.nbytes], ring.expander.staging[0]
    for entry, view in zip(layout.entries, layout.views(raw)):
        source.fill(prefix + entry.name, view)
    if fmt == "lossless":
        encoded, coded = encode_lossless(layout, raw, staging, ring.expander)
        host = host_bytes(encoded.nbytes, pinned)
        host[: encoded.low.nbytes].copy_(staging[: encoded.low.nbytes])
        host[encoded.high.offset :].copy_(coded)
    else:
        encoded = lossy_layout(fmt, layout)
        encoded.encode(layout, raw, staging)
        host = host_bytes(encoded.nbytes, pinned)
        host.copy_(staging[: encoded.nbytes])
    return encoded, host


def _encoded_cache(source, plan: Plan, layers: nn.ModuleList, device: torch.device) -> EncodedCache | None:
    """The encoded-layer cache of a checkpoint (None for random weights or plain bf16 streaming)."""
    if plan.stream_format == NATIVE or not plan.streamed_layers or not isinstance(source, CheckpointReader):
        return None
    dtype = next(layers[plan.streamed_layers[0]].parameters()).dtype
    codec = ("nvcomp-ans" if device.type == "cuda" else "zlib") if plan.stream_format == "lossless" else "torch"
    return EncodedCache(cache_folder(source.directory, plan.stream_format, dtype, codec), plan.stream_format,
                        plan.streamed_bytes_per_step)


def encoded_layer_bytes(layers: nn.ModuleList, fmt: str, source=None, layers_path: str = "") -> tuple[int, ...] | None:
    """Exact bytes each layer sends per trip in a lossy format, from its (meta) tensors' shapes (and, for a
    pre-quantized checkpoint's own format, which of them `source` stores quantized, the decoder layers at
    `layers_path`); None for bf16 and lossless (whose size is known once coded)."""
    if fmt not in LOSSY:
        return None
    return tuple(_lossy(layer, f"{layers_path}.{i}.", fmt, source).nbytes for i, layer in enumerate(layers))


def _expander(model_layers: nn.ModuleList, plan: Plan, device: torch.device,
              passed: dict[int, LossyLayer]) -> Expander:
    """Staging buffers and scratch to encode `plan`'s streamed layers at load and expand them later,
    sized from the layers themselves (a caller's plan may be bf16's; lossless staging grows once coded;
    `passed`: the layouts of layers whose pre-quantized codes pass through)."""
    staging = scratch = 0
    for i in plan.streamed_layers:
        layout = _layout(model_layers[i])
        staging = max(staging, passed[i].nbytes if i in passed else staging_bytes_at_load(plan.stream_format, layout))
        scratch = max(scratch, expand_scratch_bytes(plan.stream_format, layout.nbytes, itemsize_of(layout)))
    return Expander(device, staging, scratch)


def _stream_layer(
    layer: nn.Module, prefix: str, index: int, source, ring: LayerRing, pinned: bool, memory=None
) -> tuple[StreamedLayer, int]:
    """Fill a streamed layer's flat buffer: pinned host memory copied into ring slots, or (with a
    `ManagedMemory`) a managed buffer that the layer computes in, migrated by prefetches."""
    layout = _layout(layer)
    if memory is not None:
        host = memory.tensor(layout.nbytes)
        memory.advise_host_home(host)
    else:
        host = host_bytes(layout.nbytes, pinned)
    for entry, view in zip(layout.entries, layout.views(host)):
        source.fill(prefix + entry.name, view)
    bound = layout.views(host) if memory is not None else ring.views(layout, 0)
    for entry, view in zip(layout.entries, bound):
        _set_param(layer, entry.name, view)
    return StreamedLayer(layer, index, host, layout, ring), layout.nbytes


def materialize(
    model: nn.Module, plan: Plan, device: torch.device, source: CheckpointReader | RandomWeights, progress: bool = True
) -> Placement:
    """Fill every tensor of the meta `model` into the tier `plan` gives it; returns the `Placement`."""
    layers_path, layers = decoder_layers(model)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    embed_name = names[id(embed)]
    on_cuda = device.type == "cuda"
    if isinstance(source, CheckpointReader):
        source.bind(model)  # before any tensor is placed: it reads the meta model's names and ties

    ring = memory = None
    passed = {}  # streamed layer -> its layout, where a pre-quantized checkpoint's codes pass through
    if plan.streamed_layers and passes_through(source, plan.stream_format):
        passed = {i: _lossy(layers[i], f"{layers_path}.{i}.", plan.stream_format, source) for i in plan.streamed_layers}
    if plan.streamed_layers and plan.streaming in MANAGED_MODES:
        if not on_cuda:
            raise OverspillError("managed weights need a CUDA device; stream with streaming='copy' on the CPU")
        from .managed import ManagedMemory

        memory = ManagedMemory(device)
        copier = ManagedCopier(device, plan.slots, memory) if plan.streaming == "managed" else MappedCopier()
        ring = LayerRing([], copier, in_place_slots=plan.slots)
    elif plan.streamed_layers:
        slot_bytes = plan.slot_bytes
        if plan.moe_streaming == "experts":  # the ring layouts' own alignment may differ from the planned bytes
            slot_bytes = max(slot_bytes, max(expert_ring_bytes(layers[i]) for i in plan.streamed_layers))
        slot_buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(plan.slots)]
        copier = CudaCopier(device, plan.slots) if on_cuda else HostCopier()
        ring = LayerRing(slot_buffers, copier)
        if plan.stream_format != NATIVE:
            ring.expander = _expander(layers, plan, device, passed)
            if on_cuda:  # expansions run where the expander's codec is bound
                copier.expand_stream = ring.expander.stream
    cache = None if passed else _encoded_cache(source, plan, layers, device)  # repacking is cheap: not cached
    experts = expert_cache(plan, layers, device)

    bar = tqdm(total=len(layers) + 2, desc="placing weights", unit="part", disable=not progress)
    if plan.embed_tier is Tier.HOST:
        weight = torch.empty(embed.weight.shape, dtype=embed.weight.dtype)
        source.fill(f"{embed_name}.weight", weight)
        host = HostEmbedding(weight, device, getattr(embed, "padding_idx", None))
        model.set_input_embeddings(host)
    else:
        _fill_resident(embed, f"{embed_name}.", source, device)
    bar.update(1)

    host_total = 0
    for i, layer in enumerate(layers):
        prefix = f"{layers_path}.{i}."
        if i in passed:
            wrapped, nbytes = _stream_passed(layer, prefix, i, source, ring, on_cuda, passed[i])
            layers[i] = wrapped
            host_total += nbytes
        elif plan.layer_tiers[i] is Tier.PINNED and ring.expander is not None:
            wrapped, nbytes = _stream_encoded(layer, prefix, i, source, ring, on_cuda, plan.stream_format, cache)
            layers[i] = wrapped
            host_total += nbytes
        elif plan.layer_tiers[i] is Tier.PINNED and experts is not None and expert_params(layer):
            wrapped, nbytes = stream_expert_layer(layer, prefix, i, source, ring, on_cuda, experts, plan.expert_codes)
            layers[i] = wrapped
            host_total += nbytes
        elif plan.layer_tiers[i] is Tier.PINNED:
            wrapped, nbytes = _stream_layer(layer, prefix, i, source, ring, pinned=on_cuda, memory=memory)
            layers[i] = wrapped
            host_total += nbytes
        else:
            _fill_resident(layer, prefix, source, device)
            if experts is not None:  # its experts computed as the streamed layers' are
                route_resident(layer, i)
        bar.update(1)

    if head is not None and plan.embed_tier is not Tier.HOST and _is_tied(model):
        head.weight = model.get_input_embeddings().weight
    _fill_resident_leftovers(model, source, device, skip=layers_path)
    _buffers_to(model, device)
    bar.update(1)
    bar.close()
    model.requires_grad_(False)
    if memory is not None:  # filling touched pages from the GPU too: every layer starts at home
        home = new_stream(device)
        home.wait_stream(torch.cuda.current_stream(device))  # after the fills (random weights draw on the GPU)
        for layer in ring.layers:
            memory.prefetch(layer.host, host=True, stream=home)
        home.synchronize()
    if ring is not None and ring.expander is not None:
        plan = _measured_format(plan, ring, cache)
    return Placement(plan=plan, device=device, ring=ring, layers_path=layers_path, host_bytes=host_total,
                     managed=memory, experts=experts)


def _measured_format(plan: Plan, ring: LayerRing, cache: EncodedCache | None) -> Plan:
    """The plan with the encoded bytes the load measured: bytes over the link per step, and the
    staging buffers (a lossless layer's size is known only once coded: staging grows to the largest)."""
    ring.expander.grow_staging(max(layer.host.numel() for layer in ring.layers))
    sent = sum(layer.host.numel() for layer in ring.layers)
    raw = sum(layer.layout.nbytes for layer in ring.layers)
    notes = plan.notes
    if plan.stream_format == "lossless":
        notes += (f"lossless: streamed layers measured at {sent / raw:.3f} of their bytes "
                  f"({ring.expander.codec().name})",)
    if cache is not None and cache.hits:
        notes += (f"{cache.hits} {plan.stream_format} layers read from the encoded cache {cache.folder}",)
    measured = replace(plan, streamed_bytes_per_step=sent, expand_bytes=ring.expander.nbytes, notes=notes)
    if plan.budget_bytes and measured.device_bytes > plan.budget_bytes:  # layers coded worse than planned
        over = measured.device_bytes - plan.budget_bytes
        measured = replace(measured, notes=measured.notes + (
            f"the coded layers' staging takes {format_bytes(over)} more than the budget "
            f"{format_bytes(plan.budget_bytes)}: use --stream-format bf16 to stay inside it",))
    return measured


def _is_tied(model: nn.Module) -> bool:
    """Whether transformers ties the output head to another parameter (the input embedding)."""
    head = model.get_output_embeddings()
    if head is None:
        return False
    name = next(n for n, m in model.named_modules() if m is head)
    return f"{name}.weight" in tied_parameters(model)


def _fill_resident_leftovers(model: nn.Module, source, device: torch.device, skip: str) -> None:
    """Everything still on meta outside the decoder layers: final norm, lm_head, extra heads."""
    for name, param in list(model.named_parameters()):
        if param.device.type == "meta" and not name.startswith(f"{skip}."):
            value = torch.empty(param.shape, dtype=param.dtype, device=device)
            source.fill(name, value)
            _set_param(model, name, value)


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    for module in model.modules():
        if isinstance(module, HostEmbedding):
            continue
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)
