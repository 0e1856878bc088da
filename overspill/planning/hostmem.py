"""Host memory a plan needs, checked before anything is loaded.

The streamed layers (in their stream format's bytes), the KV of host-tier layers, a host-side embedding
table and the CPU rank's int8 shares all live in pinned host memory, which the OS cannot swap out. A
plan that needs more than the host has would otherwise fail minutes into a load (a pinned allocation
refused, or the process killed by the OOM killer), so `load` checks it first and says what to change.
On a CPU device the "device" tier is host memory too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OverspillError
from .plan import Footprint, Plan, Tier
from .profile import GiB
from .units import format_bytes

HOST_MARGIN_BYTES = 2 * GiB  # the process itself: Python, torch, the tokenizer, read buffers


@dataclass(frozen=True)
class HostBytes:
    """What a plan keeps in host memory, by part."""

    streamed: int  # streamed layers, as their stream format stores them (CPU rank: its share's format)
    kv: int  # host-tier layers' KV at the planned context and batch
    embeddings: int  # an embedding (or head) table looked up on the host
    device: int  # the plan's device total, where the device is the CPU

    @property
    def total(self) -> int:
        return self.streamed + self.kv + self.embeddings + self.device

    def fits(self, available: int) -> bool:
        """Whether these bytes and the process's margin fit `available` host bytes. A plan that pins
        nothing fits whatever is available: the margin is room kept beside pinned memory, and no choice
        of placement could lower a plan's need below nothing."""
        return self.total == 0 or self.total + HOST_MARGIN_BYTES <= available


def host_bytes(fp: Footprint, plan: Plan, on_cpu: bool = False) -> HostBytes:
    """Host bytes of `plan` for the model of `fp`; `on_cpu`: the device is the host itself."""
    stored = fp.encoded_layer_bytes if fp.encoded_layer_bytes and plan.stream_format != "bf16" else fp.layer_bytes
    streamed = sum(stored[i] for i in plan.streamed_layers)
    if plan.cpu_fraction and plan.cpu_format == "int8":  # the CPU share held as a byte a weight instead
        share = sum(fp.layer_bytes[i] for i in plan.streamed_layers) * plan.cpu_fraction
        streamed -= int(share - share / fp.dtype_bytes)
    embeddings = fp.embed_bytes if plan.embed_tier is Tier.HOST else 0
    if plan.head_tier is Tier.HOST and not fp.tied_embeddings:
        embeddings += fp.head_bytes
    return HostBytes(streamed, plan.kv_host_bytes, embeddings, plan.device_bytes if on_cpu else 0)


def check_host(fp: Footprint, plan: Plan, available: int, on_cpu: bool = False) -> HostBytes:
    """`host_bytes`, or a one-line OverspillError when they and the margin exceed `available` bytes."""
    need = host_bytes(fp, plan, on_cpu)
    if need.fits(available):
        return need
    parts = [f"{name} {format_bytes(n)}" for name, n in (
        ("streamed layers", need.streamed), ("host KV", need.kv), ("embeddings", need.embeddings),
        ("the model on the CPU device", need.device)) if n]
    advice = []
    if need.kv or need.device:
        what = "host KV" if need.kv else "the KV cache"
        advice.append(f"lower --context ({what}; or --max-batch when serving)")
    if need.streamed and plan.stream_format in ("bf16", "lossless"):
        dense = "--moe-streaming dense " if plan.moe_streaming == "experts" else ""  # formats skip expert streaming
        advice.append(f"stream fewer bytes ({dense}--stream-format int8 or int4 stores the streamed layers in ~1/2 "
                      f"or ~1/4)")
    if need.streamed and not on_cpu:
        advice.append("raise --gpu-memory if the GPU has room")
    advice.append("free host memory, or use a bigger host (`overspill plan MODEL --host-memory SIZE` shows what "
                  "fits one)")
    kept = f"{format_bytes(need.total)} ({', '.join(parts)})"
    margin, avail = format_bytes(HOST_MARGIN_BYTES), format_bytes(available)
    if available < HOST_MARGIN_BYTES:
        short = (f"only {avail} of host memory is available, less than the {margin} the process itself needs "
                 f"before the {kept} this plan keeps there")
    else:
        over = format_bytes(need.total + HOST_MARGIN_BYTES - available)
        short = (f"this plan keeps {kept} in host memory plus a {margin} margin for the process: {over} more than "
                 f"the {avail} available")
    raise OverspillError(f"{short}: {_any_of(advice)}")


def _any_of(options: list[str]) -> str:
    """`a`, `a; or b`, `a; b; or c`: the advice as one clause, however many options apply (semicolons,
    since an option may hold commas or an "or" of its own)."""
    return options[0] if len(options) == 1 else f"{'; '.join(options[:-1])}; or {options[-1]}"
