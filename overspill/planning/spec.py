"""Byte-level shape of a causal LM, computed from its ``config.json`` alone.

Planning (what fits on the GPU, what streams, how big the KV cache gets) must
happen before any weights or heavy libraries are loaded, so this module is
pure Python: it must never import torch or transformers, even indirectly.

Byte counts reproduce the parameters transformers 5.x instantiates for the
supported architectures exactly; other ``model_type`` values fall back to the
Llama layout and are flagged ``approximate``. `load` measures the same record
from the built model (``overspill.runtime.loader.measured_spec``), and both
become a `Footprint` through ``overspill.planning.plan.footprint_from_spec``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_DTYPE",
    "DTYPE_ALIASES",
    "DTYPE_BYTES",
    "SUPPORTED_MODEL_TYPES",
    "LayerSpec",
    "ModelSpec",
    "dtype_name",
    "kv_bytes_per_token",
    "kv_windows",
    "spec_from_config",
]

# The one table of dtype names: planning sizes by it, and `overspill.api` maps the same names to
# torch dtypes (the ones it can compute in), so a name means the same thing to `plan` and `load`.
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
}
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp8": "float8_e4m3fn",
}
DEFAULT_DTYPE = "bfloat16"  # what `load` computes in on a GPU ("auto") and what `plan` sizes by default

_DENSE = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"})
_MOE = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "llama4_text", "deepseek_v3"})
SUPPORTED_MODEL_TYPES: frozenset[str] = _DENSE | _MOE

_BASE_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_ARCH_REQUIRED: dict[str, tuple[str, ...]] = {
    "mixtral": ("intermediate_size", "num_local_experts", "num_experts_per_tok"),
    "qwen2_moe": (
        "moe_intermediate_size",
        "num_experts",
        "num_experts_per_tok",
        "shared_expert_intermediate_size",
    ),
    "qwen3_moe": ("moe_intermediate_size", "num_experts", "num_experts_per_tok"),
    "llama4_text": ("intermediate_size", "num_local_experts", "num_experts_per_tok"),
    "deepseek_v3": ("intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
}
# Parameters transformers keeps in float32 whatever the model's dtype (`_keep_in_fp32_modules_strict`):
# DeepSeek-V3's router weight. Its `e_score_correction_bias` is a float32 buffer (`_buffer_bytes`).
_FP32_ROUTER = frozenset({"deepseek_v3"})
_TIED_BY_DEFAULT = frozenset({"gemma2"})
_SCALED_EMBEDDING = frozenset({"gemma2"})  # the embedding module scales its rows: not a plain table


@dataclass(frozen=True)
class LayerSpec:
    """Bytes stored and touched by one decoder layer."""

    index: int
    attention_bytes: int
    mlp_bytes: int
    router_bytes: int
    expert_bytes: int
    num_experts: int
    active_experts: int
    norm_bytes: int
    kv_bytes_per_token: int
    sliding_window: int | None
    # Alignment gaps the runtime's flat layer buffer adds between tensors (streamed with the layer):
    # measured by `overspill.runtime.loader.measured_spec`; 0 from a config, where every tensor of
    # the shipped models is a multiple of the alignment.
    padding_bytes: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def _bytes_with_experts(self, experts: int) -> int:
        return self.attention_bytes + self.mlp_bytes + self.router_bytes + self.norm_bytes + experts * self.expert_bytes

    @property
    def total_bytes(self) -> int:
        """Everything the layer stores, i.e. what streaming it in costs (and the ring slot it needs)."""
        return self._bytes_with_experts(self.num_experts) + self.padding_bytes

    @property
    def widest_ffn_bytes(self) -> int:
        """Weights of the widest feed-forward block one token runs at a time: the dense MLP (or
        shared expert) or one routed expert; transformers runs them one after another."""
        return max(self.mlp_bytes, self.expert_bytes)

    @property
    def active_bytes(self) -> int:
        """Bytes read per token at batch 1: only the routed experts count."""
        return self._bytes_with_experts(self.active_experts)

    def kv_bytes(self, tokens: int, batch: int = 1) -> int:
        """KV cache bytes for ``batch`` sequences of ``tokens`` tokens."""
        kept = tokens if self.sliding_window is None else min(tokens, self.sliding_window)
        return self.kv_bytes_per_token * kept * batch


@dataclass(frozen=True)
class ModelSpec:
    """Byte-level description of a whole causal LM.

    ``head_bytes`` is 0 when the lm_head is tied to the embedding (no extra
    storage, same convention as ``overspill.planning.plan.Footprint``); the logits then
    read ``embed_bytes``. ``final_norm_bytes`` holds every parameter outside the layers,
    embeddings and head (the final norm, in the supported architectures).
    """

    model_type: str
    dtype: str
    dtype_bytes: int
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    layers: tuple[LayerSpec, ...]
    embed_bytes: int
    head_bytes: int
    final_norm_bytes: int
    tied_embeddings: bool
    approximate: bool = False
    buffer_bytes: int = 0  # non-parameter tensors kept on the device: rotary tables, an embedding scale
    plain_embedding: bool = True  # the input embedding is a plain lookup table (it can move to the host)
    # max_position_embeddings, the positions it was trained for (None: unsaid); not a size: a config dict that leaves
    # it out and the model transformers builds from it (which fills in its default) still describe one model
    max_positions: int | None = field(default=None, compare=False)

    @property
    def layer_bytes(self) -> int:
        return sum(layer.total_bytes for layer in self.layers)

    @property
    def max_layer_bytes(self) -> int:
        """Largest single layer: the minimum size of a streaming buffer."""
        return max((layer.total_bytes for layer in self.layers), default=0)

    @property
    def total_bytes(self) -> int:
        return self.embed_bytes + self.head_bytes + self.final_norm_bytes + self.layer_bytes

    @property
    def num_params(self) -> int:
        return self.total_bytes // self.dtype_bytes

    @property
    def active_bytes(self) -> int:
        """Weights read per decoded token at batch 1.

        The embedding lookup reads one row, not the table, so it is left out;
        a tied head still reads the whole matrix for the logits.
        """
        head = self.embed_bytes if self.tied_embeddings else self.head_bytes
        return sum(layer.active_bytes for layer in self.layers) + head + self.final_norm_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(layer.kv_bytes_per_token for layer in self.layers)

    def kv_bytes(self, tokens: int, batch: int = 1) -> int:
        """KV cache bytes for ``batch`` sequences of ``tokens`` tokens each.

        Sliding-window and chunked-attention layers keep at most their window.
        """
        if tokens < 0 or batch < 0:
            raise ValueError(f"tokens and batch must be >= 0, got {tokens=}, {batch=}")
        return sum(layer.kv_bytes(tokens, batch) for layer in self.layers)


def spec_from_config(config: Mapping[str, Any], dtype: str | None = None) -> ModelSpec:
    """Build a :class:`ModelSpec` from a Hugging Face config dict.

    Finding the config (a directory, a Hugging Face id, a shipped name) is
    ``overspill.runtime.sources.resolve``'s job; shipped configs are
    ``overspill.planning.configs.shipped_config(name)``.

    Args:
        config: the parsed ``config.json``.
        dtype: overrides the config's ``dtype``/``torch_dtype`` (default bfloat16).

    Unknown keys are ignored; a multimodal config's ``text_config`` is used when
    the top level has no decoder shape.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a config dict, got {type(config).__name__}")
    cfg, model_type = _normalized(config)
    approximate = model_type not in SUPPORTED_MODEL_TYPES
    _require(cfg, model_type, _required(model_type))
    small = [f"{key} {int(cfg[key])}" for key in _BASE_REQUIRED if int(cfg[key]) < 1]
    if small:  # a plan of no layers, or a division by zero heads, would follow
        raise ValueError(f"{model_type} config has sizes below 1: {', '.join(small)}")

    name = dtype_name(dtype or cfg.get("dtype") or cfg.get("torch_dtype") or DEFAULT_DTYPE)
    nbytes = DTYPE_BYTES[name]
    hidden = int(cfg["hidden_size"])
    num_layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(_get(cfg, "num_key_value_heads", heads))
    # MLA's head_dim (transformers' config attribute) is its rotary width; config.json files omit it
    default_head_dim = int(cfg["qk_rope_head_dim"]) if model_type == "deepseek_v3" else hidden // heads
    head_dim = int(_get(cfg, "head_dim", default_head_dim))
    vocab = int(cfg["vocab_size"])

    attention = _attention_params(cfg, model_type, hidden, heads, kv_heads, head_dim)
    norms = _norm_params(cfg, model_type, hidden, head_dim)
    ffns = _ffn_params(cfg, model_type, hidden, num_layers)
    windows = kv_windows(cfg, num_layers)
    kv_per_token = kv_bytes_per_token(cfg, nbytes, kv_heads, head_dim)
    router_size = 4 if model_type in _FP32_ROUTER else nbytes

    layers = tuple(
        LayerSpec(
            index=i,
            attention_bytes=attention * nbytes,
            mlp_bytes=ffn.mlp * nbytes,
            router_bytes=ffn.router * router_size,
            expert_bytes=ffn.expert * nbytes,
            num_experts=ffn.num_experts,
            active_experts=ffn.active_experts,
            norm_bytes=norms * nbytes,
            kv_bytes_per_token=kv_per_token,
            sliding_window=windows[i],
        )
        for i, ffn in enumerate(ffns)
    )
    tied = bool(_get(cfg, "tie_word_embeddings", model_type in _TIED_BY_DEFAULT))
    return ModelSpec(
        model_type=model_type,
        dtype=name,
        dtype_bytes=nbytes,
        hidden_size=hidden,
        vocab_size=vocab,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        layers=layers,
        embed_bytes=vocab * hidden * nbytes,
        head_bytes=0 if tied else vocab * hidden * nbytes,
        final_norm_bytes=hidden * nbytes,
        tied_embeddings=tied,
        approximate=approximate,
        buffer_bytes=_buffer_bytes(cfg, model_type, head_dim, nbytes, ffns),
        plain_embedding=model_type not in _SCALED_EMBEDDING,
        max_positions=trained_positions(cfg),
    )


def positive_int(value: Any) -> int | None:
    """`value` where it is a whole number above 0 (a config field's), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def trained_positions(cfg: Mapping[str, Any]) -> int | None:
    """The positions a config says its model was trained for: `max_position_embeddings`, or where a rope scaling
    (linear, dynamic, YaRN, llama3) stretches them, the larger of it and `original_max_position_embeddings` (by
    default it) times the scaling's factor (Qwen2.5's YaRN: 32768 x 4). None where the config does not say."""
    base = positive_int(cfg.get("max_position_embeddings"))
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    factor = rope.get("factor") if isinstance(rope, Mapping) else None
    if base is None or isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        return base
    original = positive_int(rope.get("original_max_position_embeddings")) or base
    return max(base, int(original * factor))


def positions_note(spec: ModelSpec, context: int) -> str | None:
    """Why a context past the positions the model was trained for deserves a word (None: it is within them)."""
    if spec.max_positions is None or context <= spec.max_positions:
        return None
    return (f"a context of {context} tokens is past the {spec.max_positions} positions this model was trained for "
            "(max_position_embeddings, with any rope scaling): what it generates past them is untrained; plan a "
            f"context of {spec.max_positions} or less, or use a long-context checkpoint")


@dataclass(frozen=True)
class _Ffn:
    """Parameter counts (not bytes) of one layer's feed-forward block."""

    mlp: int
    router: int = 0
    expert: int = 0
    num_experts: int = 0
    active_experts: int = 0


def kv_bytes_per_token(cfg: Mapping[str, Any], nbytes: int, kv_heads: int, head_dim: int) -> int:
    """Bytes one token adds to one full-attention layer's KV cache, as transformers caches it: keys and
    values of `kv_heads` heads of `head_dim` (the caller reads those, as its config names them).

    Multi-head latent attention (DeepSeek-V3: `kv_lora_rank`) caches its compressed latent and its
    rotary key, one head each (transformers 5.17 and 5.25 alike), not per-head keys and values:
    (512 + 64) x 2 B for DeepSeek-V3 where heads x (keys + values) would be 80 KiB.
    """
    latent, rope = cfg.get("kv_lora_rank"), cfg.get("qk_rope_head_dim")
    if latent is not None and rope is not None:
        return (int(latent) + int(rope)) * nbytes
    return 2 * kv_heads * head_dim * nbytes


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Unwrap ``text_config`` of multimodal wrappers (e.g. ``llama4``)."""
    text = cfg.get("text_config")
    if "num_hidden_layers" in cfg or not isinstance(text, Mapping):
        return cfg
    merged = dict(text)
    for key in ("tie_word_embeddings", "dtype", "torch_dtype"):
        if merged.get(key) is None and cfg.get(key) is not None:
            merged[key] = cfg[key]
    return merged


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    """``cfg[key]``, treating an explicit ``null`` as absent like transformers does."""
    value = cfg.get(key)
    return default if value is None else value


def _normalized(config: Mapping[str, Any]) -> tuple[dict, str]:
    """(the decoder's config, its model_type), with the names transformers may have written in their stead."""
    cfg = _text_config(dict(config))
    model_type = str(cfg.get("model_type") or "unknown")
    if model_type in ("qwen2_moe", "qwen3_moe") and "num_experts" not in cfg and "num_local_experts" in cfg:
        cfg = {**cfg, "num_experts": cfg["num_local_experts"]}  # transformers 5.25's to_dict name (a converted GGUF)
    return cfg, model_type


def _required(model_type: str) -> tuple[str, ...]:
    return _BASE_REQUIRED + _ARCH_REQUIRED.get(model_type, ("intermediate_size",))


def missing_keys(config: Mapping[str, Any]) -> list[str]:
    """The sizes a config.json of an architecture this module has a formula for must give and does not:
    transformers would fill in its own defaults there and build another model's shape (`load` refuses
    such a config as `overspill plan` does). [] for other architectures."""
    cfg, model_type = _normalized(config)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return []
    return [key for key in _required(model_type) if cfg.get(key) is None]


def _require(cfg: Mapping[str, Any], model_type: str, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if cfg.get(key) is None]
    if missing:
        raise ValueError(f"{model_type} config is missing required keys: {', '.join(missing)}")


def dtype_name(dtype: Any) -> str:
    """The canonical name of a dtype given as a name, an alias ("bf16") or a torch dtype's str.

    Raises:
        ValueError: for a dtype not in `DTYPE_BYTES`.
    """
    name = str(dtype).lower().removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return name


def _buffer_bytes(cfg: Mapping[str, Any], model_type: str, head_dim: int, nbytes: int, ffns: list[_Ffn]) -> int:
    """Buffers transformers 5 builds beside the weights: the rotary embedding's `inv_freq` and
    `original_inv_freq` (float32, one per pair of rotated dimensions), gemma2's scalar
    embedding scale in the model dtype, and DeepSeek-V3's float32 `e_score_correction_bias`
    (one per routed expert of each MoE layer)."""
    rope = cfg.get("rope_parameters")  # transformers 5 moved the rope settings here
    rope_partial = rope.get("partial_rotary_factor") if isinstance(rope, Mapping) else None
    rotated = int(head_dim * float(_get(cfg, "partial_rotary_factor", rope_partial or 1.0)))
    total = 2 * ((rotated + 1) // 2) * 4
    if model_type in _SCALED_EMBEDDING:
        total += nbytes
    if model_type == "deepseek_v3":
        total += sum(ffn.num_experts for ffn in ffns) * 4
    return total


def _attention_params(
    cfg: Mapping[str, Any], model_type: str, hidden: int, heads: int, kv_heads: int, head_dim: int
) -> int:
    """q, k, v, o projections (phi3's fused qkv_proj has the same size)."""
    if model_type == "deepseek_v3":
        return _mla_params(cfg, hidden, heads)
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type == "qwen2_moe":
        qkv_bias, o_bias = bool(_get(cfg, "qkv_bias", True)), False
    elif model_type in ("mistral", "mixtral", "phi3"):
        qkv_bias, o_bias = False, False
    else:
        qkv_bias = o_bias = bool(_get(cfg, "attention_bias", False))
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    params = hidden * (q_out + 2 * kv_out) + q_out * hidden
    if qkv_bias:
        params += q_out + 2 * kv_out
    if o_bias:
        params += hidden
    return params


def _mla_params(cfg: Mapping[str, Any], hidden: int, heads: int) -> int:
    """DeepSeek-V3's multi-head latent attention: queries through an optional low-rank pair, keys and
    values from one shared latent (`kv_a_proj_with_mqa`) expanded per head (`kv_b_proj`), and o_proj.
    Its two latent norms count as norms (`_norm_params`)."""
    q_rank = cfg.get("q_lora_rank")
    kv_rank, rope = int(cfg["kv_lora_rank"]), int(cfg["qk_rope_head_dim"])
    nope, v_dim = int(cfg["qk_nope_head_dim"]), int(cfg["v_head_dim"])
    bias = bool(_get(cfg, "attention_bias", False))
    q_out = heads * (nope + rope)
    q = hidden * q_out if q_rank is None else hidden * int(q_rank) + int(bias) * int(q_rank) + int(q_rank) * q_out
    kv = hidden * (kv_rank + rope) + int(bias) * (kv_rank + rope) + kv_rank * heads * (nope + v_dim)
    return q + kv + heads * v_dim * hidden + int(bias) * hidden


def _norm_params(cfg: Mapping[str, Any], model_type: str, hidden: int, head_dim: int) -> int:
    if model_type == "deepseek_v3":
        return 2 * hidden + int(_get(cfg, "q_lora_rank", 0)) + int(cfg["kv_lora_rank"])
    if model_type == "gemma2":
        return 4 * hidden
    if model_type in ("qwen3", "qwen3_moe"):
        return 2 * hidden + 2 * head_dim
    return 2 * hidden


def _gated_mlp(hidden: int, intermediate: int, bias: bool = False) -> int:
    """gate, up and down projections (phi3's fused gate_up_proj: same size)."""
    params = 3 * hidden * intermediate
    return params + 2 * intermediate + hidden if bias else params


def _ffn_params(cfg: Mapping[str, Any], model_type: str, hidden: int, num_layers: int) -> list[_Ffn]:
    if model_type == "mixtral":
        experts = int(cfg["num_local_experts"])
        routed = _Ffn(
            mlp=0,
            router=experts * hidden,
            expert=_gated_mlp(hidden, int(cfg["intermediate_size"])),
            num_experts=experts,
            active_experts=int(cfg["num_experts_per_tok"]),
        )
        return [routed] * num_layers

    if model_type in ("qwen2_moe", "qwen3_moe"):
        experts = int(cfg["num_experts"])
        step = int(_get(cfg, "decoder_sparse_step", 1))
        dense_only = set(_get(cfg, "mlp_only_layers", []))
        sparse = [
            i not in dense_only and experts > 0 and (i + 1) % step == 0 for i in range(num_layers)
        ]
        shared = (
            _gated_mlp(hidden, int(cfg["shared_expert_intermediate_size"]))
            if model_type == "qwen2_moe"
            else 0
        )
        routed = _Ffn(
            mlp=shared,
            router=experts * hidden + (hidden if model_type == "qwen2_moe" else 0),
            expert=_gated_mlp(hidden, int(cfg["moe_intermediate_size"])),
            num_experts=experts,
            active_experts=int(cfg["num_experts_per_tok"]),
        )
        if not all(sparse):
            _require(cfg, model_type, ("intermediate_size",))
        dense = _Ffn(mlp=_gated_mlp(hidden, int(_get(cfg, "intermediate_size", 0))))
        return [routed if s else dense for s in sparse]

    if model_type == "llama4_text":
        step = int(_get(cfg, "interleave_moe_layer_step", 1))
        moe_layers = set(_get(cfg, "moe_layers", range(step - 1, num_layers, step)))
        experts = int(cfg["num_local_experts"])
        expert = _gated_mlp(hidden, int(cfg["intermediate_size"]))
        routed = _Ffn(
            mlp=expert,
            router=experts * hidden,
            expert=expert,
            num_experts=experts,
            active_experts=int(cfg["num_experts_per_tok"]),
        )
        if len(moe_layers & set(range(num_layers))) < num_layers:
            _require(cfg, model_type, ("intermediate_size_mlp",))
        dense = _Ffn(mlp=_gated_mlp(hidden, int(_get(cfg, "intermediate_size_mlp", 0))))
        return [routed if i in moe_layers else dense for i in range(num_layers)]

    if model_type == "deepseek_v3":
        experts = int(cfg["n_routed_experts"])
        moe_inter = int(cfg["moe_intermediate_size"])
        routed = _Ffn(
            mlp=_gated_mlp(hidden, moe_inter * int(_get(cfg, "n_shared_experts", 1))),  # the shared experts
            router=experts * hidden,
            expert=_gated_mlp(hidden, moe_inter),
            num_experts=experts,
            active_experts=int(cfg["num_experts_per_tok"]),
        )
        dense = _Ffn(mlp=_gated_mlp(hidden, int(cfg["intermediate_size"])))
        first_moe = int(_get(cfg, "first_k_dense_replace", 0))
        return [routed if i >= first_moe else dense for i in range(num_layers)]

    honors_mlp_bias = model_type == "llama" or model_type not in SUPPORTED_MODEL_TYPES
    mlp_bias = honors_mlp_bias and bool(_get(cfg, "mlp_bias", False))
    return [_Ffn(mlp=_gated_mlp(hidden, int(cfg["intermediate_size"]), mlp_bias))] * num_layers


def kv_windows(cfg: Mapping[str, Any], num_layers: int) -> list[int | None]:
    """Tokens of KV each of `num_layers` layers keeps (None: all), mirroring transformers' layer_types."""
    model_type = str(cfg.get("model_type") or "unknown")
    sliding = cfg.get("sliding_window")
    chunk = cfg.get("attention_chunk_size")
    per_type = {"sliding_attention": sliding, "chunked_attention": chunk}
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        return [per_type.get(t) for t in layer_types]

    use_sliding = bool(_get(cfg, "use_sliding_window", False))
    max_window_layers = int(_get(cfg, "max_window_layers", 28))
    if model_type == "llama":
        return [None] * num_layers
    if model_type in ("qwen2", "qwen3"):
        on = use_sliding and sliding is not None
        return [sliding if on and i >= max_window_layers else None for i in range(num_layers)]
    if model_type == "qwen2_moe":
        on = use_sliding and sliding is not None
        return [
            sliding if on and (i + 1) % 2 and i < max_window_layers else None
            for i in range(num_layers)
        ]
    if model_type == "qwen3_moe":
        return [sliding if use_sliding else None] * num_layers
    if model_type == "gemma2":
        pattern = int(_get(cfg, "sliding_window_pattern", 2))
        window = cfg.get("sliding_window", 4096)
        return [window if (i + 1) % pattern else None for i in range(num_layers)]
    if model_type == "llama4_text":
        interval = int(_get(cfg, "no_rope_layer_interval", 4))
        rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
        return [chunk if rope[i] else None for i in range(num_layers)]
    if cfg.get("use_sliding_window") is False:
        return [None] * num_layers
    return [sliding] * num_layers
