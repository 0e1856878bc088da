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

from ..errors import OverspillError, one_line

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
    leave(ok="error" not in result)


def leave(ok: bool = True) -> None:
    """Leave the process group before this process exits: a rank that exits with gloo's threads still up
    aborts ("terminate called without an active exception"), failing a run that had finished. `ok`: wait
    for every rank first (a failed rank does not, as the others may never reach the barrier)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if ok:
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


def model_stage(model):
    """The `runtime.pipeline.PipelineStage` a model was loaded as (`load(pipeline=True)`)."""
    stage = getattr(model, "pipeline_stage", None)
    if stage is None:
        raise OverspillError("this model was not loaded with pipeline=True")
    return stage

