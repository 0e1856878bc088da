"""The `overspill` commands: each action's `main(args)` and the `plan` command's helpers.

`overspill.cli` builds the parser and dispatches to these. Importing this module pulls in no torch:
`run`, `serve`, `batch` and `probe` import what they need when called, and `plan` needs only
`overspill.planning` (and `overspill.runtime.sources`, which is torch-free at import).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import OverspillError

if TYPE_CHECKING:
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
        from .runtime.sources import cache_dir

        print(f"cached in {cache_dir() / 'profile.json'} (--refresh measures again)")
    return 0


def plan_main(args: argparse.Namespace) -> int:
    from .planning import planview
    from .planning.placement import device_kv_workload, plan_for, serving_pass_tokens
    from .planning.plan import Workload, footprint_from_spec

    if args.context < 1 or args.batch < 1:
        raise OverspillError(f"--context and --batch must be positive, got context={args.context} batch={args.batch}")
    if args.depth < 1:
        raise OverspillError(f"prefetch --depth must be at least 1, got {args.depth}")
    spec = _plan_spec(args.model, args.dtype)
    profile, note = _plan_profile(args.profile)
    budget = _plan_budget(args.gpu_memory, profile)
    fp = footprint_from_spec(spec)
    from .planning.units import parse_bytes

    kv = None if args.kv_gpu_memory is None else parse_bytes(args.kv_gpu_memory)
    workload = Workload(args.context, args.batch)
    if args.serve:
        workload = Workload(args.context, args.batch, pass_tokens=serving_pass_tokens(args.batch))
        if kv is None and budget is not None:
            workload = device_kv_workload(fp, budget, workload, args.depth)
    plan = plan_for(fp, profile, workload, budget, args.depth, kv_device_bytes=kv)
    if args.json:
        if note:
            print(f"note: {note}", file=sys.stderr)
        print(planview.as_json(plan, spec, profile, args.model))
        return 0
    print(planview.render(plan, fp, spec, profile, args.model))
    if note:
        print(f"note: {note}")
    return 0


def _plan_spec(model: str, dtype: str) -> ModelSpec:
    """The `ModelSpec` of MODEL from its config alone; every bad input becomes a one-line OverspillError."""
    from .errors import one_line
    from .planning.spec import spec_from_config
    from .runtime.sources import check_architecture

    config = _plan_config(model)
    check_architecture(config, model)
    try:
        return spec_from_config(config, dtype)
    except (ValueError, TypeError, KeyError, ArithmeticError) as exc:  # a missing, mistyped or zero size
        raise OverspillError(f"cannot plan {model}: {one_line(exc)}; check its config.json") from None


def _plan_config(model: str) -> dict:
    """Config dict for a shipped name, a directory, a config.json path or a cached Hugging Face id."""
    import json

    from .planning.configs import SHIPPED, shipped_config

    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise OverspillError(f"{model} has no config.json, so it is not a Hugging Face model directory")
    if not path.is_file():
        if model in SHIPPED:
            return shipped_config(model)
        path = _hub_config(model)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OverspillError(f"cannot read {path} as a JSON config: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise OverspillError(f"{path} is not a config.json: it holds a JSON {type(config).__name__}, not an object")
    return config


def _hub_config(repo_id: str) -> Path:
    """config.json of a Hugging Face id, only from the local cache: planning never downloads."""
    from .planning.configs import shipped_names

    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise OverspillError(
            f"model {repo_id!r} not found: it is not a directory, a config.json, a shipped config "
            f"({', '.join(shipped_names())}) or a Hugging Face id (owner/name)"
        )
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # invalid repo id, unreadable cache: both mean "not available locally"
        found = None
    if not isinstance(found, str):
        raise OverspillError(
            f"model {repo_id!r} is not in the local Hugging Face cache and overspill does not download; "
            f"fetch it first (`hf download {repo_id} config.json`) or pass a local directory"
        )
    return Path(found)


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
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def _plan_budget(gpu_memory: str | None, profile: Profile) -> int | None:
    """Bytes from --gpu-memory; None ('auto' or absent) lets `plan_for` use free memory minus its margin."""
    from .planning.units import format_bytes, parse_budget

    budget = parse_budget(gpu_memory)
    if budget is None or budget == "auto":
        return None
    if budget > profile.gpu_free_bytes:
        raise OverspillError(
            f"--gpu-memory {format_bytes(budget)} is more than the {format_bytes(profile.gpu_free_bytes)} "
            f"free on {profile.name}; pass a smaller --gpu-memory or another --profile"
        )
    return budget
