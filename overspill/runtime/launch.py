"""Start the ranks of a pipeline over layers (issue 18): N processes on this host, or join torchrun's.

`spawn(fn, ranks)` starts `ranks` processes (torch.multiprocessing's spawn context), each with
torchrun's environment variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), joins the
process group and calls `fn(*args)`; it returns every rank's result. A process started by
`torchrun` has those variables already and calls `init_process_group` itself (`overspill run` does).
The backend is NCCL on GPUs and gloo on the CPU (or wherever OVERSPILL_BACKEND=gloo says so).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from .errors import OverspillError, one_line

# NVLink multicast (NVLS) stays off: the lent multi-GPU machines hang or fail with it on (KINDS.md).
GPU_ENV = {"NCCL_NVLS_ENABLE": "0"}


def world_size() -> int:
    """Ranks this process belongs to, from torchrun's environment (1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend() -> str:
    """nccl where CUDA is available, else gloo; OVERSPILL_BACKEND overrides (gloo on a GPU host: CPU ranks)."""
    import torch

    chosen = os.environ.get("OVERSPILL_BACKEND")
    if chosen:
        return chosen
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group() -> tuple[int, int]:
    """Join the process group torchrun's variables describe (once per process); returns (rank, world)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise OverspillError(f"a pipeline rank needs torchrun's variables ({', '.join(missing)} unset): start it with "
                                 f"`overspill run --gpus N` or `torchrun --nproc-per-node N -m overspill run ...`")
        for key, value in GPU_ENV.items():
            os.environ.setdefault(key, value)
        chosen = backend()
        if chosen == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(chosen, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, ranks: int, port: int, chosen: str, fn: Callable, args: tuple, out: str) -> None:
    """One spawned rank: torchrun's variables, the process group, `fn`, its result (or error) to `out`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OVERSPILL_BACKEND=chosen, **GPU_ENV)
    import torch
    import torch.distributed as dist

    if chosen == "gloo":  # CPU ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    result: dict[str, Any]
    try:
        init_process_group()
        result = {"value": fn(*args)}
    except OverspillError as exc:
        result = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported by the parent with this rank's traceback
        result = {"error": one_line(exc), "traceback": traceback.format_exc()}
    Path(out, f"{rank}.pkl").write_bytes(pickle.dumps(result))
    if dist.is_initialized():
        if "error" not in result:
            dist.barrier()
        dist.destroy_process_group()


def spawn(fn: Callable, ranks: int, args: tuple = (), backend_name: str | None = None, timeout_s: float | None = None) -> list:
    """Run `fn(*args)` in `ranks` new processes joined in one process group; returns their results, rank 0 first.

    Args:
        fn: a module-level (picklable) function; its result must pickle.
        backend_name: "gloo" or "nccl" (default: `backend()`).
        timeout_s: give up (terminating the ranks) after this long.

    Raises:
        OverspillError: when a rank fails (the others are stopped), naming it and its error.
    """
    import torch.multiprocessing as mp

    if ranks < 1:
        raise OverspillError(f"need at least one rank, got {ranks}")
    chosen = backend_name or backend()
    if chosen == "nccl":
        import torch

        if torch.cuda.device_count() < ranks:
            raise OverspillError(f"--gpus {ranks} needs {ranks} GPUs; this machine has {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="overspill-ranks-") as out:
        port = _free_port()
        procs = [ctx.Process(target=_entry, args=(r, ranks, port, chosen, fn, args, out), daemon=False)
                 for r in range(ranks)]
        for p in procs:
            p.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        failed = None
        while any(p.is_alive() for p in procs):
            failed = next((r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode != 0), None)
            errored = next((r for r in range(ranks) if _error(out, r)), None)
            if failed is not None or errored is not None or (deadline is not None and time.monotonic() > deadline):
                time.sleep(0.5)  # let the failing rank finish writing
                for p in procs:  # the others wait on it forever
                    if p.is_alive():
                        p.terminate()
                break
            time.sleep(0.05)
        for p in procs:
            p.join()
        results = []
        for r in range(ranks):
            path = Path(out, f"{r}.pkl")
            record = pickle.loads(path.read_bytes()) if path.exists() else None
            if record is not None and "error" in record:
                if record.get("traceback"):
                    print(record["traceback"], flush=True)
                raise OverspillError(f"rank {r}: {record['error']}")
            results.append(record)
        if any(r is None for r in results):
            lost = [r for r, rec in enumerate(results) if rec is None]
            why = "timed out" if deadline is not None and time.monotonic() > deadline else "exited without a result"
            raise OverspillError(f"rank {lost[0]} {why} (exit codes {[p.exitcode for p in procs]})")
        return [r["value"] for r in results]


def _error(out: str, rank: int) -> bool:
    path = Path(out, f"{rank}.pkl")
    if not path.exists():
        return False
    try:
        return "error" in pickle.loads(path.read_bytes())
    except (EOFError, pickle.UnpicklingError):  # being written
        return False


def generate_rank(load_kwargs: dict, input_ids: list[list[int]], generate_kwargs: dict, seed: int = 0,
                  attention_mask: list[list[int]] | None = None) -> dict:
    """One rank of a pipeline: `overspill.load(pipeline=True, **load_kwargs)`, then `generate` on `input_ids`
    (every rank alike; `attention_mask` for left-padded rows). Returns this rank's tokens, span, plan facts
    and hidden-state bytes sent."""
    import torch

    from .api import load
    from .runtime.loader import placement_of
    from .runtime.pipeline import rank_summary

    torch.manual_seed(seed)  # sampling draws alike on every rank
    model, _ = load(pipeline=True, progress=False, **load_kwargs)
    placement = placement_of(model)
    ids = torch.tensor(input_ids, dtype=torch.long, device=placement.device)
    with torch.inference_mode():
        mask = torch.ones_like(ids) if attention_mask is None else torch.tensor(attention_mask, device=ids.device)
        out = model.generate(ids, attention_mask=mask, **generate_kwargs)
    import torch.distributed as dist

    stage = model_stage(model)
    span = stage.span
    return {"rank": dist.get_rank(), "tokens": out.tolist(), "start": span.start, "stop": span.stop,
            "streamed_layers": list(placement.plan.streamed_layers), "resident_layers": span.resident_layers,
            "sent_bytes": stage.links.sent, "messages": stage.links.messages, "summary": rank_summary(stage, placement),
            "split": stage.split.summary()}


def model_stage(model):
    """The `runtime.pipeline.PipelineStage` a model was loaded as (`load(pipeline=True)`)."""
    stage = getattr(model, "pipeline_stage", None)
    if stage is None:
        raise OverspillError("this model was not loaded with pipeline=True")
    return stage


def run_main(args) -> int:
    """`overspill run` with `--gpus N` / `--ranks N` (this process starts the ranks) or under torchrun
    (this process is one); otherwise the one-process `run`."""
    from .commands import run_main as run_one

    for flag in ("gpus", "ranks"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise OverspillError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    ranks = max(getattr(args, "gpus", None) or 1, getattr(args, "ranks", None) or 1)
    if world_size() > 1:  # torchrun started this process as one rank
        run_rank(args)
        return 0
    if ranks == 1:
        return run_one(args)
    if getattr(args, "gpus", None):
        import torch

        if not torch.cuda.is_available():
            raise OverspillError(f"--gpus {ranks} needs CUDA GPUs and none is available: on the CPU, --ranks {ranks} "
                                 f"runs the same pipeline in gloo processes")
        spawn(run_rank, ranks, (args,), backend_name="nccl")
    else:
        spawn(run_rank, ranks, (args,), backend_name="gloo")
    return 0


def run_rank(args) -> None:
    """One rank of `overspill run`: load its span (`load(pipeline=True)`), generate like every rank;
    rank 0 prints the split, its placement, the answer and the speed."""
    import torch
    import torch.distributed as dist

    from .api import load
    from .planning.units import format_bytes
    from .run import TimingStreamer, _prompt_ids, timed_generate
    from .runtime.loader import placement_of
    from .runtime.pipeline import rank_summary

    torch.manual_seed(args.seed)
    model, tokenizer = load(
        args.model, gpu_memory=args.gpu_memory, dtype=args.dtype, random_weights=args.random_weights,
        depth=args.depth, context=args.context, device=args.device, seed=args.seed,
        kv_gpu_memory=args.kv_gpu_memory, cuda_graphs=getattr(args, "cuda_graphs", False),
        streaming=getattr(args, "streaming", "auto"), speculate=getattr(args, "speculate", None),
        stream_format=getattr(args, "stream_format", "auto"), cpu_compute=getattr(args, "cpu_compute", "off"),
        moe_streaming=getattr(args, "moe_streaming", "auto"), pipeline=True, progress=False,
    )
    stage, placement = model_stage(model), placement_of(model)
    summaries: list = [None] * stage.world
    dist.all_gather_object(summaries, rank_summary(stage, placement))
    lead = stage.rank == 0
    if lead:
        print(stage.split.summary())
        print("\n\n".join(summaries))
    if args.max_new_tokens < 1:
        return
    vocab = model.config.get_text_config().vocab_size
    ids = _prompt_ids(tokenizer, args.prompt, not args.no_chat_template, vocab).to(placement.device)
    if lead:
        print(f"\n> {args.prompt}")
    streamer = TimingStreamer(tokenizer, echo=lead)
    pad = getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0
    timing = timed_generate(model, ids, args.max_new_tokens, streamer, attention_mask=torch.ones_like(ids), pad_token_id=pad)
    streamed: list = [None] * stage.world
    dist.all_gather_object(streamed, placement.plan.streamed_bytes_per_step)
    if not lead:
        return
    if tokenizer is None:
        print(streamer.tokens)
    link = sum(streamed)
    line = (f"\n{timing.new_tokens} tokens; prefill {timing.prefill_seconds * 1e3:.0f} ms; decode "
            f"{timing.decode_tokens_per_second:.2f} tok/s over {stage.world} ranks ({placement.device.type})")
    if link:
        line += (f"; {format_bytes(link)} over {stage.world} links per token = "
                 f"{link * timing.decode_tokens_per_second / 1e9:.1f} GB/s in all")
    print(line, flush=True)
