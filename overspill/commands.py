"""The `overspill` commands: each action's `main(args)` and the `plan` command's helpers.

`overspill.cli` builds the parser and dispatches to these. Importing this module pulls in no torch:
`run`, `serve`, `batch` and `probe` import what they need when called, and `plan` needs only
`overspill.planning` and the torch-free `overspill.runtime.sources` and `overspill.runtime.cuda_driver`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING

from .errors import OverspillError

if TYPE_CHECKING:
    from .planning.plan import Plan
    from .planning.profile import Profile
    from .planning.spec import ModelSpec


def run_main(args: argparse.Namespace) -> int:
    from .run import run

    run(args)
    return 0


def serve_main(args: argparse.Namespace) -> int:
    try:
        from .serving.server import serve_main
    except ImportError as exc:
        raise OverspillError(f"serve needs the server extras ({exc.name} is missing): pip install 'overspill[server]'") from None
    return serve_main(args)


def batch_main(args: argparse.Namespace) -> int:
    try:
        from .serving.batch import batch_main
    except ImportError as exc:
        raise OverspillError(f"batch needs the server extras ({exc.name} is missing): pip install 'overspill[server]'") from None
    return batch_main(args)


def probe_main(args: argparse.Namespace) -> int:
    from .runtime.hardware import probe
    from .runtime.sources import cache_dir

    # seconds with nothing printed otherwise: 18-27 s on an H100, the host GEMV alone several on a CPU-only machine
    if not _cuda_device_present():
        print("measuring this machine's host CPU (no CUDA device; a few seconds)...", file=sys.stderr, flush=True)
    elif args.refresh or not (cache_dir() / "profile.json").exists():
        print("measuring this machine (about 10-30 s; later calls read the cached result)...", file=sys.stderr,
              flush=True)
    profile = probe(refresh=args.refresh)
    cpu_only = profile.gpu_total_bytes == 0
    if args.json:
        print(profile.to_json())
        if cpu_only:
            print("no CUDA device: this is the CPU-only profile", file=sys.stderr)
        return 0
    print(profile.summary())
    if cpu_only:
        print("no CUDA device: this is the CPU-only profile (plan for a GPU with `overspill plan MODEL --profile NAME`)")
    else:
        print(f"cached in {cache_dir() / 'profile.json'} (--refresh measures again)")
    return 0


def plan_main(args: argparse.Namespace) -> int:
    from .planning import planview
    from .planning.formats import FORMATS, check_format_plan, choose, format_blocker, with_format
    from .planning.hostmem import check_host
    from .planning.placement import plan_for, serving_pass_tokens, spreads
    from .planning.plan import Workload, footprint_from_spec
    from .planning.host_experts import refusal as host_experts_refusal
    from .planning.host_experts import supported as host_experts_supported
    from .planning.host_experts import why_dense
    from .planning.moe import MoeLayers, forecasts, with_codes
    from .planning.planview import moe_lines
    from .planning.prequantized import settle_format
    from .planning.spec import positions_note
    from .planning.speculation import draft_path, prefix_instead
    from .planning.units import parse_bytes
    from .runtime.sources import DEFAULT_MODEL_NAME

    if args.context < 1 or args.batch < 1:
        raise OverspillError(f"--context and --batch must be positive, got context={args.context} batch={args.batch}")
    if args.depth < 1:
        raise OverspillError(f"prefetch --depth must be at least 1, got {args.depth}")
    _check_speculation_args(args)
    spec = _plan_spec(args.model, args.dtype)
    profile, note = _plan_profile(args.profile)
    if getattr(args, "host_memory", None) is not None:
        profile = dataclasses.replace(profile, host_available_bytes=parse_bytes(args.host_memory, "--host-memory"))
    budget = _plan_budget(args.gpu_memory, profile)
    draft_note = None
    if draft_path(getattr(args, "speculate", None)) is not None:  # as `load` counts the draft model
        from .runtime.sources import budget_beside_draft

        budget, draft_note = budget_beside_draft(args.speculate, _auto_budget(budget, profile), spec.dtype,
                                                 args.context)
    fp = footprint_from_spec(spec)
    kv = None if args.kv_gpu_memory is None else parse_bytes(args.kv_gpu_memory, "--kv-gpu-memory")
    # --serve plans as `serve` loads: one engine pass of activations, the largest batch whose KV stays on the GPU
    workload = Workload(args.context, args.batch, pass_tokens=serving_pass_tokens(args.batch) if args.serve else 0,
                        graphs=getattr(args, "cuda_graphs", False),
                        spread=spreads(getattr(args, "layout", "auto"), getattr(args, "speculate", None)))
    fmt_blocker = format_blocker(cuda_graphs=workload.graphs, speculate=getattr(args, "speculate", None),
                                 cpu_compute=getattr(args, "cpu_compute", "off"))
    requested, format_note = _plan_format(getattr(args, "stream_format", "auto"), profile, fmt_blocker)
    scheme = _plan_prequantized(args.model)
    moe_layers = MoeLayers.from_spec(spec)
    moe_mode = getattr(args, "moe_streaming", "auto")
    if getattr(args, "stream_format", "auto") == "auto" and scheme is not None and scheme.experts \
            and moe_layers.is_moe and moe_mode != "dense":  # as `load`: experts cross as the GGUF's codes
        moe_layers = with_codes(moe_layers, tuple(scheme.expert_link_bytes(b, fp.dtype_bytes) if n else 0 for b, n in
                                                  zip(moe_layers.expert_bytes, moe_layers.num_experts)), fp.dtype_bytes)
    requested, format_note = settle_format(requested, format_note, getattr(args, "stream_format", "auto"), scheme,
                                           fmt_blocker, moe_layers.is_moe and moe_mode != "dense")  # as `load`

    def choice(name: str):  # a pre-quantized checkpoint's own format sends its codes with their float32 scales
        own = scheme is not None and name == scheme.stream_format
        return choose(fp, name, exact=tuple(scheme.stream_bytes(b, fp.dtype_bytes) for b in fp.layer_bytes)
                      if own else None)

    def plan_in(name: str):
        return plan_for(with_format(fp, choice(name)), profile, workload, budget, args.depth,
                        kv_device_bytes=kv, fit_batch=args.serve)

    cpu_experts = getattr(args, "cpu_experts", "off") if host_experts_supported(spec.model_type) else "off"
    self_draft = None
    if getattr(args, "speculate", None) == "self":  # the int4 draft's bytes come out of the budget, as in `load`
        self_draft, plan = _placed_with_self_draft(with_format(fp, choice(requested)), moe_layers, moe_mode,
                                                   profile, workload, budget, args.depth, kv, args.serve)
    else:
        plan = _placed(with_format(fp, choice(requested)), moe_layers, moe_mode, profile, workload, budget,
                       args.depth, kv, args.serve, cpu_experts, getattr(args, "speculate", None))
        if prefix_instead(plan, workload.spread, getattr(args, "layout", "auto"), getattr(args, "speculate", None)):
            workload = dataclasses.replace(workload, spread=False)  # as `load`: it drafts nothing, keep the prefix
            plan = _placed(with_format(fp, choice(requested)), moe_layers, moe_mode, profile, workload, budget,
                           args.depth, kv, args.serve, cpu_experts, "auto")
    refused = host_experts_refusal(getattr(args, "cpu_experts", "off"), spec.model_type, moe_layers.is_moe,
                                   plan.moe_streaming == "experts" and bool(plan.streamed_layers),
                                   why_dense(plan.notes, moe_mode, dense_option="--moe-streaming dense"),
                                   coded=plan.expert_codes)
    if refused:  # as `load` refuses it (experts kept as a GGUF's codes included)
        raise OverspillError(refused)
    check_format_plan(plan, workload.graphs, getattr(args, "speculate", None))  # as `load` refuses it
    formats = {}
    for name in FORMATS:  # the others side by side; one whose bigger slots do not fit is left out
        try:
            formats[name] = plan if name == requested else plan_in(name)
        except OverspillError:
            continue
    streams = bool(plan.streamed_layers)
    if format_note and plan.streamed_layers:  # as `load` notes its choice
        plan = dataclasses.replace(plan, notes=plan.notes + (format_note,))
    if draft_note:
        plan = dataclasses.replace(plan, notes=plan.notes + (draft_note,))
    past = positions_note(spec, plan.workload.context)
    if past:
        plan = dataclasses.replace(plan, notes=plan.notes + (past,))
    plan = dataclasses.replace(plan, kv_device_bytes=kv)  # as `load` records the cap
    plan, cpu_blocker = _plan_cpu_rank(args, fp, spec, plan, profile)
    check_host(with_format(fp, choice(plan.stream_format)), plan, profile.host_available_bytes)  # as `load` does
    plan, source = _speculation_source(args, plan)
    speculation = _plan_speculation(args, plan, spec, profile, fp, self_draft, source)
    name = args.model or DEFAULT_MODEL_NAME
    if args.json:
        if note:
            print(f"note: {note}", file=sys.stderr)
        print(planview.as_json(plan, spec, profile, name, speculation, formats if streams else None))
        return 0
    print(planview.render(plan, fp, spec, profile, name))
    if moe_layers.is_moe:
        print()
        print("\n".join(moe_lines(forecasts(fp, moe_layers, plan.budget_bytes, workload, args.depth, profile,
                                               (1, max(args.batch, 8)), host_experts_supported(spec.model_type)),
                                     moe_layers)))
    if streams:
        print()
        print("\n".join(planview.format_lines(formats, {"lossless"}, scheme.stream_format if scheme else None)))
    if speculation is not None:
        print()
        print("\n".join(planview.speculation_lines(speculation)))
    if plan.streamed_layers and getattr(args, "cpu_compute", "off") != "off" and cpu_blocker is None:
        from .planning.cpu_rank import table_lines

        print()
        print("\n".join(table_lines(fp, plan, profile, getattr(args, "cpu_compute_format", "bf16"))))
    if note:
        print(f"note: {note}")
    return 0


def _auto_budget(budget: int | None, profile: Profile) -> int:
    """An explicit budget, or "auto" (None) as `plan_for` resolves it: free memory less its margin."""
    from .planning.placement import AUTO_MARGIN_BYTES

    return profile.auto_budget(AUTO_MARGIN_BYTES) if budget is None else budget


def _placed(fp, moe_layers, mode: str, profile: Profile, workload, budget: int | None, depth: int,
            kv: int | None, serve: bool, cpu_experts: str = "off", speculate: str | None = None):
    """The plan `load` places for these arguments, chosen by the function `load` calls (`moe.place_moe`:
    whole layers or expert streaming, or the refusal quoting the least budget), for every model; then
    its streaming mode as `load` picks it and the prediction. No whole-layer plan is placed first: below
    its minimum, an expert-aware plan may still fit."""
    from .planning import moe
    from .planning.formats import NATIVE
    from .planning.placement import choose_streaming

    budget = _auto_budget(budget, profile)
    blocker = moe.blocker(fp.stream_format, "auto", workload.graphs, speculate)  # as `load` asks it
    plan, note = moe.place_moe(fp, moe_layers, budget, workload, depth, kv, serve, mode, blocker, profile)
    if note:
        plan = dataclasses.replace(plan, notes=plan.notes + (note,))
    if plan.moe_streaming != "experts" and plan.stream_format == NATIVE:  # the others arrive by pinned copies
        plan = dataclasses.replace(plan, streaming=choose_streaming("auto", profile.managed_wins))
    return moe.predict(fp, plan, moe_layers, profile, cpu_experts)


def _plan_format(name: str, profile: Profile, blocker: str | None = None) -> tuple[str, str | None]:
    """`plan --stream-format`: (format, note); "auto" chooses as `load` does (`formats.resolve_auto`)."""
    from .planning.formats import CHOICES, resolve_auto
    from .runtime.lossless_codec import codec_installed

    if name not in CHOICES:
        raise OverspillError(f"--stream-format must be one of {', '.join(CHOICES)}, got {name!r}")
    if name != "auto":
        return name, None
    return resolve_auto(codec_installed(), profile.h2d_bytes_s, profile.decode_bytes_s, blocker=blocker)


def _check_speculation_args(args: argparse.Namespace) -> None:
    """`plan --speculate`: a known source, an acceptance in [0, 1], a chain of at least 1, batch 1; with
    `--speculate-tree` a budget `check_tree` accepts and rank acceptances `check_rank_acceptance` does."""
    from .planning.speculation import check_source
    from .planning.trees import check_tree

    try:
        check_tree(getattr(args, "speculate_tree", None), getattr(args, "speculate", None))
    except ValueError as exc:
        raise OverspillError(f"--speculate-tree: {exc}") from None
    acceptance, _, _ = _speculation_acceptance(args)
    if not 0.0 <= acceptance <= 1.0:  # wrong with or without --speculate
        raise OverspillError(f"--acceptance must be in [0, 1], got {acceptance}")
    if args.max_chain < 1:
        raise OverspillError(f"--max-chain must be at least 1, got {args.max_chain}")
    if getattr(args, "speculate", None) is None:
        return
    try:  # the self draft is placed with the model (`planning.self_draft`)
        check_source(args.speculate, named=("auto", "ngram", "self"))  # as `load` names them
    except ValueError as exc:
        raise OverspillError(f"--speculate: {exc}") from None
    if args.batch != 1:
        raise OverspillError(f"--speculate forecasts batch-1 decoding (the engine drafts only while one request "
                             f"runs); drop --batch {args.batch}")


def _speculation_acceptance(args: argparse.Namespace) -> tuple[float, list[float] | None, bool]:
    """`plan`'s assumed acceptance for chains, rank acceptance for trees (None without --speculate-tree), and
    whether the ranks were derived from the chain's (`trees.assumed_rank_acceptance`) rather than given.
    A chain drafts the draft's first choices, so `--rank-acceptance`'s first value is the chain's acceptance.

    Raises:
        OverspillError: unreadable or impossible rank acceptances, one that contradicts --acceptance, or
            rank acceptances without a tree."""
    from .planning.speculation import ASSUMED_ACCEPTANCE
    from .planning.trees import assumed_rank_acceptance, check_rank_acceptance

    given, tree = getattr(args, "rank_acceptance", None), getattr(args, "speculate_tree", None)
    acceptance = getattr(args, "acceptance", None)
    if given is None:
        acceptance = ASSUMED_ACCEPTANCE if acceptance is None else acceptance
        return acceptance, None if tree is None else assumed_rank_acceptance(acceptance), True
    if tree is None:
        raise OverspillError("--rank-acceptance describes a draft tree's choices: pass --speculate-tree N too")
    try:
        ranks = [float(a) for a in given.split(",")]
    except ValueError:
        raise OverspillError(f"--rank-acceptance takes probabilities separated by commas, e.g. 0.7,0.08,0.05; "
                             f"got {given!r}") from None
    try:
        check_rank_acceptance(ranks)
    except ValueError as exc:
        raise OverspillError(f"--rank-acceptance: {exc}") from None
    if acceptance is not None and acceptance != ranks[0]:
        raise OverspillError(f"--rank-acceptance starts with the chain's acceptance ({ranks[0]:g}), but --acceptance "
                             f"is {acceptance:g}: pass one of them, or the same value in both")
    return ranks[0], ranks, False


def _speculation_source(args: argparse.Namespace, plan):
    """(plan, source): what `--speculate` drafts with on this plan, "auto" resolved as `load` resolves it
    (`speculation.auto_source`: ngram where a pass crosses the link), with a note saying what it chose."""
    from .planning.speculation import auto_source

    source = getattr(args, "speculate", None)
    if source != "auto":
        return plan, source
    source = auto_source(plan)
    chose = (f"{source}, as a pass crosses the link" if source else
             "plain decoding, as expert streaming drafts nothing" if plan.moe_streaming == "experts" else
             "plain decoding, as nothing crosses the link")
    return dataclasses.replace(plan, notes=plan.notes + (f"speculate auto: {chose}",)), source


def _plan_speculation(args: argparse.Namespace, plan, spec: ModelSpec, profile: Profile, fp=None, self_draft=None,
                      source: str | None = None):
    """The forecast of a batch-1 plan drafting with `source` (`--speculate`, "auto" resolved; None: no
    forecast). Verification is serial where every layer attends fully, as the runtime chooses: greedy
    tokens then match plain decoding's. The self draft's tokens cost its int4 layers' reads and dispatch
    (`self_draft.draft_token_seconds`). With `--speculate-tree` the tree's forecast at the same pass cost,
    except where `load` would graph verify passes: graphed passes hold chains only, so trees run as chains
    there."""
    from .planning.self_draft import Machine, draft_token_seconds
    from .planning.speculation import plan_speculation
    from .planning.trees import plan_tree

    if source is None or plan.prediction is None:
        return None
    serial = all(layer.sliding_window is None for layer in spec.layers)
    active_params = spec.active_bytes / spec.dtype_bytes
    draft_s = 0.0 if self_draft is None else draft_token_seconds(fp, self_draft.weight_bytes, len(self_draft.layers),
                                                                 Machine.of(profile))
    # graphed passes where `load` would graph them: serial verification, no host-tier KV (graphs.graphs_supported)
    graphed = getattr(args, "cuda_graphs", False) and serial and not plan.kv_host_layers
    acceptance, ranks, derived = _speculation_acceptance(args)
    s = plan_speculation(plan.prediction, active_params, profile.matmul_flops_s, source,
                         acceptance, serial, args.max_chain, draft_s, graphed)
    if ranks is None:
        return s
    if graphed:
        return dataclasses.replace(s, notes=(
            f"draft trees (--speculate-tree {args.speculate_tree}) run as chains under --cuda-graphs: graphed "
            "verify passes hold chains only, so the chains above are the forecast; drop --cuda-graphs for trees",))
    return dataclasses.replace(s, tree=plan_tree(s.cost, args.speculate_tree, ranks, derived))


def _placed_with_self_draft(fp, moe_layers, moe_mode: str, profile: Profile, workload, budget: int | None,
                            depth: int, kv: int | None, serve: bool):
    """`plan --speculate self`: the draft `load` chooses and the model placed beside it
    (`self_draft.plan_self_draft`), whole MoE layers as for any draft (`moe.choose`: --moe-streaming experts
    refused, auto noted, as `load` does), with its streaming mode and prediction as `_placed` gives them."""
    from .planning import moe
    from .planning.formats import NATIVE
    from .planning.placement import choose_streaming
    from .planning.self_draft import Machine, plan_self_draft

    budget = _auto_budget(budget, profile)
    draft, plan = plan_self_draft(fp, budget, workload, depth, kv, serve, Machine.of(profile))
    plan, note = moe.choose(plan, fp, moe_layers, budget, moe_mode, depth,
                            moe.blocker(fp.stream_format, "auto", workload.graphs, "self"))
    if note:
        plan = dataclasses.replace(plan, notes=plan.notes + (note,))
    if plan.stream_format == NATIVE:
        plan = dataclasses.replace(plan, streaming=choose_streaming("auto", profile.managed_wins))
    return draft, moe.predict(fp, plan, moe_layers, profile)


def _plan_prequantized(model: str):
    """How MODEL's checkpoint arrives quantized (`planning.prequantized.scheme_of`), from its config alone."""
    from .planning.prequantized import scheme_of
    from .runtime.sources import resolve

    try:
        return scheme_of(resolve(model, config_only=True).config())
    except ValueError as exc:
        raise OverspillError(f"{model}: {exc}") from None


def _plan_spec(model: str, dtype: str) -> ModelSpec:
    """The `ModelSpec` of MODEL from its config alone; every bad input becomes a one-line OverspillError."""
    from .errors import one_line
    from .planning.spec import DEFAULT_DTYPE, SUPPORTED_MODEL_TYPES, dtype_name, spec_from_config
    from .runtime.sources import check_architecture, resolve

    if dtype == "auto":  # what `run` loads on a GPU
        dtype = DEFAULT_DTYPE
    try:
        dtype_name(dtype)
    except ValueError as exc:  # the flag's fault, not the config's
        raise OverspillError(f"--dtype: {exc}") from None
    config = resolve(model, config_only=True).config()
    check_architecture(config, model)
    try:
        spec = spec_from_config(config, dtype)
    except (ValueError, TypeError, KeyError, ArithmeticError) as exc:  # a missing, mistyped or zero size
        spec, why = None, one_line(exc)
    model_type = (config.get("text_config") or config).get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:  # no formula here (it names its sizes its own way): as `load` does
        measured = _measured_spec(config, dtype)
        if measured is not None:
            return measured
    if spec is None:
        raise OverspillError(f"cannot plan {model or 'the embedded model'}: {why}; check its config.json")
    return spec


def _measured_spec(config: dict, dtype: str) -> ModelSpec | None:
    """The spec `load` measures from the model transformers builds on the meta device (no weights): exact for
    architectures without a config formula (gpt2, opt, falcon, ...), whose configs name their sizes their own
    way. None when transformers cannot build it (then the formula's approximation or its error stands)."""
    try:
        from transformers import AutoConfig

        from .api import parse_dtype
        from .planning.spec import DEFAULT_DTYPE
        from .runtime.loader import build_skeleton, decoder_layers, measured_spec

        d = dict(config)
        torch_dtype = parse_dtype(dtype or d.get("dtype") or d.get("torch_dtype") or DEFAULT_DTYPE)
        skeleton = build_skeleton(AutoConfig.for_model(d.pop("model_type"), **d), torch_dtype)
        return measured_spec(skeleton, decoder_layers(skeleton)[1], torch_dtype)
    except Exception:  # noqa: BLE001 - any failure leaves the config formula's answer
        return None


def _plan_profile(name: str | None) -> tuple[Profile, str | None]:
    """(profile, note): the named reference, else this machine's probe if it has a GPU, else h100-pcie5."""
    from .planning.profile import REFERENCE_PROFILES

    if name is not None:
        profile = REFERENCE_PROFILES[name]
        if profile.gpu_total_bytes == 0:
            raise OverspillError(
                f"profile {name!r} has no GPU to place layers on; pick a GPU profile with --profile "
                f"({', '.join(n for n, p in sorted(REFERENCE_PROFILES.items()) if p.gpu_total_bytes)})"
            )
        return profile, None
    fallback = (
        "planned for the reference profile h100-pcie5, not a measured machine: "
        "run `overspill probe` on the GPU machine and plan there for its own numbers"
    )
    if not _cuda_device_present():
        return REFERENCE_PROFILES["h100-pcie5"], fallback
    from .runtime.hardware import probe
    from .runtime.sources import cache_dir

    if not (cache_dir() / "profile.json").exists():
        print("probing this machine once (about 10 s; `overspill probe` shows it)...", file=sys.stderr, flush=True)
    profile = probe()
    if profile.gpu_total_bytes == 0:  # a GPU is present but this torch cannot use it
        return REFERENCE_PROFILES["h100-pcie5"], fallback
    return profile, None


def _cuda_device_present() -> bool:
    """Whether the CUDA driver sees a GPU, asked through libcuda: importing torch to ask costs ~2 s."""
    from .runtime.cuda_driver import device_count

    return device_count() > 0


def _plan_budget(gpu_memory: str | None, profile: Profile) -> int | None:
    """Bytes from --gpu-memory; None ('auto' or absent) lets `plan_for` use free memory minus its margin."""
    from .planning.units import format_bytes, parse_budget

    budget = parse_budget(gpu_memory, "--gpu-memory")
    if budget is None or budget == "auto":
        return None
    if budget > profile.gpu_free_bytes:
        raise OverspillError(
            f"--gpu-memory {format_bytes(budget)} is more than the {format_bytes(profile.gpu_free_bytes)} "
            f"free on {profile.name}; pass a smaller --gpu-memory or another --profile"
        )
    return budget


def _plan_cpu_rank(args: argparse.Namespace, fp, spec: ModelSpec, plan, profile: Profile) -> tuple[Plan, str | None]:
    """`plan --cpu-compute`: the plan with the CPU rank as `load` would choose it (`planning.cpu_rank.chosen`,
    ruled out by the same `blocker`), and with `--serve` as `serve` runs it: off; and what rules it out."""
    from .planning.cpu_rank import blocker, chosen
    from .serving.defaults import SERVING_CPU_RANK, host_format_refusal

    mode = getattr(args, "cpu_compute", "off")
    host_format = getattr(args, "cpu_compute_format", "bf16")
    if args.serve and host_format != "bf16":  # as `serve` refuses it
        raise OverspillError(host_format_refusal(host_format))
    why = SERVING_CPU_RANK if args.serve else blocker(plan, spec.model_type, getattr(args, "cuda_graphs", False),
                                                      getattr(args, "speculate", None))
    return chosen(fp, plan, profile, mode, why, host_format), why
