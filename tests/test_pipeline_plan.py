"""The pipeline planner (issue 18, `overspill.planning.pipeline`): contiguous spans balanced on the slowest
rank's predicted time, each rank's plan its own under its own budget. Pure Python scenario tests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from overspill.errors import OverspillError
from overspill.planning.configs import shipped_config
from overspill.planning.pipeline import global_plan, rank_plan, split_layers, span_spec
from overspill.planning.plan import Tier, Workload
from overspill.planning.profile import REFERENCE_PROFILES
from overspill.planning.spec import spec_from_config

GiB = 2**30
SPEC = spec_from_config(shipped_config("llama-3-70b"))
H100 = REFERENCE_PROFILES["h100-pcie5"]


def contiguous(split, layers: int) -> bool:
    spans = split.spans
    return spans[0].start == 0 and spans[-1].stop == layers and all(a.stop == b.start for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("world", [2, 4])
def test_70b_split_is_contiguous_and_balanced(world: int) -> None:
    split = split_layers(SPEC, [24 * GiB] * world, Workload(4096, 1), profile=H100)
    assert split.world == world and contiguous(split, 80)
    assert split.spans[0].ends and not any(s.ends for s in split.spans[1:])  # rank 0: embeddings and head
    # Every rank streams (24 GiB holds ~10 of its layers) and fills its budget
    for s in split.spans:
        plan = rank_plan(SPEC, s.start, s.stop, s.ends, s.budget_bytes, Workload(4096, 1))
        assert plan.device_bytes <= s.budget_bytes and plan.streamed_layers and s.streamed_bytes > 0
    # Balanced: the slowest rank is no slower than under the even split, and moving any one boundary by a
    # layer either way never makes the slowest rank faster (streamed layers count in whole layers).
    def slowest(bounds):
        times = []
        for r, (a, b) in enumerate(bounds):
            plan = rank_plan(SPEC, a, b, r == 0, 24 * GiB, Workload(4096, 1))
            times.append((plan.streamed_bytes_per_step + plan.kv_host_bytes) / H100.h2d_bytes_s)
        return max(times)

    found = [(s.start, s.stop) for s in split.spans]
    tolerance = 1e-3 * split.slowest_seconds  # host dispatch and HBM terms differ slightly from link-only times
    assert slowest(found) <= split.slowest_seconds + tolerance
    even = [(80 * r // world, 80 * (r + 1) // world) for r in range(world)]
    assert slowest(found) <= slowest(even)
    for k in range(1, world):
        for shift in (-1, 1):
            moved = [list(b) for b in found]
            moved[k - 1][1] += shift
            moved[k][0] += shift
            assert slowest(found) <= slowest(moved)


def test_more_ranks_stream_fewer_bytes_but_add_link_time_serially() -> None:
    # Reasoning the cost model encodes: ranks of an unsplit batch run one after another, so a step is the
    # sum of their times; N budgets keep more layers resident, so fewer bytes stream in all.
    one, two, four = (split_layers(SPEC, [24 * GiB] * w, Workload(4096, 1), profile=H100) for w in (1, 2, 4))
    assert one.streamed_bytes > two.streamed_bytes > four.streamed_bytes
    assert one.step_seconds > two.step_seconds > four.step_seconds
    # at batch 1 the gain is the resident share only: well under 2x for 2 GPUs at 24 GiB each
    assert 1.1 < one.step_seconds / two.step_seconds < 1.5
    assert abs(two.step_seconds - sum(s.seconds for s in two.spans)) < 1e-12


def test_rank_zero_holds_embeddings_and_head_so_fewer_layers_when_budgets_bind() -> None:
    split = split_layers(SPEC, [24 * GiB] * 2, Workload(4096, 1), profile=H100)
    assert split.spans[0].layers <= split.spans[1].layers
    first = span_spec(SPEC, 0, 10, ends=True)
    other = span_spec(SPEC, 10, 20, ends=False)
    assert first.embed_bytes == SPEC.embed_bytes and first.head_bytes == SPEC.head_bytes
    assert other.embed_bytes == other.head_bytes == 0 and other.num_layers == 10
    assert [layer.index for layer in other.layers] == list(range(10))  # the rank's plan numbers from 0


def test_unequal_budgets_give_the_larger_gpu_more_layers() -> None:
    split = split_layers(SPEC, [24 * GiB, 40 * GiB], Workload(4096, 1), profile=H100)
    assert split.spans[1].layers > split.spans[0].layers
    assert split.spans[1].budget_bytes == 40 * GiB


def test_no_budget_balances_resident_compute() -> None:
    split = split_layers(SPEC, [None] * 4, Workload(4096, 1), profile=H100)
    assert contiguous(split, 80) and split.streamed_bytes == 0
    assert max(s.layers for s in split.spans) - min(s.layers for s in split.spans) <= 2


def test_refusals() -> None:
    with pytest.raises(OverspillError, match="cannot split 80 decoder layers"):
        split_layers(SPEC, [None] * 81)
    with pytest.raises(OverspillError, match="no split of 80 layers over 2 GPUs"):
        split_layers(SPEC, [1 * GiB] * 2)


def test_global_plan_places_the_span_in_the_whole_model() -> None:
    split = split_layers(SPEC, [24 * GiB] * 2, Workload(4096, 1), profile=H100)
    span = split.spans[1]
    local = rank_plan(SPEC, span.start, span.stop, span.ends, span.budget_bytes, Workload(4096, 1))
    whole = global_plan(local, span, 80)
    assert len(whole.layer_tiers) == 80
    assert whole.streamed_layers == tuple(i + span.start for i in local.streamed_layers)
    assert all(t is Tier.DEVICE for t in whole.layer_tiers[: span.start])  # other ranks' layers: weightless stand-ins
    assert whole.embed_tier is Tier.DEVICE and whole.device_bytes == local.device_bytes
    assert any(f"pipeline rank 1: decoder layers {span.start}-79" in n for n in whole.notes)


def test_split_is_data() -> None:
    split = split_layers(SPEC, [24 * GiB] * 2, Workload(4096, 1), profile=H100)
    d = json.loads(split.to_json())
    assert [s["start"] for s in d["spans"]] == [0, split.spans[1].start] and d["batch"] == 1
    assert "rank 1: layers" in split.summary()


def test_pipeline_planner_imports_no_torch() -> None:
    code = "import overspill.planning.pipeline, sys; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_tensor_parallel_prediction_divides_the_link_where_the_pipeline_cannot() -> None:
    # A prediction (assumed join costs), not a measurement: at batch 1 and 24 GiB per GPU the pipeline's ranks
    # take turns on their links while tensor-parallel shards copy at once, so TP is well over the pipeline.
    from overspill.planning.pipeline import tensor_parallel_estimate

    one = split_layers(SPEC, [24 * GiB], Workload(4096, 1), profile=H100).step_seconds
    for gpus in (2, 4):
        tp = tensor_parallel_estimate(SPEC, 24 * GiB, gpus, Workload(4096, 1), profile=H100)
        assert tp.speedup_vs_pipeline > 1.5 and one / tp.step_seconds > gpus  # N links and N budgets
        assert tp.join_seconds < 0.02 * tp.step_seconds  # 160 small all-reduces: ~3 ms against 0.2-0.9 s
    wide = tensor_parallel_estimate(SPEC, 24 * GiB, 2, Workload(512, 32), profile=H100)
    narrow = tensor_parallel_estimate(SPEC, 24 * GiB, 2, Workload(512, 1), profile=H100)
    assert wide.join_seconds > narrow.join_seconds  # joins carry batch x hidden
    with pytest.raises(OverspillError, match="8 KV heads do not split over 3 GPUs"):
        tensor_parallel_estimate(SPEC, 24 * GiB, 3)
