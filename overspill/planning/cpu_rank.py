"""How much of each streamed layer the host CPU computes (the CPU rank, issue 16). Pure Python.

Derivation (decode, one step = one token for each of `batch` sequences). A fraction f of every
streamed layer (MLP columns first, then KV-head groups: `runtime.tp_split.share_of`) stays on the host:
- the link carries only the GPU's share:
      t_link(f) = ((1 - f) * S + K) / h2d             S streamed layer bytes, K host-tier KV bytes
- the host computes its share while the GPU computes the rest of the same layer. Its time per
  weight parameter is a GEMV's at batch 1 and grows with batch once the GEMM turns compute-bound:
      c(b) = max(1 / gemv_rate, 2 b / gemm_rate)       (1 b / gemv_rate when GEMM is not measured)
  plus its heads' KV read from host DRAM, and two joins per layer (activation out, partial back):
      t_cpu(f) = f * (P * c(b) + KV_s / host_read) + 2 * n * join + R
  where P = S / dtype_bytes, KV_s the streamed layers' KV at this context and batch (an upper bound: below
  the MLP's share of a layer, ~0.8, the host holds no KV heads and reads none), n the streamed
  layers, and R the resident layers' and LM head's HBM time, during which the host waits.
- the step takes max(t_link(f), t_cpu(f), t_gpu, t_host) (`costmodel.predict` for the last two);
  t_link falls and t_cpu rises with f, so the best f makes them equal:
      f* = (t_link(0) - 2 n join - R) / (S / h2d + P c(b) + KV_s / host_read)
As the batch grows, c(b) grows (the host's GEMM is ~100x slower than the GPU's) while the link's
time does not, so f* shrinks; `auto` takes the CPU rank only where it predicts at least MIN_GAIN
more tok/s (the joins and the host's speed under load are the least certain terms).

A pass wider than `max_tokens` (a prompt) is cheaper to finish on the GPU: copying a parameter
costs dtype_bytes / h2d, computing it on the host c(tokens).

Host weights "int8" (`runtime.host_int8`, lossy): the host keeps its share as one byte a weight plus a
scale per row, in place of the share itself (so host memory falls: f * S * (1 - 1 / dtype_bytes)
less), and c(b) uses the probed int8 GEMV rate; a wide pass copies the int8 bytes (1 / h2d a param).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import OverspillError
from .costmodel import predict
from .formats import NATIVE
from .plan import Footprint, Plan
from .profile import Profile
from .units import format_bytes

SPLIT_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2")  # dense layers `runtime.tp_split` splits
MIN_GAIN = 0.05
MAX_FRACTION = 0.95  # the GPU keeps a share: its heads hold the model cache's KV
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODES = ("auto", "off", "on")
HOST_FORMATS = ("bf16", "int8")  # the CPU share in host memory: as loaded, or int8 rows + scales


@dataclass(frozen=True)
class CpuSplit:
    """The CPU rank at one batch: the fraction, and predicted decode with it and without."""

    batch: int
    fraction: float
    tok_s: float
    plain_tok_s: float
    link_s: float
    cpu_s: float
    bottleneck: str = "link"  # "link" or "cpu rank" where they bound the step, else the plain plan's

    @property
    def gain(self) -> float:
        return self.tok_s / self.plain_tok_s - 1 if self.plain_tok_s else 0.0


def seconds_per_param(profile: Profile, tokens: int, host_format: str = "bf16") -> float:
    """Host seconds per weight parameter for a pass of `tokens` tokens (c(b) above); int8 host
    weights (`runtime.host_int8`) at the probed int8 GEMV rate (the bf16 rate where not measured)."""
    int8 = host_format == "int8" and profile.cpu_int8_gemv_params_s > 0
    gemv = 1 / (profile.cpu_int8_gemv_params_s if int8 else profile.cpu_gemv_params_s)
    if profile.cpu_gemm_flops_s > 0:
        return max(gemv, 2 * tokens / profile.cpu_gemm_flops_s)
    return gemv * tokens


def max_tokens(fp: Footprint, profile: Profile, host_format: str = "bf16") -> int:
    """The widest pass whose CPU share the host computes sooner than the link would copy it."""
    if profile.cpu_gemv_params_s <= 0 or profile.h2d_bytes_s <= 0:
        return 1
    copy = (1 if host_format == "int8" else fp.dtype_bytes) / profile.h2d_bytes_s
    tokens = 1
    while tokens < 4096 and seconds_per_param(profile, tokens + 1, host_format) <= copy:
        tokens += 1
    return tokens


def share_host_bytes(fp: Footprint, plan: Plan, fraction: float, host_format: str = "bf16") -> int:
    """Host bytes of the CPU shares of the streamed layers (int8: a byte a weight; its per-row scales,
    under 0.1% of a layer's bytes, are left out)."""
    stored = sum(fp.layer_bytes[i] for i in plan.streamed_layers) * fraction
    return int(stored / fp.dtype_bytes if host_format == "int8" else stored)


def _prediction(fp: Footprint, plan: Plan, profile: Profile, batch: int):
    return predict(
        layer_bytes=fp.layer_bytes,
        layer_active_bytes=fp.layer_active_bytes or fp.layer_bytes,
        streamed_bytes=plan.streamed_bytes_per_step + plan.kv_host_bytes,
        head_bytes=fp.embed_bytes if fp.tied_embeddings else fp.head_bytes,
        kv_bytes_per_token=fp.kv_bytes_per_token,
        dtype_bytes=fp.dtype_bytes,
        profile=profile,
        batch=batch,
        context=plan.workload.context,
    )


def split_at(fp: Footprint, plan: Plan, profile: Profile, batch: int, fraction: float | None = None,
             host_format: str = "bf16") -> CpuSplit:
    """The best CPU fraction at `batch` (or the given `fraction`) and decode speed with it."""
    base = _prediction(fp, plan, profile, batch)
    streamed = plan.streamed_layers
    if not streamed or profile.cpu_gemv_params_s <= 0 or profile.h2d_bytes_s <= 0:
        return CpuSplit(batch, 0.0, base.decode_tok_s, base.decode_tok_s, base.link_s, 0.0, base.bottleneck)
    n = len(fp.layer_bytes)
    hbm = profile.hbm_bytes_s or float("inf")
    stored = sum(fp.layer_bytes[i] for i in streamed)
    active = fp.layer_active_bytes or fp.layer_bytes
    resident = sum(active[i] for i in plan.resident_layers) + (fp.embed_bytes if fp.tied_embeddings else fp.head_bytes)
    read = profile.host_read_bytes_s or profile.cpu_gemv_params_s * fp.dtype_bytes
    kv = fp.kv_bytes_per_token / n * len(streamed) * plan.workload.context * batch
    per_f = stored / fp.dtype_bytes * seconds_per_param(profile, batch, host_format) + kv / read  # host s at f = 1
    fixed = 2 * len(streamed) * profile.cpu_join_s + resident / hbm
    link_per_f = stored / profile.h2d_bytes_s
    if fraction is None:
        fraction = (base.link_s - fixed) / (link_per_f + per_f)
    fraction = min(max(fraction, 0.0), MAX_FRACTION)
    link = base.link_s - fraction * link_per_f
    cpu = fraction * per_f + fixed
    step = max(link, cpu, base.gpu_s, base.host_s)
    if step > max(link, cpu):
        bottleneck = base.bottleneck
    elif abs(link - cpu) <= 1e-6 * step:
        bottleneck = "link = cpu rank"
    else:
        bottleneck = "link" if link > cpu else "cpu rank"
    return CpuSplit(batch, fraction, batch / step, base.decode_tok_s, link, cpu, bottleneck)


def off_batch(fp: Footprint, plan: Plan, profile: Profile, host_format: str = "bf16") -> int | None:
    """The smallest batch at which `auto` turns the CPU rank off (None: on at every batch tried)."""
    for batch in BATCHES:
        if split_at(fp, plan, profile, batch, host_format=host_format).gain < MIN_GAIN:
            return batch
    return None


def check_mode(mode: str | float) -> float | str:
    """`cpu_compute` as given: a mode name or a forced fraction in (0, MAX_FRACTION]."""
    if isinstance(mode, str) and mode not in MODES:
        try:
            mode = float(mode)
        except ValueError:
            raise ValueError(f"cpu_compute must be auto, off, on or a fraction of each streamed layer, "
                             f"got {mode!r}") from None
    if not isinstance(mode, str) and not 0 < mode <= MAX_FRACTION:
        raise ValueError(f"a cpu_compute fraction must be in (0, {MAX_FRACTION}], got {mode}")
    return mode


def check_format(host_format: str, mode: str | float = "auto") -> str:
    """`cpu_compute_format` as given: one of HOST_FORMATS, and int8 only where the CPU rank may run."""
    if host_format not in HOST_FORMATS:
        raise ValueError(f"cpu_compute_format must be {' or '.join(HOST_FORMATS)}, got {host_format!r} "
                         f"(--cpu-compute-format)")
    if host_format != "bf16" and mode == "off":
        raise ValueError(f"cpu_compute_format={host_format!r} sets the CPU rank's host weights, but cpu_compute "
                         f"is off: pass cpu_compute='auto', 'on' or a fraction (--cpu-compute), or leave the "
                         f"format at bf16")
    return host_format


def checked_options(mode: str | float, host_format: str) -> str | float:
    """`--cpu-compute` and `--cpu-compute-format` checked together, as `load` and `plan` take them:
    the mode, or a one-line OverspillError saying what to pass."""
    try:
        mode = check_mode(mode)
    except ValueError as exc:
        raise OverspillError(f"{exc} (--cpu-compute)") from None
    try:
        check_format(host_format, mode)
    except ValueError as exc:
        raise OverspillError(str(exc)) from None
    return mode


def _format_note(fp: Footprint, plan: Plan, profile: Profile | None, fraction: float, host_format: str) -> str:
    """What int8 host weights change: host bytes, and the rate the split was balanced at."""
    if host_format == "bf16":
        return ""
    held = share_host_bytes(fp, plan, fraction, host_format)
    bf16 = share_host_bytes(fp, plan, fraction)
    rate = ("" if profile is None else
            f"; balanced at the int8 GEMV's {profile.cpu_int8_gemv_params_s / 1e9:.0f} G params/s"
            if profile.cpu_int8_gemv_params_s > 0 else
            "; int8 GEMV not measured on this profile, so balanced at the bf16 rate (`overspill probe` measures it)")
    return (f"; int8 host weights (lossy: tokens may differ from bf16): the host keeps the CPU share in "
            f"{format_bytes(held)} instead of {format_bytes(bf16)}{rate}")


def with_cpu_rank(fp: Footprint, plan: Plan, profile: Profile | None, mode: str | float,
                  blocker: str | None = None, host_format: str = "bf16") -> Plan:
    """The plan with its CPU fraction (`Plan.cpu_fraction`) and host format (`Plan.cpu_format`),
    the widest pass the host computes, the prediction with the CPU rank, and a note that says what
    was chosen and why.

    Args:
        mode: "off"; "auto" (on where the plan predicts a gain of at least MIN_GAIN); "on" (the best
            fraction whatever the gain); or a fraction to use as is.
        blocker: why the load cannot split layers (an option that excludes it), if so: "auto" notes
            it and stays off; "on" and fractions are refused by the caller before this.
        host_format: the CPU share in host memory, one of HOST_FORMATS: "bf16" (as loaded) or "int8"
            (lossy; balanced at the probed int8 GEMV rate).
    """
    mode = check_mode(mode)
    check_format(host_format, mode)
    if mode == "off" or not plan.streamed_layers:
        return plan
    if blocker is not None:
        return replace(plan, notes=plan.notes + (f"CPU rank off: {blocker}",))
    if profile is None or profile.h2d_bytes_s <= 0:
        if isinstance(mode, float):
            return replace(plan, cpu_fraction=mode, cpu_max_tokens=64, cpu_format=host_format,
                           notes=plan.notes + (f"CPU rank: {mode:.2f} of each streamed layer on the host "
                                               f"(no probed link: no prediction)"
                                               + _format_note(fp, plan, None, mode, host_format),))
        return replace(plan, notes=plan.notes + ("CPU rank off: no probed GPU link to add the host to",))
    split = split_at(fp, plan, profile, plan.workload.batch, mode if isinstance(mode, float) else None, host_format)
    if mode == "auto" and split.gain < MIN_GAIN:
        return replace(plan, notes=plan.notes + (
            f"CPU rank off: predicted gain {split.gain:+.1%} at batch {plan.workload.batch} "
            f"(auto needs {MIN_GAIN:.0%})",))
    if split.fraction <= 0:
        return replace(plan, notes=plan.notes + ("CPU rank off: the host has no time to spare on this plan",))
    pred = plan.prediction
    if pred is not None:
        pred = replace(pred, decode_step_s=plan.workload.batch / split.tok_s, decode_tok_s=split.tok_s,
                       link_s=split.link_s, bottleneck=split.bottleneck)
    widest = max_tokens(fp, profile, host_format)
    off = off_batch(fp, plan, profile, host_format)
    join = f"{profile.cpu_join_s * 1e6:.0f} us a join" if profile.cpu_join_s else "join cost not measured (0)"
    note = (f"CPU rank: {split.fraction:.2f} of each streamed layer computed on the host "
            f"({split.tok_s:.2f} tok/s predicted against {split.plain_tok_s:.2f} plain, {split.gain:+.0%}; "
            f"{join}); passes of more than {widest} token{'s' * (widest != 1)} compute it on the GPU; "
            + (f"auto turns it off from batch {off}" if off else "it pays at every batch up to 256")
            + _format_note(fp, plan, profile, split.fraction, host_format))
    return replace(plan, prediction=pred, cpu_fraction=split.fraction, cpu_max_tokens=widest, cpu_format=host_format,
                   notes=plan.notes + (note,))


def blocker(plan: Plan, model_type: str, cuda_graphs: bool, speculate: str | None) -> str | None:
    """Why a load of `model_type` under `plan` cannot split its streamed layers, or None (`load` and
    `overspill plan` both ask it)."""
    if model_type not in SPLIT_ARCHS:
        return f"model_type {model_type!r} is not split (dense {', '.join(SPLIT_ARCHS)} only)"
    if plan.streaming != "copy":
        return f"streaming={plan.streaming!r} (the CPU rank splits layers copied from pinned memory)"
    if plan.stream_format != NATIVE:
        return f"stream format {plan.stream_format} (the CPU rank splits bf16 layers)"
    if cuda_graphs:
        return "CUDA graphs cannot wait for the host's partial sums"
    if speculate is not None:
        return "speculative verification is not split yet"
    return None


def chosen(fp: Footprint, plan: Plan, profile: Profile | None, mode: str | float, why: str | None,
           host_format: str = "bf16") -> Plan:
    """`load(cpu_compute=..., cpu_compute_format=...)`: the plan with its CPU fraction and host format
    (`with_cpu_rank`), where `why` (`blocker`'s answer, or the caller's own) rules the split out; an explicit
    "on" or fraction that cannot be honoured is refused, "auto" notes why it is off."""
    mode = checked_options(mode, host_format)
    why = why if plan.streamed_layers and mode != "off" else None
    if why is not None and mode != "auto":
        raise OverspillError(f"--cpu-compute {mode}: {why}; use --cpu-compute off or auto")
    return with_cpu_rank(fp, plan, profile, mode, why, host_format)


def batch_table(fp: Footprint, plan: Plan, profile: Profile, host_format: str = "bf16") -> list[CpuSplit]:
    """`split_at` for each batch of BATCHES: what `overspill plan` shows."""
    return [split_at(fp, plan, profile, b, host_format=host_format) for b in BATCHES]


def table_lines(fp: Footprint, plan: Plan, profile: Profile, host_format: str = "bf16") -> list[str]:
    """`overspill plan --cpu-compute`: the CPU fraction and predicted decode per batch (host weights
    in `host_format`), and where `auto` turns it off and why."""
    rows = [("batch", "CPU fraction", "tok/s plain", "tok/s with CPU", "gain", "bound by")]
    for s in batch_table(fp, plan, profile, host_format):
        rows.append((str(s.batch), f"{s.fraction:.3f}", f"{s.plain_tok_s:.2f}", f"{s.tok_s:.2f}", f"{s.gain:+.0%}",
                     s.bottleneck))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    off = off_batch(fp, plan, profile, host_format)
    gemm = (f"its GEMM at {profile.cpu_gemm_flops_s / 1e12:.2f} TFLOP/s" if profile.cpu_gemm_flops_s
            else "each token another GEMV pass (GEMM not measured: run `overspill probe`)")
    why = (f"auto turns it off from batch {off}: the host's time per step grows with the batch ({gemm}) while "
           f"the link's does not, so the share that balances them shrinks below a {MIN_GAIN:.0%} gain"
           if off else f"auto keeps it on up to batch {BATCHES[-1]}")
    if host_format == "int8" and profile.cpu_int8_gemv_params_s > 0:
        rate = f"int8 host weights, host int8 GEMV {profile.cpu_int8_gemv_params_s / 1e9:.0f} G params/s"
    elif host_format == "int8":
        rate = (f"int8 host weights at the bf16 GEMV's {profile.cpu_gemv_params_s / 1e9:.0f} G params/s: "
                f"int8 not measured on this profile")
    else:
        rate = f"host bf16 GEMV {profile.cpu_gemv_params_s / 1e9:.0f} G params/s"
    return [f"CPU rank (--cpu-compute; {rate}):", *lines, why]
