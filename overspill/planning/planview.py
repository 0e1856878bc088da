"""`overspill plan` output: a plan as a plain-text table and as one JSON object. Pure Python.

The table answers "where does each byte live and what does a decode step cost": one row per run
of consecutive layers with the same tier, then the embeddings, LM head, ring and workspace, then
the cost model's prediction against the link floor. The JSON carries the same facts for scripts.
"""

from __future__ import annotations

import json
from itertools import groupby
from typing import Any

from .costmodel import PREFILL_TOKENS
from .formats import choose, with_format
from .hostmem import HOST_MARGIN_BYTES, host_bytes
from .placement import ttft_seconds
from .plan import _ranges, Footprint, Plan, Tier
from .profile import Profile
from .spec import ModelSpec
from .speculation import PassCost, PlanSpeculation, SpeculationForecast, draft_path
from .trees import ASSUMED_SIBLING_SHARE, PlanTree
from .units import format_bytes

TIER_LABELS = {
    Tier.DEVICE: "device (resident)",
    Tier.PINNED: "pinned (streamed)",
    Tier.HOST: "host (CPU lookup)",
}
HEADER = ("part", "tier", "what", "size", "per decode step")


def _span(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}-{last}"


def layer_groups(plan: Plan) -> list[tuple[int, int, Tier]]:
    """(first, last, tier) for each run of consecutive layers placed on the same tier."""
    out = []
    for tier, run in groupby(enumerate(plan.layer_tiers), key=lambda it: it[1]):
        idx = [i for i, _ in run]
        out.append((idx[0], idx[-1], tier))
    return out


SPREAD_ROWS = 6  # more runs of layers than this (a spread layout): one row per tier, its layers listed in short


def _tier_runs(plan: Plan) -> list[tuple[str, list[int], Tier]]:
    """(label, layers, tier) per row of the layer table: each run of consecutive layers on one tier, or where
    streamed layers are spread among resident ones (`layout="spread"`) one row per tier."""
    groups = layer_groups(plan)
    if len(groups) <= SPREAD_ROWS:
        return [(_span(first, last), list(range(first, last + 1)), tier) for first, last, tier in groups]
    rows = []
    for tier in dict.fromkeys(t for _, _, t in groups):
        layers = [i for i, t in enumerate(plan.layer_tiers) if t is tier]
        if tier is Tier.PINNED:
            shown = ", ".join(map(str, layers[:3])) + (f", ..., {layers[-1]}" if len(layers) > 3 else "")
            rows.append((f"layers {shown} (spread)", layers, tier))
        else:
            rows.append(("the other layers", layers, tier))
    return rows


def _layer_rows(plan: Plan, fp: Footprint) -> list[tuple[str, ...]]:
    active = fp.layer_active_bytes or fp.layer_bytes
    rows = []
    for span, layers, tier in _tier_runs(plan):
        stored = sum(fp.layer_bytes[i] for i in layers)
        read = sum(active[i] for i in layers)
        count = len(layers)
        if tier is Tier.PINNED and plan.moe_streaming == "experts":
            step = "ring part + the routed experts selected (expected: see bytes per step)"
        elif tier is Tier.PINNED:
            # The ring moves whole layers (all experts of an MoE layer), once per step whatever the batch.
            step = f"{format_bytes(stored)} over the link"
        else:
            step = f"{format_bytes(read)} read from HBM" + (" (routed experts)" if read < stored else "")
        label = {"managed": "managed (prefetched)", "mapped": "managed (read in place)"}.get(plan.streaming) \
            if tier is Tier.PINNED else None
        label = label or TIER_LABELS[tier]
        rows.append((span, label, f"{count} layer{'s' * (count != 1)}", format_bytes(stored), step))
    return rows


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _rows(plan: Plan, fp: Footprint, spec: ModelSpec) -> list[tuple[str, ...]]:
    matrix = f"{spec.vocab_size} x {spec.hidden_size}"
    rows = [HEADER, *_layer_rows(plan, fp)]
    rows.append(("embeddings", TIER_LABELS[plan.embed_tier], matrix, format_bytes(fp.embed_bytes), "one row per token"))
    if fp.tied_embeddings:
        rows.append(("lm_head", TIER_LABELS[plan.head_tier], "tied to the embeddings", "0 B",
                     f"{format_bytes(fp.embed_bytes)} read from HBM"))
    else:
        rows.append(("lm_head", TIER_LABELS[plan.head_tier], matrix, format_bytes(fp.head_bytes),
                     f"{format_bytes(fp.head_bytes)} read from HBM"))
    if fp.other_bytes:
        rows.append(("final norm", Tier.DEVICE.value, "", format_bytes(fp.other_bytes), ""))
    if plan.slots:
        part = {"managed": "migrated layers", "mapped": "reserved (unused when mapped)"}.get(plan.streaming, "ring slots")
        rows.append((part, Tier.DEVICE.value, f"{plan.slots} x {format_bytes(plan.slot_bytes)}",
                     format_bytes(plan.slots * plan.slot_bytes), f"prefetch depth {plan.depth}"))
    if plan.expand_bytes:
        rows.append(("staging", Tier.DEVICE.value, f"{plan.stream_format} bytes in flight + expansion scratch",
                     format_bytes(plan.expand_bytes), f"expanded into the slots ({plan.stream_format})"))
    if plan.expert_slots:
        rows.append(("expert cache", Tier.DEVICE.value, f"{plan.expert_slots} x {format_bytes(plan.expert_slot_bytes)}",
                     format_bytes(plan.expert_slots * plan.expert_slot_bytes), "misses copied as the router selects"))
    w = plan.workload
    kv_total = fp.kv_bytes_per_token * w.context * w.batch
    kv = kv_total - plan.kv_host_bytes  # KV kept on the device
    if plan.kv_host_layers:
        staging = min(plan.depth + 1, len(plan.kv_host_layers)) * plan.kv_host_bytes // len(plan.kv_host_layers)
        rows.append((f"KV layers {_ranges(plan.kv_host_layers)}", "pinned (streamed)",
                     f"{len(plan.kv_host_layers)} layers' KV in host memory, {format_bytes(staging)} staging on the GPU",
                     format_bytes(plan.kv_host_bytes), f"{format_bytes(plan.kv_host_bytes)} over the link"))
        kv += staging
    rows.append(("workspace", Tier.DEVICE.value,
                 f"KV {format_bytes(kv)} ({w.context} tokens x batch {w.batch}) + activations "
                 f"{format_bytes(plan.workspace_bytes - kv)}",
                 format_bytes(plan.workspace_bytes), f"{format_bytes(kv)} KV read from HBM"))
    budget = "no budget" if plan.budget_bytes is None else f"of {format_bytes(plan.budget_bytes)} budget"
    rows.append(("total on GPU", "", "", format_bytes(plan.device_bytes), budget))
    return rows


def _prediction_lines(plan: Plan, profile: Profile, fp: Footprint | None = None) -> list[str]:
    p = plan.prediction
    if p is None:
        return ["predicted decode: n/a (plan has no prediction)"]
    b = plan.workload.batch
    if p.link_floor_tok_s is not None:
        floor = (f"link floor {p.link_floor_tok_s:.2f} tok/s ({format_bytes(plan.streamed_bytes_per_step + plan.kv_host_bytes)} "
                 f"per step at {profile.h2d_bytes_s / 1e9:.1f} GB/s)")
    else:
        floor = "no link floor (nothing streams)"
    lines = [
        f"predicted decode: {p.decode_tok_s:.2f} tok/s at batch {b}; {floor}",
        f"bottleneck: {p.bottleneck} (per step: link {p.link_s * 1e3:.1f} ms, GPU {p.gpu_s * 1e3:.1f} ms "
        f"of which KV {p.kv_s * 1e3:.1f} ms, host dispatch {p.host_s * 1e3:.1f} ms)",
        f"predicted prefill: ~{p.prefill_tok_s:.0f} tok/s ({PREFILL_TOKENS}-token prompt, batch 1)"
        + _ttft_clause(plan, profile, fp),
        f"CPU alone: ~{p.cpu_only_tok_s:.2f} tok/s (host GEMV {profile.cpu_gemv_params_s / 1e9:.0f} G params/s)",
    ]
    if plan.max_batch is not None:  # counts sequences whose KV fits on the GPU, not those host-tier KV serves
        lines.append(f"largest batch with its KV on the GPU at {plan.workload.context} tokens of context: "
                     f"{plan.max_batch}" + (" (this plan keeps KV in host memory instead)"
                                            if plan.kv_host_layers and plan.max_batch < plan.workload.batch else ""))
    return lines


def _ttft_clause(plan: Plan, profile: Profile, fp: Footprint | None) -> str:
    """The predicted time to first token of prompts filling the planned context, where it is long."""
    w = plan.workload
    if fp is None or w.context <= PREFILL_TOKENS:
        return ""
    seconds = ttft_seconds(fp, plan, profile, w.context, w.batch)
    prompts = "a prompt" if w.batch == 1 else f"{w.batch} prompts"
    shown = f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.2g}"
    return f"; {prompts} of {w.context} tokens: first token in ~{shown} s"


def _host_line(plan: Plan, fp: Footprint, profile: Profile) -> str:
    """Pinned host memory the plan needs against what the profile's host has (`load` refuses beyond it)."""
    need = host_bytes(with_format(fp, choose(fp, plan.stream_format)), plan)
    if not need.total:
        return "host memory: none pinned"
    verdict = "fits" if need.fits(profile.host_available_bytes) else "does NOT fit: `load` will refuse it"
    return (f"host memory: {format_bytes(need.total)} pinned, of {format_bytes(profile.host_available_bytes)} available "
            f"less a {format_bytes(HOST_MARGIN_BYTES)} margin ({verdict})")


def render(plan: Plan, fp: Footprint, spec: ModelSpec, profile: Profile, model: str | None = None) -> str:
    """The plan as a table plus prediction lines, for `overspill plan`.

    Args:
        plan: a plan from `plan_for` (or any plan; without a prediction the speed lines say n/a).
        fp: the footprint the plan was made from (byte counts per row).
        spec: the model's spec (parameter count, matrix shapes).
        profile: the machine the plan is for.
        model: the name to show; defaults to the model type.
    """
    name = model or spec.model_type
    kv = format_bytes(spec.kv_bytes_per_token)
    head = [
        f"model: {name} ({spec.model_type}, {spec.dtype}): {spec.num_params / 1e9:.2f} B parameters, "
        f"{format_bytes(spec.total_bytes)} of weights, {spec.num_layers} layers, KV {kv} per token",
        f"profile: {profile.name} (host->GPU {profile.h2d_bytes_s / 1e9:.1f} GB/s, "
        f"{format_bytes(profile.gpu_free_bytes)} GPU memory free)",
    ]
    lines = [*head, "", _table(_rows(plan, fp, spec)), _host_line(plan, fp, profile), "",
             *_prediction_lines(plan, profile, fp)]
    lines.extend(f"note: {n}" for n in plan.notes)
    if spec.approximate:
        lines.append(f"note: overspill has no byte layout for model_type {spec.model_type!r}: sizes assume the Llama "
                     f"layout and are approximate (`run` and `load` measure the real model)")
    return "\n".join(lines)


def spec_totals(spec: ModelSpec) -> dict[str, Any]:
    """The spec's whole-model numbers (per-layer detail is in the plan's byte counts)."""
    return {
        "model_type": spec.model_type,
        "dtype": spec.dtype,
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "vocab_size": spec.vocab_size,
        "num_params": spec.num_params,
        "total_bytes": spec.total_bytes,
        "layer_bytes": spec.layer_bytes,
        "max_layer_bytes": spec.max_layer_bytes,
        "embed_bytes": spec.embed_bytes,
        "head_bytes": spec.head_bytes,
        "active_bytes_per_token": spec.active_bytes,
        "kv_bytes_per_token": spec.kv_bytes_per_token,
        "tied_embeddings": spec.tied_embeddings,
        "approximate": spec.approximate,
    }


def format_lines(plans: dict[str, Plan], assumed: set[str], checkpoint_format: str | None = None) -> list[str]:
    """Predicted decode per stream format, side by side: bytes over the link per step, streamed layers,
    tok/s, link floor and speed against bf16 (`plans` maps a format to its plan; `assumed` names
    formats whose bytes rest on a prior, not a measurement; `checkpoint_format`, a pre-quantized
    checkpoint's own, whose codes stream as they are while the others start from its dequantized weights)."""
    base = plans.get("bf16")
    base_tok_s = base.prediction.decode_tok_s if base is not None and base.prediction else None
    rows = [("format", "bytes/step", "streamed", "tok/s", "link floor", "x bf16", "")]
    for name, plan in plans.items():
        p = plan.prediction
        if p is None:
            continue
        floor = f"{p.link_floor_tok_s:.2f}" if p.link_floor_tok_s else "-"
        speedup = f"{p.decode_tok_s / base_tok_s:.2f}" if base_tok_s else "-"
        note = "ratio ASSUMED (0.68 of bf16) until a load measures it" if name in assumed else (
            "the checkpoint's own codes" if name == checkpoint_format else
            "lossy" if name in ("int8", "fp8", "int4") else "identical bits" if name == "lossless" else "")
        # over the link per step, as the prediction counts it: streamed layers plus host-tier KV
        rows.append((name, format_bytes(plan.streamed_bytes_per_step + plan.kv_host_bytes),
                     str(len(plan.streamed_layers)), f"{p.decode_tok_s:.2f}", floor, speedup, note))
    kv = "; bytes/step counts the host-tier KV too" if any(p.kv_host_bytes for p in plans.values()) else ""
    return [f"stream formats (--stream-format; streamed layers only, resident ones stay in the compute dtype{kv}):",
            _table(rows)]


SHOWN_CHAINS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def speculation_lines(s: PlanSpeculation) -> list[str]:
    """The `--speculate` forecast: predicted tok/s against chain length, and the best chain."""
    c = s.cost
    verify = ("serial verify: each layer runs once per token, so a token adds the resident layers' GPU compute "
              "(the copies hide the streamed layers')" if s.serial else "batched verify: a token adds its matmul FLOPs")
    bound = (f", at least {c.dispatch_per_token_s * 1e3:.1f} ms x n of host dispatch"
             if c.dispatch_per_token_s > c.compute_per_token_s else
             f", at least {c.compute_per_token_s * 1e3:.1f} ms x n of GPU compute" if c.compute_per_token_s else "")
    draft = f"; drafting {c.draft_per_token_s * 1e3:.2f} ms x k" if c.draft_per_token_s else ""
    rows = [("chain k", "tokens/pass", "ms/step", "tok/s", "x plain")]
    last = s.forecasts[-1].chain
    for f in s.forecasts:
        if f.chain in SHOWN_CHAINS or f.chain in (s.best.chain, last):
            rows.append((str(f.chain), f"{f.tokens_per_pass:.2f}", f"{c.step_seconds(f.chain) * 1e3:.1f}",
                         f"{f.tok_s:.2f}", f"{f.speedup:.2f}"))
    lines = [
        f"speculative decoding ({s.source}): acceptance {s.acceptance:.2f} per drafted token is an ASSUMPTION "
        "(--acceptance sets it; `overspill run --speculate` measures it)",
        f"{verify}: a pass over n tokens costs {(c.base_s + c.per_token_s) * 1e3:.1f} ms + "
        f"{c.per_token_s * 1e3:.3f} ms x (n - 1){bound}{draft}",
        _table(rows),
        f"best chain: {s.best.chain} -> {s.best.tok_s:.2f} tok/s, {s.best.speedup:.2f}x plain "
        f"({s.best.plain_tok_s:.2f} tok/s)",
    ]
    if draft_path(s.source) is not None:
        lines.append("note: the draft model's own time is not counted (measure it with `run --speculate`); its "
                     "memory comes out of the budget above")
    if s.tree is not None:
        lines += tree_lines(s.tree, s.cost, s.best)
    lines += [f"note: {note}" for note in s.notes]
    return lines


def tree_lines(t: PlanTree, cost: PassCost, best_chain: SpeculationForecast) -> list[str]:
    """The `--speculate-tree` forecast: the budget the runtime would choose at the planned pass cost, beside a
    chain of as many tokens (the same verify pass) and the best chain."""
    ranks = " / ".join(f"{a:.3g}" for a in t.rank_acceptance)
    nth = " / ".join(_ordinal(r + 1) for r in range(len(t.rank_acceptance)))
    source = (f"--acceptance {t.rank_acceptance[0]:.2f} split as assumed: each further choice catches "
              f"{ASSUMED_SIBLING_SHARE:.0%} of what the ones before it missed; --rank-acceptance sets it"
              if t.derived else "--rank-acceptance sets it")
    shown = [("tree (chosen budget)", t.best)]
    if t.cap != t.budget:
        shown.append((f"tree (--speculate-tree {t.cap})", t.at_cap))
    shown.append(("chain, as many tokens", t.chain))
    if best_chain.chain != t.budget:
        shown.append(("best chain", best_chain))
    rows = [("draft", "tokens", "tokens/pass", "ms/step", "tok/s", "x plain")]
    for name, f in shown:
        rows.append((name, str(f.chain), f"{f.tokens_per_pass:.2f}", f"{cost.step_seconds(f.chain) * 1e3:.1f}",
                     f"{f.tok_s:.2f}", f"{f.speedup:.2f}"))
    return [
        f"draft trees (--speculate-tree {t.cap}): rank acceptance {ranks} (the target's token is the draft's {nth} "
        f"choice) is an ASSUMPTION ({source}; `overspill run --speculate-tree` measures it)",
        _table(rows),
        f"tree budget: {t.budget} of up to {t.cap} (depth {t.depth}) -> {t.best.tok_s:.2f} tok/s, "
        f"{t.best.speedup:.2f}x plain, {t.best.tok_s / t.chain.tok_s:.2f}x the chain of {t.budget}, "
        f"{t.best.tok_s / best_chain.tok_s:.2f}x the best chain ({best_chain.chain})"
        + (" (this tree is a chain: no alternative is as likely as the next first choice)" if t.depth == t.budget
           else ""),
    ]


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")  # a draft's choices: rarely past the 4th


def as_json(plan: Plan, spec: ModelSpec, profile: Profile, model: str,
            speculation: PlanSpeculation | None = None, formats: dict[str, Plan] | None = None) -> str:
    """One JSON object: model name, profile name, spec totals and the plan as `Plan.to_json` writes it,
    with `speculation` its forecast (`PlanSpeculation.to_dict`), and with `formats` each stream
    format's bytes per step and predicted decode."""
    out = {"model": model, "profile": profile.name, "spec": spec_totals(spec), "plan": json.loads(plan.to_json())}
    if speculation is not None:
        out["speculation"] = speculation.to_dict()
    if formats:
        out["stream_formats"] = {
            name: {"streamed_bytes_per_step": p.streamed_bytes_per_step, "streamed_layers": len(p.streamed_layers),
                   "decode_tok_s": p.prediction.decode_tok_s if p.prediction else None,
                   "link_floor_tok_s": p.prediction.link_floor_tok_s if p.prediction else None}
            for name, p in formats.items()
        }
    return json.dumps(out, indent=2)


def moe_lines(forecasts: list, moe) -> list[str]:
    """Dense against expert-aware streaming of a MoE model at batch 1 and N (`planning.moe.forecasts`):
    bytes over the link per step and per token, predicted tok/s, the link floor, and the gain."""
    experts = [(e, k) for e, k in zip(moe.num_experts, moe.active) if e]
    e, k = experts[0] if experts else (0, 0)
    rows = [("moe streaming", "batch", "bytes/step", "bytes/token", "tok/s", "link floor", "x dense")]
    dense = {f.batch: f.tok_s for f in forecasts if f.mode == "dense"}
    for f in forecasts:
        floor = f"{f.link_floor_tok_s:.2f}" if f.link_floor_tok_s else "-"
        gain = f"{f.tok_s / dense[f.batch]:.2f}" if dense.get(f.batch) else "-"
        rows.append((f.mode, str(f.batch), format_bytes(f.bytes_per_step), format_bytes(int(f.bytes_per_token)),
                     f"{f.tok_s:.2f}", floor, gain))
    lines = [f"mixture of experts ({e} routed experts a layer, {k} per token; --moe-streaming): expert-aware bytes "
             "assume uniform routing (a batch of b tokens selects E(1-(1-k/E)^b) distinct experts a layer) and a cache "
             "that keeps its slots beyond one layer's experts for the most routed ones", _table(rows)]
    if moe.coded:  # a converted GGUF's experts: its codes cross, the slots hold the compute dtype
        coded = [(moe.sent(i), moe.expert_bytes[i]) for i, n in enumerate(moe.num_experts) if n]
        sent, slot = max(coded)
        lines.append(f"routed experts cross as the checkpoint's codes: {format_bytes(sent)} an expert over the link "
                     f"({sent / slot:.2f} of its {format_bytes(slot)} in the compute dtype), expanded in its slot")
    return lines
