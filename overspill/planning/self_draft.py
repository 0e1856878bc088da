"""How much of the GPU budget the `self` draft takes: the target's own layers in int4, resident.

The `self` draft source quantizes some of the target's decoder layers to 4-bit groupwise codes and keeps
them on the GPU, so drafting never waits on the link. Those bytes come out of the same budget as the
resident bf16 layers: every ~4.3 bf16 layer-widths of int4 draft push one more bf16 layer onto the
link. With `s` the draft's share of layers and `a(s)` its per-token acceptance, a speculative step
costs

    pass(plan with the draft) + k * draft_token(s)

and yields `expected_tokens(a(s), k)` tokens (`overspill.planning.speculation`), where

    pass(plan)     = streamed bytes / link bandwidth + resident bytes / device bandwidth + n * layer dispatch
    draft_token(s) = int4 bytes / device bandwidth + lm_head bytes / device bandwidth + s * n * layer dispatch

(at batch 1 a pass reads every weight once; HF eager dispatch costs ~1 ms a layer on the H100, which
for a drafted token matters more than its bytes). `plan_self_draft` places the model once per candidate
share under the budget less the draft's bytes and keeps the fastest prediction. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import OverspillError
from .formats import NATIVE, encoded_host_buffers
from .placement import place
from .plan import DEFAULT_DEPTH, Footprint, Plan, Workload
from .profile import Profile
from .speculation import PassCost, best_chain, forecast
from .units import format_bytes

INT4_GROUP = 128  # weights per scale/zero pair: torch's int4 kernels take 32, 64, 128 or 256
DRAFT_SHARES = (1.0, 0.5, 0.25)  # candidate shares of the target's layers the draft keeps
# Per-token acceptance by drafted share: the prior the choice is made on before any token is measured
# (the loop then adapts the chain to what it measures). Measured on the embedded SmolLM2-135M-Instruct,
# the one real model here (bench/results/self-acceptance-smollm2-float32-20261205-080450.json and
# speculative-acceptance-...-073951.json): all 30 layers in int4 imply 0.68-0.71 per token quoting the
# bundled text and ~0.66 summarizing it; 15 of 30 layers accepted nothing (0 of 630). Its weights were
# Q4_1 before conversion, so an int4 draft of it is kinder than of a bf16-trained model; a larger
# model may skip layers more gracefully, which is unmeasured, so skipping stays at 0.
ACCEPTANCE_PRIOR: dict[float, float] = {1.0: 0.68, 0.5: 0.0, 0.25: 0.0, 0.0: 0.0}
# Used where no probe measured the machine: the lent H100/H200 figures (DESIGN.md).
DEFAULT_LINK_BYTES_S = 54e9
DEFAULT_DEVICE_BYTES_S = 3.0e12
DEFAULT_LAYER_OVERHEAD_S = 0.9e-3
MAX_CHAIN = 16


def int4_bytes(params: int, group: int = INT4_GROUP) -> int:
    """Bytes of `params` weights as packed 4-bit codes plus a bfloat16 scale and zero per `group`."""
    return -(-params // 2) + -(-params // group) * 4


def spread_layers(n: int, count: int) -> tuple[int, ...]:
    """`count` of `n` layers spread evenly, the first and the last always among them (a draft keeps
    the layers that read the embedding and feed the head, and skips evenly in between)."""
    if not 1 <= count <= n:
        raise ValueError(f"cannot draft with {count} of {n} layers")
    if count == 1:
        return (n - 1,)
    return tuple(sorted({round(i * (n - 1) / (count - 1)) for i in range(count)}))


def prior_acceptance(share: float) -> float:
    """Per-token acceptance expected of a draft keeping `share` of the layers (linear between the
    measured points of `ACCEPTANCE_PRIOR`)."""
    points = sorted(ACCEPTANCE_PRIOR.items())
    share = min(max(share, 0.0), 1.0)
    for (s0, a0), (s1, a1) in zip(points, points[1:]):
        if s0 <= share <= s1:
            return a0 + (a1 - a0) * (share - s0) / (s1 - s0) if s1 > s0 else a1
    return points[-1][1]


@dataclass(frozen=True)
class SelfDraft:
    """The `self` draft a plan carries: which layers, their int4 bytes and KV, and what it costs."""

    layers: tuple[int, ...]  # target layers the draft runs, in order
    group_size: int
    weight_bytes: int  # int4 codes, scales and zeros of the drafted layers, on the GPU
    kv_bytes: int  # the draft's own KV cache at the workload's context (one sequence)
    resident_lost: int = 0  # bf16 layers the plan streams because the draft holds their room
    acceptance: float = 0.0  # per-token acceptance the choice assumed (`prior_acceptance`)
    chain: int = 0  # the chain length the prediction used
    speedup: float = 0.0  # predicted tok/s against plain decoding under the same budget

    @property
    def device_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def describe(self, n_layers: int) -> str:
        lost = f"; {self.resident_lost} bf16 layer(s) stream instead" if self.resident_lost else ""
        return (f"self draft: {len(self.layers)} of {n_layers} layers in int4 (groups of {self.group_size}), "
                f"{format_bytes(self.weight_bytes)} + {format_bytes(self.kv_bytes)} KV on the GPU{lost}; "
                f"predicted {self.speedup:.2f}x plain at acceptance {self.acceptance:.2f}, chain {self.chain}")


def self_draft_bytes(fp: Footprint, layers: tuple[int, ...], workload: Workload,
                     group: int = INT4_GROUP) -> tuple[int, int]:
    """(int4 weight bytes, KV bytes) of a draft running `layers`: it drafts one sequence at a time."""
    weights = sum(int4_bytes(fp.layer_bytes[i] // max(fp.dtype_bytes, 1), group) for i in layers)
    kv = fp.kv_bytes_per_token * len(layers) * workload.context // max(len(fp.layer_bytes), 1)
    return weights, kv


@dataclass(frozen=True)
class Machine:
    """The bandwidths and dispatch cost the choice weighs (a probed `Profile` supplies them)."""

    link_bytes_s: float = DEFAULT_LINK_BYTES_S
    device_bytes_s: float = DEFAULT_DEVICE_BYTES_S
    layer_overhead_s: float = DEFAULT_LAYER_OVERHEAD_S

    @classmethod
    def of(cls, profile: Profile | None) -> "Machine":
        """The probed machine's figures, else the reference H100's."""
        if profile is None:
            return cls()
        return cls(profile.h2d_bytes_s, profile.hbm_bytes_s, profile.layer_overhead_s)


def pass_seconds(fp: Footprint, plan: Plan, machine: Machine) -> float:
    """One batch-1 decode pass of `plan`: streamed bytes over the link, resident bytes from device memory."""
    return (plan.streamed_bytes_per_step / machine.link_bytes_s
            + plan.device_weight_bytes / machine.device_bytes_s
            + len(fp.layer_bytes) * machine.layer_overhead_s)


def draft_token_seconds(fp: Footprint, weight_bytes: int, layers: int, machine: Machine) -> float:
    """One drafted token: the int4 layers and the (shared, bf16) head read once, plus layer dispatch."""
    head = fp.embed_bytes if fp.tied_embeddings else fp.head_bytes
    return (weight_bytes + head) / machine.device_bytes_s + layers * machine.layer_overhead_s


def with_self_draft(plan: Plan, draft: SelfDraft, budget: int | None) -> Plan:
    """`plan` (placed under `budget` less the draft) with the draft's bytes counted in it: its int4
    weights with the resident weights, its KV with the workspace, under the whole budget."""
    return replace(plan, budget_bytes=budget, device_weight_bytes=plan.device_weight_bytes + draft.weight_bytes,
                   workspace_bytes=plan.workspace_bytes + draft.kv_bytes,
                   notes=plan.notes + (draft.describe(len(plan.layer_tiers)),))


def plan_self_draft(
    fp: Footprint,
    budget: int | None,
    workload: Workload,
    depth: int = DEFAULT_DEPTH,
    kv_device_bytes: int | None = None,
    fit_batch: bool = False,
    machine: Machine = Machine(),
    shares: tuple[float, ...] = DRAFT_SHARES,
    group: int = INT4_GROUP,
) -> tuple[SelfDraft, Plan]:
    """Choose the draft's layers and place the model beside it (`place` under the budget less the draft).

    Args:
        shares: candidate fractions of the layers to draft with (`spread_layers` picks which).

    Returns:
        The chosen `SelfDraft` and the plan with its bytes counted (`with_self_draft`).

    Raises:
        OverspillError: when no candidate draft fits beside the model's minimum working set.
    """
    n = len(fp.layer_bytes)
    plain = place(fp, budget, workload, depth, kv_device_bytes, fit_batch)
    plain_s = pass_seconds(fp, plain, machine)
    best: tuple[float, SelfDraft, Plan] | None = None
    for count in sorted({max(1, round(share * n)) for share in shares}, reverse=True):
        layers = spread_layers(n, count)
        weights, kv = self_draft_bytes(fp, layers, workload, group)
        if budget is not None and weights + kv >= budget:
            continue
        try:
            plan = place(fp, None if budget is None else budget - weights - kv, workload, depth, kv_device_bytes,
                         fit_batch)
        except OverspillError:
            continue
        acceptance = prior_acceptance(count / n)
        cost = PassCost(base_s=pass_seconds(fp, plan, machine),
                        draft_per_token_s=draft_token_seconds(fp, weights, count, machine))
        chain = best_chain(cost, acceptance, MAX_CHAIN)
        tok_s = forecast(cost, acceptance, chain).tok_s
        draft = SelfDraft(layers, group, weights, kv, len(plain.resident_layers) - len(plan.resident_layers),
                          acceptance, chain, tok_s * plain_s)
        if best is None or tok_s > best[0]:
            best = (tok_s, draft, plan)
    if best is None:
        smallest = self_draft_bytes(fp, spread_layers(n, max(1, round(min(shares) * n))), workload, group)
        raise OverspillError(
            f"GPU budget {format_bytes(budget)} leaves no room for a self draft: even {max(1, round(min(shares) * n))} "
            f"int4 layers ({format_bytes(sum(smallest))} with their KV) do not fit beside the model's minimum working "
            f"set; raise --gpu-memory or use speculate='ngram'"
        )
    _, draft, plan = best
    if plan.streamed_layers and fp.stream_format != NATIVE:  # `load` and `overspill plan` both place it here
        raise OverspillError(encoded_host_buffers(fp.stream_format))
    return draft, with_self_draft(plan, draft, budget)
