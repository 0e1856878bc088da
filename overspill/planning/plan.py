"""Placement decisions as data: which layers stay on the GPU and which stream from pinned host memory.

Pure Python (no torch): a `ModelSpec` (from a config, or measured by the loader) becomes a
`Footprint` through `footprint_from_spec`, `overspill.planning.placement` turns it and a `Workload`
into a `Plan`, and the executor carries the plan out. This module holds only those records and the
constants they name; the rules that choose a placement live in `placement`.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field

from .costmodel import PREFILL_CHUNK, Prediction
from .spec import LayerSpec, ModelSpec
from .units import format_bytes

DEFAULT_DEPTH = 2
DEFAULT_CONTEXT = 4096
ACTIVATION_FLOOR_BYTES = 128 * 2**20
PREFILL_CHUNK_TOKENS = PREFILL_CHUNK  # prompts are prefilled in chunks of this many tokens (activations sized for it)


class Tier(str, enum.Enum):
    """Where a group of weights lives between uses."""

    DEVICE = "device"  # resident in GPU memory
    PINNED = "pinned"  # page-locked host memory, copied into a GPU ring slot before use
    HOST = "host"  # host memory used by the host (embedding lookup), only activations cross the link


@dataclass(frozen=True)
class Footprint:
    """Byte sizes the placement needs; made from a `ModelSpec` by `footprint_from_spec`."""

    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int  # 0 when tied to the embedding
    other_bytes: int  # final norm, rotary tables, small buffers
    tied_embeddings: bool
    kv_bytes_per_token: int  # one sequence, all layers
    activation_bytes_per_token: int  # peak activations per token in flight
    host_embedding_ok: bool = True  # a plain lookup table (no scaling folded into the module)
    layer_active_bytes: tuple[int, ...] | None = None  # bytes read per token (MoE: routed experts only)
    dtype_bytes: int = 2
    gqa_group: int = 1  # attention heads per KV head
    vocab_size: int = 0  # sampling works on [rows, vocab] float32 logits and their sorted copies
    hidden_size: int = 0
    # How streamed layers travel (`overspill.planning.formats.with_format`): the format, its bytes per
    # trip per layer (None: the layer itself) and the GPU scratch one expansion needs.
    stream_format: str = "bf16"
    encoded_layer_bytes: tuple[int, ...] | None = None
    expand_scratch_bytes: int = 0
    # What transformers' batched_mm experts (the graph-safe kernel graphed decode steps run) gather per
    # token in one MoE layer: its routed experts' weights, copied for every (token, expert) pair.
    gathered_expert_bytes_per_token: int = 0


@dataclass(frozen=True)
class Workload:
    """What the placed model must serve: longest sequence and concurrent sequences.

    `activation_floor` is the least workspace kept free for activations and library workspaces
    (cuBLAS, attention); the CPU path, which only emulates a GPU budget, sets it to zero.
    """

    context: int = DEFAULT_CONTEXT
    batch: int = 1
    activation_floor: int = ACTIVATION_FLOOR_BYTES
    pass_tokens: int = 0  # most tokens one forward pass holds; 0: what `generate` needs (see `placement.pass_tokens`)
    graphs: bool = False  # decode steps replayed as CUDA graphs (MoE experts there gather their weights per row)
    # streamed layers spread evenly among the resident ones instead of the first ones (`placement.streamed_tiers`)
    spread: bool = False


@dataclass(frozen=True)
class Plan:
    """A placement: one tier per decoder layer plus the ring that streams the pinned ones."""

    layer_tiers: tuple[Tier, ...]
    embed_tier: Tier
    head_tier: Tier
    depth: int
    slots: int
    slot_bytes: int
    budget_bytes: int | None
    workspace_bytes: int
    device_weight_bytes: int
    streamed_bytes_per_step: int
    workload: Workload = field(default_factory=Workload)
    prediction: Prediction | None = None
    max_batch: int | None = None  # most sequences of `workload.context` tokens whose KV fits beside the weights
    notes: tuple[str, ...] = ()
    kv_host_layers: tuple[int, ...] = ()  # layers whose KV lives in pinned host memory (a TieredCache)
    kv_host_bytes: int = 0  # their KV at full context: read over the link every decode step
    kv_device_bytes: int | None = None  # the cap on the GPU's KV it was planned under (--kv-gpu-memory); None: none
    streaming: str = "copy"  # how streamed layers move: "copy" (pinned -> slots), "managed" (prefetch), "mapped" (in place)
    stream_format: str = "bf16"  # how streamed layers travel (`overspill.planning.formats`)
    expand_bytes: int = 0  # GPU bytes for encoded streamed layers: staging buffers + expansion scratch
    # "experts": streamed MoE layers ride the ring without their routed experts, which cross per expert
    # as the router selects them into a GPU cache of `expert_slots` slots (`overspill.planning.moe`)
    moe_streaming: str = "dense"
    expert_slots: int = 0
    expert_slot_bytes: int = 0
    # routed experts cross as the checkpoint's codes (a converted GGUF's) and expand into their cache slot
    expert_codes: bool = False
    cpu_fraction: float = 0.0  # of each streamed layer computed by the host CPU (`planning.cpu_rank`); 0: off
    cpu_max_tokens: int = 0  # widest pass whose CPU share the host computes (wider ones: the GPU)
    cpu_format: str = "bf16"  # the CPU share in host memory: "bf16" (as loaded) or "int8" (`runtime.host_int8`)

    @property
    def streamed_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_tiers) if t is Tier.PINNED)

    @property
    def resident_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_tiers) if t is Tier.DEVICE)

    @property
    def device_bytes(self) -> int:
        """Planned GPU bytes: resident weights, ring slots and the workspace reserve."""
        return (self.device_weight_bytes + self.slots * self.slot_bytes + self.expand_bytes
                + self.expert_slots * self.expert_slot_bytes + self.workspace_bytes)

    def link_floor_seconds(self, h2d_bytes_per_second: float) -> float:
        """Lower bound on one decode step: every streamed byte crosses the link once."""
        return self.streamed_bytes_per_step / h2d_bytes_per_second

    def to_json(self) -> str:
        d = asdict(self)
        d["layer_tiers"] = [t.value for t in self.layer_tiers]
        d["embed_tier"] = self.embed_tier.value
        d["head_tier"] = self.head_tier.value
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        d["layer_tiers"] = tuple(Tier(t) for t in d["layer_tiers"])
        d["embed_tier"] = Tier(d["embed_tier"])
        d["head_tier"] = Tier(d["head_tier"])
        d["workload"] = Workload(**d["workload"])
        prediction = d.get("prediction")
        if prediction and "streamed_gpu_s" in prediction:  # its name before 5bcabff (the prefix layout's value)
            prediction["overlapped_gpu_s"] = prediction.pop("streamed_gpu_s")
        d["prediction"] = Prediction(**prediction) if prediction else None
        d["notes"] = tuple(d.get("notes", ()))
        d["kv_host_layers"] = tuple(d.get("kv_host_layers", ()))
        return cls(**d)

    def summary(self) -> str:
        n = len(self.layer_tiers)
        streamed = self.streamed_layers
        managed = self.streaming in MANAGED_MODES
        lines = [
            f"layers: {n - len(streamed)}/{n} resident, {len(streamed)} streamed from "
            + ("CUDA managed memory" if managed else "pinned host memory")
            + (f" (layers {_ranges(streamed)})" if streamed else ""),
            f"embeddings: {self.embed_tier.value}, lm_head: {self.head_tier.value}",
        ]
        if streamed and self.streaming == "mapped":
            lines.append("mapped: the GPU reads the streamed layers in place over the link; nothing migrates")
        elif streamed and managed:
            lines.append(f"managed prefetch: at most {self.slots} layers on the GPU, prefetch depth {self.depth}")
        elif streamed:
            lines.append(
                f"ring: {self.slots} slots x {format_bytes(self.slot_bytes)}, prefetch depth {self.depth}"
            )
        if streamed and self.moe_streaming == "experts":
            lines.append(f"experts: routed experts stay in pinned host memory and cross as the router selects them, into "
                         f"a GPU cache of {self.expert_slots} x {format_bytes(self.expert_slot_bytes)}"
                         + (" (as the checkpoint's codes, expanded in their slot)" if self.expert_codes else ""))
        if self.kv_host_layers:
            lines.append(
                f"KV cache: {n - len(self.kv_host_layers)} layers on the device, {len(self.kv_host_layers)} in pinned "
                f"host memory (layers {_ranges(self.kv_host_layers)}; {format_bytes(self.kv_host_bytes)} at "
                f"{self.workload.context} tokens, read over the link each step)"
            )
        if streamed and self.stream_format != "bf16":
            lines.append(f"stream format: {self.stream_format} (streamed layers expand into the compute dtype in their slot; "
                         f"resident layers unchanged; staging and expansion {format_bytes(self.expand_bytes)})")
        lines.append(f"bytes over the link per decode step: {format_bytes(self.streamed_bytes_per_step + self.kv_host_bytes)}")
        budget = "unlimited" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        lines.append(
            f"device memory planned: {format_bytes(self.device_bytes)} of {budget} "
            f"(weights {format_bytes(self.device_weight_bytes)}, workspace {format_bytes(self.workspace_bytes)})"
        )
        if self.max_batch is not None:
            lines.append(f"largest batch with its KV on the GPU at {self.workload.context} tokens of context: "
                         f"{self.max_batch}")
        p = self.prediction
        if p is not None:
            floor = f", link floor {p.link_floor_tok_s:.2f} tok/s" if p.link_floor_tok_s else ""
            lines.append(
                f"predicted decode: {p.decode_tok_s:.2f} tok/s at batch {self.workload.batch}{floor}; "
                f"bottleneck: {p.bottleneck} (link {p.link_s * 1e3:.1f} ms, GPU {p.gpu_s * 1e3:.1f} ms, "
                f"host {p.host_s * 1e3:.1f} ms per step); prefill ~{p.prefill_tok_s:.0f} tok/s"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _ranges(indices: tuple[int, ...]) -> str:
    """(0,1,2,5) -> '0-2, 5'."""
    out: list[str] = []
    start = prev = None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ", ".join(out)


# Model types whose MoE block multiplies every token by every expert in one batched matmul:
# Llama-4's `Llama4TextMoe` repeats the input per expert and runs `bmm` over [experts, tokens, ...].
EXPERTS_AT_ONCE = frozenset({"llama4_text"})


def _ffn_activation_bytes(layer: LayerSpec, hidden: int, dtype_bytes: int, at_once: bool) -> int:
    """Feed-forward intermediates per token in flight. Run one block at a time: its weight bytes over
    the hidden size (3 x intermediate for a gated MLP). All experts at once: per expert the repeated
    input and the output (2 x hidden) and gate_up, the activation and the product (4 x intermediate),
    live together at the bmm."""
    if at_once and layer.is_moe:
        intermediate_bytes = layer.expert_bytes // (3 * hidden)
        return layer.num_experts * (2 * hidden * dtype_bytes + 4 * intermediate_bytes)
    return layer.widest_ffn_bytes // hidden


def footprint_from_spec(spec: ModelSpec) -> Footprint:
    """The `Footprint` of a `ModelSpec`: the one way both `overspill plan` (a spec from the config)
    and `load` (a spec measured from the built model) get the byte sizes they place.

    Activations per token in flight: the hidden state, the residual, the attention output and the
    norm output (4 x hidden), plus the widest feed-forward block's intermediates, which its weight
    bytes divided by the hidden size count: three for a gated MLP (gate, up, their product), two
    for a plain one. MoE layers run one expert at a time, so one expert counts, not the routed few,
    except where transformers runs every expert on every token at once (`EXPERTS_AT_ONCE`).
    """
    hidden = max(spec.hidden_size, 1)
    at_once = spec.model_type in EXPERTS_AT_ONCE
    ffn = max((_ffn_activation_bytes(layer, hidden, spec.dtype_bytes, at_once) for layer in spec.layers), default=0)
    return Footprint(
        layer_bytes=tuple(layer.total_bytes for layer in spec.layers),
        embed_bytes=spec.embed_bytes,
        head_bytes=spec.head_bytes,
        other_bytes=spec.final_norm_bytes + spec.buffer_bytes,
        tied_embeddings=spec.tied_embeddings,
        kv_bytes_per_token=spec.kv_bytes_per_token,
        activation_bytes_per_token=4 * hidden * spec.dtype_bytes + ffn,
        host_embedding_ok=spec.plain_embedding,
        layer_active_bytes=tuple(layer.active_bytes for layer in spec.layers),
        dtype_bytes=spec.dtype_bytes,
        gqa_group=max(spec.num_attention_heads // max(spec.num_kv_heads, 1), 1),
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        gathered_expert_bytes_per_token=0 if at_once else max(
            (layer.active_experts * layer.expert_bytes for layer in spec.layers if layer.num_experts), default=0),
    )


STREAMING = ("auto", "copy", "managed", "mapped")
MANAGED_MODES = ("managed", "mapped")  # streamed layers in CUDA managed memory
