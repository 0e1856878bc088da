"""The `self` draft source: the target's own decoder layers in int4, resident, drafting for it.

No second model: some (or all) of the target's layers are quantized to 4-bit groupwise codes with
torch's int4 weight-only matmul (`aten._weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu` on
the CPU; the same codes, scales and zeros, packed per device) and run with the target's own
embedding, rotary table, final norm and head, shared, not copied. The draft proposes; the target
verifies every token, so the draft's rounding never reaches the output.

Weights are quantized layer by layer from where the loader put them (a streamed layer's flat host
buffer, a resident layer's device tensors), a bounded slice of rows at a time, so building the draft
needs no more GPU memory than the draft itself plus one slice. Which layers to draft with, and what
they cost in resident bf16 layers, is `overspill.planning.self_draft`'s decision.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Iterable

import torch
from torch import nn

from ..errors import OverspillError
from ..planning.self_draft import INT4_GROUP
from .drafts import Draft, Scores, draft_token, drop_last
from .executor import StreamedLayer
from .kv import cache_kwarg

GROUP_SIZES = (256, 128, 64, 32)  # the group sizes torch's int4 kernels take
QUANT_ROWS = 2048  # output rows quantized at once: bounds the float32 temporaries (2048 x 8192: 64 MiB each)


def _group_for(in_features: int, group: int) -> int | None:
    """The largest kernel group size up to `group` that divides `in_features` (None: not quantizable)."""
    return next((g for g in GROUP_SIZES if g <= group and in_features % g == 0), None)


def _inner_k_tiles(in_features: int) -> int:
    """The CUDA kernel's K tiling: `in_features` must be a multiple of 16 x the tiles (a group size is)."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def quantizable(weight_shape: tuple[int, ...], group: int = INT4_GROUP, device_type: str = "cuda") -> bool:
    """Whether a [out, in] weight fits the int4 kernels: `in` a multiple of 32, `out` of 8 on CUDA and of
    16 on the CPU (its packer refuses 24 rows, e.g. a k_proj of one 24-wide KV head group)."""
    out_features, in_features = weight_shape
    rows = 8 if device_type == "cuda" else 16
    return out_features % rows == 0 and _group_for(in_features, group) is not None


SCALE_DTYPE = torch.bfloat16
"""Scales, zeros and the matmul's activations: the CUDA kernel takes only bfloat16, and the CPU kernel
runs bfloat16 ~20x faster than float32 (1536 x 576 at batch 1 on this 2-core host: 32 vs 707 us,
float16 1150 us), so both devices compute the draft's matmuls in bfloat16 whatever the model's dtype."""


def quantize_int4(weight: torch.Tensor, group: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Groupwise asymmetric 4-bit codes of `weight` ([out, in], any device), packed for `device`.

    Each group of `group` inputs of an output row gets a scale and a zero with
    `w ~ (q - 8) * scale + zero`, q in 0..15 (the convention of torch's int4 kernels). Scales are
    rounded to their stored dtype before the codes are chosen, so the codes fit the stored scales.

    Returns:
        (packed codes for the device's kernel, scales and zeros [in / group, out, 2]).
    """
    out_features, in_features = weight.shape
    codes, pairs = [], []
    for start in range(0, out_features, QUANT_ROWS):
        w = weight[start : start + QUANT_ROWS].to(device=device, dtype=torch.float32, copy=True)
        w = w.reshape(w.shape[0], in_features // group, group)
        low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = ((high - low).clamp(min=1e-6) / 15).to(SCALE_DTYPE).float()
        zero = (low + 8 * scale).to(SCALE_DTYPE).float()
        q = w.sub_(zero - 8 * scale).div_(scale).round_().clamp_(0, 15).to(torch.int32).reshape(w.shape[0], -1)
        # CUDA packs two codes a byte (the even column in the high nibble); the CPU packer takes int32
        codes.append((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8) if device.type == "cuda" else q.to(torch.uint8))
        pairs.append(torch.cat([scale, zero], dim=-1).to(SCALE_DTYPE))  # [rows, in / group, 2]
        del w, low, high, scale, zero
    q = torch.cat(codes)
    tiles = _inner_k_tiles(in_features)
    if device.type == "cuda":
        packed = torch.ops.aten._convert_weight_to_int4pack(q, tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), tiles)
    return packed, torch.cat(pairs).transpose(0, 1).contiguous()


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                out_features: int) -> torch.Tensor:
    """`x @ W.T` for a weight quantized by `quantize_int4`, in `x`'s dtype; `x` is [..., in]."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1]).to(scales_zeros.dtype).contiguous()
    if x.device.type == "cuda":
        y = torch.ops.aten._weight_int4pack_mm(flat, packed, group, scales_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, group, scales_zeros)
    return y.to(x.dtype).reshape(*lead, out_features)


class Int4Linear(nn.Module):
    """A linear layer whose weight is int4 groupwise (buffers, not parameters: nothing to train)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: int, device: torch.device,
                 compute: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group = _group_for(self.in_features, group)
        packed, scales_zeros = quantize_int4(weight, self.group, device)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=compute))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int4_matmul(x, self.packed, self.scales_zeros, self.group, self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Experts(nn.Module):
    """A routed-experts block (transformers 5's fused `gate_up_proj`/`up_proj` and `down_proj`
    [experts, out, in] tensors, `[experts, in, out]` where `is_transposed`) with every expert int4.
    Runs the experts each token was routed to, as transformers' eager experts do. Llama 4's
    `Llama4TextExperts` ([experts, in, out]) takes no routing: its input is every expert's copy of the tokens
    scaled by their router scores, zero where a token was not routed to it, and such rows stay zero."""

    def __init__(self, tensors: dict[str, torch.Tensor], template: nn.Module, group: int, device: torch.device,
                 compute: torch.dtype):
        super().__init__()
        self.has_gate = "gate_up_proj" in tensors
        scaled_inputs = type(template).__name__ == "Llama4TextExperts"  # its weights are [experts, in, out]
        transposed = bool(getattr(template, "is_transposed", False)) or scaled_inputs
        up_name = "gate_up_proj" if self.has_gate else "up_proj"

        def experts(name: str) -> nn.ModuleList:
            weights = tensors[name]
            biases = tensors.get(f"{name}_bias")
            return nn.ModuleList(
                Int4Linear(weights[e].t() if transposed else weights[e], None if biases is None else biases[e],
                           group, device, compute)
                for e in range(weights.shape[0])
            )

        self.up = experts(up_name)
        self.down = experts("down_proj")
        self.act_fn = template.act_fn
        gate = getattr(template, "_apply_gate", None)  # a variant's gating (limits, offsets), else act(gate) * up
        self._gate = gate if callable(gate) else None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if top_k_index is None:  # Llama 4: [experts * tokens, hidden], already scaled by the router
            return self._scaled(hidden_states)
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if not 0 <= expert < len(self.up):  # an expert-parallel sentinel
                continue
            token, slot = (top_k_index == expert).nonzero(as_tuple=True)
            h = self.up[expert](hidden_states[token])
            if not self.has_gate:
                h = self.act_fn(h)
            elif self._gate is not None:
                h = self._gate(h)
            else:
                gate, up = h.chunk(2, dim=-1)
                h = self.act_fn(gate) * up
            h = self.down[expert](h) * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def _scaled(self, hidden_states: torch.Tensor) -> torch.Tensor:
        per_expert = hidden_states.view(len(self.up), -1, hidden_states.shape[-1])
        out = torch.zeros_like(per_expert)
        for expert, rows in enumerate(per_expert):
            token = rows.any(dim=-1).nonzero().squeeze(1)  # routed tokens; the rest are zero in and out
            if token.numel():
                gate, up = self.up[expert](rows[token]).chunk(2, dim=-1)
                out[expert, token] = self.down[expert](up * self.act_fn(gate)).to(out.dtype)
        return out.view(-1, hidden_states.shape[-1])


_EXPERT_TENSORS = ("gate_up_proj", "up_proj", "down_proj")


def _layer_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A target layer's weights where they live between uses: a streamed layer's views of its flat
    host buffer (its parameters point at a ring slot only while it computes), else its parameters."""
    if isinstance(layer, StreamedLayer):
        return {e.name: view for e, view in zip(layer.layout.entries, layer.layout.views(layer.host))}
    return dict(layer.named_parameters())


def _quantize_layer(block: nn.Module, tensors: dict[str, torch.Tensor], group: int, device: torch.device,
                    compute: torch.dtype) -> None:
    """Fill the meta `block` (a copy of the target layer's structure) from `tensors`: linear weights
    and routed experts in int4, everything else (norms, routers, odd shapes) in the compute dtype."""
    for name, module in list(block.named_modules()):
        prefix = f"{name}." if name else ""
        owner_name, _, leaf = name.rpartition(".")
        if isinstance(module, nn.Linear) and quantizable(tuple(module.weight.shape), group, device.type):
            bias = tensors.get(prefix + "bias") if module.bias is not None else None
            new: nn.Module = Int4Linear(tensors[prefix + "weight"], bias, group, device, compute)
        elif any(isinstance(module._parameters.get(t), torch.Tensor) and module._parameters[t].dim() == 3
                 for t in _EXPERT_TENSORS):
            if getattr(module, "has_post_expert_norm", False):
                raise OverspillError(f"the self draft cannot quantize {type(module).__name__} (post-expert norm)")
            local = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            new = Int4Experts(local, module, group, device, compute)
        else:
            continue
        if name:
            setattr(block.get_submodule(owner_name) if owner_name else block, leaf, new)
    for name, param in list(block.named_parameters()):
        if param.device.type == "meta":
            owner_name, _, leaf = name.rpartition(".")
            owner = block.get_submodule(owner_name) if owner_name else block
            value = tensors[name].to(device=device, dtype=compute if tensors[name].is_floating_point() else None)
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    for module in block.modules():  # buffers a layer builds itself (not in the checkpoint)
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)


def _set_layer_index(block: nn.Module, index: int) -> None:
    """Modules read `layer_idx` to find their cache layer: the draft's j-th layer uses the draft cache's j-th."""
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


def _share_outside_layers(draft: nn.Module, target: nn.Module, layers_path: str) -> None:
    """Replace every draft module outside the decoder layers (embedding, rotary table, final norm,
    head) with the target's own module at the same path: shared, not copied."""

    def share(mine: nn.Module, theirs: nn.Module, path: str) -> None:
        for name in list(mine._modules):
            child = f"{path}{name}"
            if child == layers_path:
                continue
            if layers_path.startswith(f"{child}."):
                share(mine._modules[name], theirs._modules[name], f"{child}.")
            else:
                mine._modules[name] = theirs._modules[name]
        for kind in ("_parameters", "_buffers"):  # tensors held directly by an ancestor of the layers
            for name in list(getattr(mine, kind)):
                getattr(mine, kind)[name] = getattr(theirs, kind)[name]

    share(draft, target, "")


def build_self_draft(target: nn.Module, layers: Iterable[int] | None = None, group: int = INT4_GROUP) -> nn.Module:
    """A causal LM of the target's class running target layers `layers` (default: all) in int4.

    Args:
        target: a model from `overspill.load` (streamed layers quantized from their host copies) or
            any transformers causal LM whose decoder layers sit in one ModuleList.
        layers: indices of the target's decoder layers to draft with, in order.
        group: weights per scale and zero (smaller where a layer's input width needs it).
    """
    from .loader import build_skeleton, decoder_layers

    layers_path, target_layers = decoder_layers(target)
    picked = list(range(len(target_layers))) if layers is None else list(layers)
    if not picked or any(not 0 <= i < len(target_layers) for i in picked):
        raise OverspillError(f"self draft layers {picked} are not layers of a {len(target_layers)}-layer model")
    placement = getattr(target, "overspill", None)
    device = placement.device if placement is not None else next(p.device for p in target.parameters())
    compute = target.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        draft = build_skeleton(copy.deepcopy(target.config), compute)  # every layer's structure, on meta
    _, skeleton_layers = decoder_layers(draft)
    kept = nn.ModuleList(skeleton_layers[i] for i in picked)
    for j, (i, block) in enumerate(zip(picked, kept)):
        _quantize_layer(block, _layer_tensors(target_layers[i]), group, device, compute)
        _set_layer_index(block, j)
    owner_name, _, leaf = layers_path.rpartition(".")
    setattr(draft.get_submodule(owner_name) if owner_name else draft, leaf, kept)
    text = draft.config.get_text_config()
    types = getattr(text, "layer_types", None)
    text.num_hidden_layers = len(picked)
    if types is not None:
        text.layer_types = [types[i] for i in picked]
    _share_outside_layers(draft, target, layers_path)
    left = [n for n, p in draft.named_parameters() if p.device.type == "meta"]
    if left:
        raise OverspillError(f"the self draft could not place {left[:3]} (an architecture it does not know)")
    draft.self_draft_layers = tuple(picked)
    return draft.eval()


def draft_device_bytes(draft: nn.Module) -> int:
    """Bytes the draft's own layers hold (the shared embedding, norm and head are the target's)."""
    from .loader import decoder_layers

    _, blocks = decoder_layers(draft)
    tensors = {id(t): t for t in [*blocks.parameters(), *blocks.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class SelfDrafter:
    """Drafts with `build_self_draft`'s int4 copy of the target. Keeps its own cache, cropped back to
    the longest prefix it shares with the sequence it is shown, so accepted tokens are never fed
    twice and rejected ones leave nothing behind."""

    def __init__(self, draft: nn.Module, vocab_size: int):
        self.model = draft
        self.vocab_size = vocab_size
        self.device = next(p.device for p in draft.parameters())
        self._kwarg = cache_kwarg(draft)
        self._cache = None
        self._ids: torch.Tensor | None = None  # tokens whose KV the cache holds
        self.seconds = 0.0
        self.fed = 0  # tokens run through the draft (a cache in sync feeds ~1 per drafted token)

    def reset(self) -> None:
        self._cache, self._ids = None, None

    def _sync(self, ids: torch.Tensor) -> torch.Tensor:
        """Crop the cache to the prefix it shares with `ids`; returns the tokens still to feed (>= 1).
        A cache without sliding-window layers (no config): any crop is exact."""
        from transformers import DynamicCache

        if self._cache is None or self._ids is None:
            self._cache, self._ids = DynamicCache(), ids[:, :0]
        n = min(self._ids.shape[1], ids.shape[1] - 1)
        same = int((self._ids[0, :n] == ids[0, :n].to(self._ids.device)).int().cumprod(0).sum()) if n else 0
        drop_last(self._cache, self._ids.shape[1] - same)
        self._ids = self._ids[:, :same]
        return ids[:, same:].to(self.device)

    @torch.no_grad()
    def propose(self, ids: torch.Tensor, k: int, scores: Scores | None = None, sample: bool = False) -> Draft:
        start = time.perf_counter()
        feed = self._sync(ids)
        seq = ids.to(self.device)
        self._ids = self._ids.to(self.device)
        tokens, probs = [], []
        for _ in range(k):
            out = self.model(input_ids=feed, **{self._kwarg: self._cache}, use_cache=True, logits_to_keep=1)
            self.fed += feed.shape[1]
            self._ids = torch.cat([self._ids, feed], dim=1)
            logits = out.logits[:, -1, : self.vocab_size].float()
            token = draft_token(scores(seq, logits) if scores is not None else logits, sample, probs)
            tokens.append(token[0])
            seq = torch.cat([seq, token], dim=1)
            feed = token
        self.seconds += time.perf_counter() - start
        if not tokens:
            return Draft(ids[0, :0].clone())
        return Draft(torch.cat(tokens).to(ids.device), torch.stack(probs).to(ids.device) if sample else None)


def make_self_drafter(model: nn.Module, layers: Iterable[int] | None = None, group: int | None = None) -> SelfDrafter:
    """The `self` drafter of `model`: the layers and group its plan chose (`model.self_draft`, set by
    `load(..., speculate="self")`), else every layer in groups of `INT4_GROUP`; arguments override."""
    chosen = getattr(model, "self_draft", None)
    if layers is None and chosen is not None:
        layers = chosen.layers
    if group is None:
        group = chosen.group_size if chosen is not None else INT4_GROUP
    draft = build_self_draft(model, layers, group)
    return SelfDrafter(draft, model.config.get_text_config().vocab_size)
