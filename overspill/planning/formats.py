"""Stream formats: what a streamed layer sends over the link per step, and what expanding it costs. Pure Python.

At batch 1 a link-bound step costs streamed bytes / link bandwidth, so fewer bytes per trip move
the floor itself. Each format stores streamed layers on the host in its own form; the ring copies
those bytes into one of `STAGING_BUFFERS` staging buffers and the GPU expands them into the compute
dtype in the layer's ring slot, overlapped with compute. Two staging buffers suffice: the next
layer's copy lands in one while the other is expanded (expansion is much faster than a copy).
Resident layers stay in the compute dtype.

Bytes per parameter, for a [rows, cols] weight (groups run along `cols`, the inputs):
- bf16: the compute dtype itself, unchanged (2 B in bf16); nothing to expand.
- int8: 1 B + a float32 scale per group of `SCALED_GROUP` inputs (symmetric): 1 + 4/128 = 1.03 B.
- fp8: 1 B (e4m3) + a float32 scale per group of `SCALED_GROUP` inputs: 1.03 B.
- int4: 0.5 B + a bf16 scale and zero per group of `INT4_GROUP` inputs (0.5 + 4/128 = 0.53 B).
- lossless: the low byte plane(s) raw plus the high byte plane (sign and 7 exponent bits)
  entropy-coded. nvCOMP ANS shrank that plane of N(0, 0.02) bf16 weights to 0.365 on the H200,
  so bf16 travels as (1 + 0.365) / 2 = 0.68 of its size; until a load measures the real ratio the
  planner ASSUMES it (`LOSSLESS_HIGH_PLANE_PRIOR`).
Vectors (norms, biases) and tensors a format cannot take travel raw; the planner ignores them.

These counts are exact for matrices whose inputs divide into whole groups (every weight of the
dense architectures); the runtime counts the exact bytes from the tensors' shapes, alignment and
raw vectors included (`overspill.runtime.formats`), and the plan uses those where it has them.

Expansion runs on the GPU beside compute; its cost is modelled as HBM traffic (bytes read and
written per output byte, `EXPAND_TRAFFIC`) plus, for lossless, the codec's decode rate over the
high plane (`ANS_DECODE_BYTES_S`, measured on the H200). Both are priors until `bench/compressed.py`
measures them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import OverspillError
from .plan import MANAGED_MODES, Footprint, Plan

INT4_GROUP = 128  # inputs per scale/zero pair, as the self draft's int4 layers (`planning.self_draft.INT4_GROUP`)

NATIVE = "bf16"  # the compute dtype itself (bf16 on a GPU; the name stays for any dtype)
LOSSY = ("int8", "fp8", "int4")
FORMATS = (NATIVE, *LOSSY, "lossless")
CHOICES = (*FORMATS, "auto")

LOSSLESS_HIGH_PLANE_PRIOR = 0.365  # ANS on the high byte plane of N(0, 0.02) bf16 weights (H200, nvCOMP 6)
ANS_DECODE_BYTES_S = 137e9  # nvCOMP ANS decode of that plane, output bytes/s (H200)
SCALED_GROUP = 128  # int8 / fp8: inputs per scale (issue 15: chosen by SmolLM2 perplexity, bench/perplexity.py)
SCALE_BYTES = 4  # int8 / fp8: float32 scale per group of `SCALED_GROUP` inputs
GROUP_PAIR_BYTES = 4  # int4: bf16 scale + bf16 zero per group
# HBM bytes moved per expanded output byte: read the codes and scales, write the compute dtype once
# (int8: one fused multiply; fp8: a cast then a multiply; int4: the packed bytes read twice into a byte
# a code in scratch, then one fused scale-and-shift; lossless: one interleave of the planes). The
# groups' scales (4/128 B a weight for int8, fp8 and int4) are left out: a few percent of the traffic.
EXPAND_TRAFFIC = {"int8": 1.5, "fp8": 3.5, "int4": 2.5, "lossless": 2.0}


def check_format(name: str) -> str:
    """`name` if it is a stream format or "auto", else ValueError with the choices."""
    if name not in CHOICES:
        raise ValueError(f"unknown stream format {name!r}: use one of {', '.join(CHOICES)}")
    return name


def encoded_host_buffers(stream_format: str) -> str:
    """Why the self draft refuses streamed layers encoded in `stream_format`, and what to pass instead."""
    return (f"speculate='self' quantizes the streamed layers from their host buffers, which hold "
            f"{stream_format} bytes: use --stream-format bf16 with it")


def check_format_plan(plan: Plan, cuda_graphs: bool, speculate: str | None) -> None:
    """Refuse a placed plan whose encoded streamed layers meet what they do not support yet (`load` and
    `overspill plan` both ask, so the two refuse the same plans in the same words).

    Raises:
        OverspillError: naming the conflict and the option to change."""
    if not plan.streamed_layers or plan.stream_format == NATIVE:
        return
    if plan.moe_streaming == "experts":
        raise OverspillError(f"stream format {plan.stream_format} does not yet combine with expert streaming: "
                             f"use --moe-streaming dense or --stream-format bf16")
    if speculate == "self":  # a caller's plan (`plan_self_draft` refuses its own)
        raise OverspillError(encoded_host_buffers(plan.stream_format))
    if plan.streaming in MANAGED_MODES:
        raise OverspillError(f"stream format {plan.stream_format} needs pinned copies: use --streaming copy "
                             f"or --stream-format bf16")
    if cuda_graphs:
        raise OverspillError(f"stream format {plan.stream_format} decodes eagerly (not in CUDA graphs yet): "
                             f"drop --cuda-graphs or use --stream-format bf16")


def format_blocker(streaming: str = "auto", cuda_graphs: bool = False, speculate: str | None = None,
                   cpu_compute: str | float = "off") -> str | None:
    """What a load asked for that streams only uncompressed layers, or None: CUDA graphs and managed memory
    replay or map bf16 layers, the self draft quantizes the streamed layers from their bf16 host buffers,
    and a CPU rank the user turned on splits bf16 layers ("auto" turns itself off instead)."""
    if speculate == "self":
        return "speculate='self'"
    if streaming in MANAGED_MODES:
        return f"streaming={streaming!r}"
    if cpu_compute not in ("off", "auto"):
        return "the CPU rank"
    return "CUDA graphs" if cuda_graphs else None


def resolve_auto(codec_available: bool, link_bytes_s: float,
                 decode_bytes_s: float = ANS_DECODE_BYTES_S, blocker: str | None = None) -> tuple[str, str | None]:
    """(format, note) for "auto": lossless where the codec is installed and decodes faster than the link
    brings bytes (tokens stay identical), else bf16 with a note saying why. Lossy formats only when asked.
    `blocker` names what the load asked for that streams only uncompressed layers (CUDA graphs, managed
    memory, the self draft): "auto" then stays bf16 instead of refusing a choice the user never made."""
    if blocker is not None:
        return NATIVE, f"stream format auto: bf16 ({blocker} streams uncompressed layers)"
    if not codec_available:
        return NATIVE, ("stream format auto: bf16 (pip install 'overspill[compress]' to stream lossless-compressed "
                        "layers, ~0.68 of the bytes with identical tokens)")
    if link_bytes_s > 0 and decode_bytes_s <= link_bytes_s:
        return NATIVE, (f"stream format auto: bf16 (the codec decodes at {decode_bytes_s / 1e9:.0f} GB/s, no faster "
                        f"than the {link_bytes_s / 1e9:.0f} GB/s link)")
    return "lossless", None


def lossless_ratio(dtype_bytes: int, high_plane_ratio: float = LOSSLESS_HIGH_PLANE_PRIOR) -> float:
    """Encoded / raw bytes of a lossless layer: every byte plane but the top one raw, the top one coded."""
    return (dtype_bytes - 1 + high_plane_ratio) / dtype_bytes


def encoded_bytes(fmt: str, layer_bytes: int, dtype_bytes: int,
                  high_plane_ratio: float = LOSSLESS_HIGH_PLANE_PRIOR, group: int = 0, store_bytes: int = 0) -> int:
    """Bytes a layer of `layer_bytes` (in the compute dtype) sends per trip in `fmt`. `group` and
    `store_bytes`: a pre-quantized checkpoint's inputs per scale (-1: one a row, whose scales are left out
    here) and bytes of each stored scale (int4: and of each zero) (`planning.prequantized`); 0: the format's own."""
    params = layer_bytes // dtype_bytes
    groups = 0 if group == -1 else params // (group or (INT4_GROUP if fmt == "int4" else SCALED_GROUP))
    if fmt == NATIVE:
        return layer_bytes
    if fmt in ("int8", "fp8"):
        return params + (store_bytes or SCALE_BYTES) * groups
    if fmt == "int4":
        return params // 2 + (2 * store_bytes if store_bytes else GROUP_PAIR_BYTES) * groups
    if fmt == "lossless":
        return int(layer_bytes * lossless_ratio(dtype_bytes, high_plane_ratio))
    raise ValueError(f"unknown stream format {fmt!r}")


STAGING_BUFFERS = 2  # encoded bytes in flight: one being copied into, one being expanded from


INT4_CHUNK_CODES = 16 * 2**20  # int4 codes unpacked at a time, a byte each, before one fused scale-and-shift


LOSSLESS_CHUNK = 64 * 2**20  # high-plane bytes coded as one stream, decoded (and interleaved) one at a time


def expand_scratch_bytes(fmt: str, layer_bytes: int, dtype_bytes: int) -> int:
    """GPU scratch one expansion needs besides its staging: lossless decodes the high plane there, one
    coded chunk at a time; int4 unpacks up to `INT4_CHUNK_CODES` codes (and their groups' float32 shifts)
    there at a time."""
    if fmt == "lossless":
        return min(layer_bytes // dtype_bytes, LOSSLESS_CHUNK)
    if fmt == "int4":
        return int4_scratch_bytes(min(layer_bytes // dtype_bytes, INT4_CHUNK_CODES))
    return 0


def int4_scratch_bytes(codes: int) -> int:
    """Scratch to unpack `codes` int4 codes: a byte each (aligned), then a float32 shift per group of the
    smallest group a weight may fall back to (32 inputs)."""
    return -(-codes // 256) * 256 + 4 * -(-codes // 32)


def expand_seconds(fmt: str, layer_bytes: int, dtype_bytes: int, hbm_bytes_s: float,
                   decode_bytes_s: float = ANS_DECODE_BYTES_S) -> float:
    """Predicted GPU time to expand one layer of `layer_bytes` (compute dtype) from `fmt`; lossless decodes
    its high plane at `decode_bytes_s` (the probe's measurement where there is one)."""
    if fmt == NATIVE or hbm_bytes_s <= 0:
        return 0.0
    seconds = EXPAND_TRAFFIC[fmt] * layer_bytes / hbm_bytes_s
    if fmt == "lossless":
        seconds += (layer_bytes // dtype_bytes) / decode_bytes_s
    return seconds


@dataclass(frozen=True)
class FormatChoice:
    """A stream format applied to a footprint: bytes per trip per layer, and whether the ratio is assumed."""

    name: str
    encoded_layer_bytes: tuple[int, ...]
    scratch_bytes: int  # GPU bytes beside the ring slots: the staging buffers and the expansion scratch
    assumed: bool  # lossless planned from the prior ratio, not a measurement


def choose(fp: Footprint, fmt: str, high_plane_ratio: float | None = None,
           exact: tuple[int, ...] | None = None) -> FormatChoice:
    """The bytes `fmt` sends for each layer of `fp`: `exact` (counted by the runtime from the tensors)
    when given, else the estimate above; lossless at `high_plane_ratio`, else the prior (assumed)."""
    ratio = LOSSLESS_HIGH_PLANE_PRIOR if high_plane_ratio is None else high_plane_ratio
    sizes = exact or tuple(encoded_bytes(fmt, b, fp.dtype_bytes, ratio) for b in fp.layer_bytes)
    scratch = max((expand_scratch_bytes(fmt, b, fp.dtype_bytes) for b in fp.layer_bytes), default=0)
    if fmt != NATIVE:
        scratch += STAGING_BUFFERS * max(sizes, default=0)
    return FormatChoice(fmt, sizes, scratch, assumed=fmt == "lossless" and high_plane_ratio is None and exact is None)


def with_format(fp: Footprint, choice: FormatChoice) -> Footprint:
    """`fp` whose streamed layers travel in `choice`'s format (the placement sizes slots and link bytes from it)."""
    if choice.name == NATIVE:
        return replace(fp, stream_format=NATIVE, encoded_layer_bytes=None, expand_scratch_bytes=0)
    return replace(fp, stream_format=choice.name, encoded_layer_bytes=choice.encoded_layer_bytes,
                   expand_scratch_bytes=choice.scratch_bytes)


def plan_expand_seconds(fp: Footprint, fmt: str, streamed: tuple[int, ...], hbm_bytes_s: float,
                        decode_bytes_s: float = ANS_DECODE_BYTES_S) -> float:
    """GPU time per step spent expanding the `streamed` layers from `fmt`."""
    return sum(expand_seconds(fmt, fp.layer_bytes[i], fp.dtype_bytes, hbm_bytes_s, decode_bytes_s) for i in streamed)
