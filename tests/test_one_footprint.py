"""`overspill plan` shows what `load` (and `serve`) would place: one footprint from one `ModelSpec`.

`plan` sizes a model from its config (`spec_from_config`), `load` from the built model
(`loader.measured_spec`); both go through `footprint_from_spec` and `placement.place`. Two checks:
the two specs agree byte for byte (tiny configs per architecture, every shipped config), and for
every shipped config `plan --json` and `load()` give the same plan (tiers, ring, workspace, device
total, prediction) at several budgets, contexts and batches, for `generate` and for `serve`. For MoE
configs that includes budgets below the whole-layer minimum, where only expert streaming fits, and the
refusals below every plan's minimum, whose quoted budget then loads.

`load` runs on a pretend GPU, the reference H100 profile: the device is cuda:0, its free memory
and probe are the profile's, and `materialize` only records the plan it is given, so nothing is
allocated and a 109B model plans in a second on the CPU.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import dataclass, field, replace
from unittest import mock

import pytest
import torch
from transformers import AutoConfig

import overspill
from overspill import api, cli
from overspill.errors import OverspillError
from overspill.planning.configs import shipped_config, shipped_names
from overspill.planning.moe import MoeLayers, least_experts_plan
from overspill.planning.placement import at_least, least_plan
from overspill.planning.plan import DEFAULT_DEPTH, Plan, Workload, footprint_from_spec
from overspill.planning.profile import REFERENCE_PROFILES
from overspill.planning.spec import spec_from_config
from overspill.planning.units import format_bytes, parse_bytes
from overspill.runtime import hardware
from overspill.runtime.loader import Placement, build_skeleton, decoder_layers, measured_spec

from test_spec import TINY

# the reference H100 with a host of 2 TiB: every shipped config fits some budget (DeepSeek-V3's bf16 is 1.22 TiB)
PROFILE = replace(REFERENCE_PROFILES["h100-pcie5"], host_available_bytes=2 * 2**40)
_SKELETONS: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


def hf_config(d: dict):
    d = dict(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(d.pop("model_type"), **d)


def skeleton(config, dtype: torch.dtype) -> torch.nn.Module:
    """`build_skeleton`, built once per config and copied after. Parameters go to the meta device as
    they are registered, so their initial values are discarded: building with `torch.zeros` as
    `torch.empty` skips zero-filling Scout's expert tensors (~130 GB, over a minute on 2 cores)
    and changes no size."""
    key = (config.to_json_string(), dtype)
    if key not in _SKELETONS:
        with mock.patch.object(torch, "zeros", torch.empty), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _SKELETONS[key] = build_skeleton(config, dtype)
    return copy.deepcopy(_SKELETONS[key])


def measured(d: dict, dtype: torch.dtype):
    model = skeleton(hf_config(d), dtype)
    return measured_spec(model, decoder_layers(model)[1], dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_measured_spec_is_the_config_spec_for_tiny_configs(name: str, dtype: torch.dtype) -> None:
    got = measured(TINY[name], dtype)
    # Tiny tensors (a 64-wide norm in bf16) are smaller than the flat layout's 256-byte alignment:
    # the measured spec counts those gaps, which a config cannot know; everything else is equal.
    assert all(layer.padding_bytes < 2048 for layer in got.layers)
    unpadded = replace(got, layers=tuple(replace(layer, padding_bytes=0) for layer in got.layers))
    assert unpadded == spec_from_config(TINY[name], str(dtype))


@pytest.mark.parametrize("name", shipped_names())
def test_measured_spec_is_the_config_spec_for_shipped_configs(name: str) -> None:
    got = measured(shipped_config(name), torch.bfloat16)
    assert got == spec_from_config(shipped_config(name), "bfloat16")  # no alignment gaps at these sizes
    assert footprint_from_spec(got) == footprint_from_spec(spec_from_config(shipped_config(name)))


def test_mixtral_activations_count_one_expert() -> None:
    # The review found 118,784 (load) vs 204,800 (plan) B/token; transformers runs one expert at a time.
    fp = footprint_from_spec(spec_from_config(shipped_config("mixtral-8x7b")))
    assert fp.activation_bytes_per_token == (4 * 4096 + 3 * 14336) * 2 == 118_784


@dataclass
class PretendGpu:
    placed: list[Plan] = field(default_factory=list)  # every plan `materialize` was given
    cudnn_switched_off: int = 0


@pytest.fixture
def pretend_gpu(monkeypatch) -> PretendGpu:
    """`load` on cuda:0 of the reference H100, recording what it would place instead of placing it."""
    gpu = PretendGpu()

    def record(model, plan, device, source, progress=True) -> Placement:
        gpu.placed.append(plan)
        return Placement(plan=plan, device=device, ring=None, layers_path=decoder_layers(model)[0], host_bytes=0)

    def cudnn_off() -> bool:
        gpu.cudnn_switched_off += 1
        return True

    monkeypatch.setattr(api, "_parse_device", lambda device: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (PROFILE.gpu_free_bytes, PROFILE.gpu_total_bytes))
    monkeypatch.setattr(api, "_expandable_segments", lambda: None)
    monkeypatch.setattr(hardware, "disable_cudnn_sdpa", cudnn_off)
    monkeypatch.setattr(hardware, "probe", lambda **kwargs: PROFILE)
    monkeypatch.setattr(api, "build_skeleton", skeleton)
    monkeypatch.setattr(api, "materialize", record)
    return gpu


def plan_command(capsys, name: str, budget: str, context: int, batch: int, serve: bool,
                 moe_streaming: str = "auto") -> dict | str:
    """`overspill plan --json`'s plan, or its one-line error."""
    args = ["plan", name, "--profile", "h100-pcie5", "--context", str(context), "--batch", str(batch), "--json",
            "--host-memory", str(PROFILE.host_available_bytes), "--moe-streaming", moe_streaming]
    args += ["--gpu-memory", budget] if budget != "auto" else []
    args += ["--serve"] if serve else []
    code = cli.main(args)
    out = capsys.readouterr()
    return json.loads(out.out)["plan"] if code == 0 else out.err.strip()


def loaded(capsys, name: str, budget: str, context: int, batch: int, serve: bool,
           moe_streaming: str = "auto") -> Plan | str:
    """The plan `load` places (through `serve`'s own loading for `serve`), or its one-line error."""
    try:
        if serve:
            from overspill.serving.openai_protocol import load_for_serving

            args = cli._build_parser().parse_args(["serve", name, "--random-weights", "--gpu-memory", budget,
                                                   "--context", str(context), "--max-batch", str(batch),
                                                   "--moe-streaming", moe_streaming])
            model, _ = load_for_serving(args)
        else:
            model, _ = overspill.load(name, gpu_memory=budget, random_weights=True, context=context, batch=batch,
                                      progress=False, moe_streaming=moe_streaming)
    except OverspillError as exc:
        return f"overspill: error: {exc}"
    finally:
        capsys.readouterr()  # load_for_serving prints the plan
    return api.placement_of(model).plan


@pytest.mark.parametrize("serve", [False, True], ids=["generate", "serve"])
@pytest.mark.parametrize("name", shipped_names())
def test_plan_command_shows_what_load_places(capsys, pretend_gpu: PretendGpu, name: str, serve: bool) -> None:
    for budget in ("auto", "60GiB", "24GiB"):
        for context, batch in ((4096, 1), (32768, 8)):
            case = (name, budget, context, batch, "serve" if serve else "generate")
            shown = plan_command(capsys, name, budget, context, batch, serve)
            placed = loaded(capsys, name, budget, context, batch, serve)
            if isinstance(shown, str) or isinstance(placed, str):  # a budget below the minimum: the same error
                assert shown == placed, case
                continue
            # Layer by layer, the device total, and then everything else the plan says
            assert shown["layer_tiers"] == [t.value for t in placed.layer_tiers], case
            assert Plan.from_json(json.dumps(shown)).device_bytes == placed.device_bytes, case
            assert shown == json.loads(placed.to_json()), case
    assert any(p.streamed_layers for p in pretend_gpu.placed)  # some budgets stream


MOE_NAMES = [name for name in shipped_names() if MoeLayers.from_spec(spec_from_config(shipped_config(name))).is_moe]


def least_budgets(name: str, context: int, batch: int) -> tuple[int, int]:
    """(whole-layer, expert-aware) minimum working sets of a shipped config for `generate`'s workload."""
    spec = spec_from_config(shipped_config(name))
    fp, layers, w = footprint_from_spec(spec), MoeLayers.from_spec(spec), Workload(context, batch)
    return least_plan(fp, w).device_bytes, least_experts_plan(fp, layers, w, DEFAULT_DEPTH).device_bytes


def quoted_budget(error: str) -> int:
    """The budget a below-the-minimum refusal asks for."""
    match = re.search(r"raise --gpu-memory to at least ([0-9.]+ \w+)", error)
    assert match, error
    return parse_bytes(match.group(1))


def test_every_shipped_moe_config_is_checked() -> None:
    assert {"mixtral-8x7b", "llama-4-scout-109b", "qwen3-30b-a3b", "deepseek-v3"} <= set(MOE_NAMES)


def test_plan_command_streams_experts_below_the_dense_minimum_as_load_does(capsys, pretend_gpu: PretendGpu) -> None:
    """The tester's case: `plan` refused Mixtral at 8 GiB (the whole-layer minimum is 8.53 GiB) while `load`
    streamed experts (31 layers streamed, 13 expert slots, 7.74 GiB)."""
    shown = plan_command(capsys, "mixtral-8x7b", "8GiB", 1024, 1, False)
    placed = loaded(capsys, "mixtral-8x7b", "8GiB", 1024, 1, False)
    assert not isinstance(placed, str) and placed.moe_streaming == "experts", placed
    assert len(placed.streamed_layers) == 31 and placed.expert_slots == 13
    assert shown == json.loads(placed.to_json())
    for mode in ("experts", "dense"):  # --moe-streaming experts plans the same; dense is refused by both
        assert plan_command(capsys, "mixtral-8x7b", "8GiB", 1024, 1, False, mode) == \
            (shown if mode == "experts" else loaded(capsys, "mixtral-8x7b", "8GiB", 1024, 1, False, mode))


@pytest.mark.parametrize("serve", [False, True], ids=["generate", "serve"])
@pytest.mark.parametrize("name", MOE_NAMES)
def test_plan_command_shows_what_load_places_below_the_dense_minimum(capsys, pretend_gpu: PretendGpu, name: str,
                                                                     serve: bool) -> None:
    """Between the expert-aware and the whole-layer minimum only expert streaming fits: `plan` shows that plan."""
    for context, batch in ((1024, 1), (4096, 8)):
        dense, experts = least_budgets(name, context, batch)
        assert experts < dense
        for budget in (experts, (experts + dense) // 2, dense - 1):
            case = (name, budget, context, batch, "serve" if serve else "generate")
            shown = plan_command(capsys, name, str(budget), context, batch, serve)
            placed = loaded(capsys, name, str(budget), context, batch, serve)  # serve's bounded pass needs less
            assert not isinstance(placed, str), case
            assert placed.moe_streaming == "experts" and placed.device_bytes <= budget, case
            assert shown == json.loads(placed.to_json()), case


@pytest.mark.parametrize("name", MOE_NAMES)
def test_refusal_quotes_the_least_budget_at_which_load_succeeds(capsys, pretend_gpu: PretendGpu, name: str) -> None:
    """A MoE model's refusal quotes the expert-aware minimum (the whole-layer one is higher), rounded up:
    `load` and `plan` succeed at the quoted budget and at the exact minimum, and refuse one byte less."""
    for context, batch in ((1024, 1), (32768, 8)):
        dense, experts = least_budgets(name, context, batch)
        refused = plan_command(capsys, name, "1GiB", context, batch, False)
        assert isinstance(refused, str) and refused == loaded(capsys, name, "1GiB", context, batch, False)
        assert f"minimum working set of {at_least(experts)} with expert streaming" in refused
        quoted = quoted_budget(refused)
        assert experts <= quoted < experts * 1.01
        for budget in (quoted, experts):
            placed = loaded(capsys, name, str(budget), context, batch, False)
            assert not isinstance(placed, str) and placed.moe_streaming == "experts", (name, budget, placed)
            assert plan_command(capsys, name, str(budget), context, batch, False) == json.loads(placed.to_json())
        below = loaded(capsys, name, str(experts - 1), context, batch, False)
        assert below == plan_command(capsys, name, str(experts - 1), context, batch, False)
        assert isinstance(below, str) and f"at least {at_least(experts)}" in below
        # whole layers only: the whole-layer minimum, which then loads
        refused = loaded(capsys, name, str(dense - 1), context, batch, False, "dense")
        assert refused == plan_command(capsys, name, str(dense - 1), context, batch, False, "dense")
        assert isinstance(refused, str) and quoted_budget(refused) >= dense
        assert not isinstance(loaded(capsys, name, str(dense), context, batch, False, "dense"), str)


def test_load_switches_cudnn_attention_off_unless_asked(pretend_gpu: PretendGpu) -> None:
    overspill.load("llama-3-8b", random_weights=True, progress=False)
    assert pretend_gpu.cudnn_switched_off == 1
    overspill.load("llama-3-8b", random_weights=True, progress=False, cudnn_sdpa=True)
    assert pretend_gpu.cudnn_switched_off == 1 and len(pretend_gpu.placed) == 2
