"""Measures what the CPU rank plans from: host GEMV/GEMM speed per dtype and thread count, host
memory bandwidth, both while the link copies at full speed (the copy engine reads the same host
DRAM), and the cost of one join.

The old probe (`hardware.measure_cpu_gemv` before probe version 4) printed 8 G params/s on the
H200 host where a careful run measured 44-58: it timed `w @ x` with a 1-D vector, one call of
warm-up, five calls, on whatever thread count torch started with. Here every timing runs the way
the rank runs: `F.linear` on a `[tokens, cols]` activation (the call nn.Linear makes), on a worker
thread that set its own torch thread count, after warm-up calls, median of many;
`bench/cpu_rank.py` prints the old and new forms side by side so the cause can be read off.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch.nn import functional as F

ROWS, COLS = 14336, 4096  # Llama-3-8B's MLP matrix: what a streamed layer's share looks like


def _timed(fn, iters: int, warmup: int) -> float:
    """Median seconds of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def on_threads(threads: int, fn):
    """Run `fn` on a fresh worker thread with `threads` torch threads, as the CPU rank's worker runs;
    torch's thread count is process-wide, so the caller's is put back afterwards."""
    before = torch.get_num_threads()
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        try:
            return pool.submit(fn).result()
        finally:
            torch.set_num_threads(before)


def linear_rate(dtype: torch.dtype, threads: int, tokens: int = 1, rows: int = ROWS, cols: int = COLS,
                iters: int = 20, warmup: int = 3) -> float:
    """Weight parameters per second of `F.linear([tokens, cols], [rows, cols])` on the host (GEMV
    at tokens=1; FLOP/s = 2 x tokens x this)."""
    w = torch.randn(rows, cols).to(dtype)
    x = torch.randn(tokens, cols).to(dtype)
    seconds = on_threads(threads, lambda: _timed(lambda: F.linear(x, w), iters, warmup))
    return rows * cols / seconds


def int8_rate(threads: int, rows: int = ROWS, cols: int = COLS, iters: int = 20, warmup: int = 3) -> float:
    """Weight parameters per second of the CPU rank's int8 GEMV (`host_int8.Int8Linear`'s kernel)."""
    w = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    scales = torch.rand(rows).to(torch.bfloat16)
    x = torch.randn(1, cols).to(torch.bfloat16)
    seconds = on_threads(threads, lambda: _timed(lambda: torch._weight_int8pack_mm(x, w, scales), iters, warmup))
    return rows * cols / seconds


def old_probe_rate(rows: int = ROWS, cols: int = COLS, iters: int = 5) -> float:
    """The probe as it was (1-D `w @ x`, one warm-up call, the process's thread count), kept to
    compare against `linear_rate` in bench/cpu_rank.py."""
    w = torch.randn(rows, cols, dtype=torch.bfloat16)
    x = torch.randn(cols, dtype=torch.bfloat16)
    return rows * cols / _timed(lambda: w @ x, iters, 1)


def host_read_rate(threads: int, nbytes: int = 1 << 30, iters: int = 5) -> float:
    """Host DRAM read bandwidth (bytes/s): a sum over a buffer larger than the caches."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / on_threads(threads, lambda: _timed(lambda: buf.sum(), iters, 1))


class BusyLink:
    """Keeps the host->GPU link copying at full speed on a side stream while the `with` body runs."""

    def __init__(self, device: torch.device, nbytes: int = 256 << 20):
        self.device = device
        self.src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.stream = torch.cuda.Stream(device=device)
        self.copied = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with torch.cuda.stream(self.stream):
            while not self._stop.is_set():
                for _ in range(4):
                    self.dst.copy_(self.src, non_blocking=True)
                self.stream.synchronize()
                self.copied += 4 * self.src.numel()

    def __enter__(self) -> "BusyLink":
        self.start = time.perf_counter()
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes_s = self.copied / (time.perf_counter() - self.start)


def join_seconds(device: torch.device, hidden: int = 4096, iters: int = 50) -> float:
    """One join of the CPU rank without its compute: a [1, hidden] activation to pinned host memory,
    handed to a worker that waits for the copy, and a result copied back and added on the device;
    median wall time with the device synced (the part of a layer the overlap cannot hide)."""
    x = torch.randn(1, hidden, device=device, dtype=torch.bfloat16)
    pool = ThreadPoolExecutor(1)

    def once() -> None:
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        host.copy_(x, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        part = pool.submit(lambda: (event.synchronize(), host.clone())[1]).result()
        (x + part.to(device, non_blocking=True)).sum().item()

    try:
        return _timed(once, iters, 5)
    finally:
        pool.shutdown()


@dataclass(frozen=True)
class HostRank:
    """What the probe hands the planner about the host as a rank."""

    threads: int
    gemv_params_s: float  # bf16 GEMV at `threads`, while the link copies (alone on a CPU-only machine)
    gemv_alone_params_s: float
    gemm_flops_s: float  # bf16 at 64 tokens, while the link copies
    read_bytes_s: float  # host DRAM reads while the link copies
    join_s: float  # one join's fixed cost (0 on a CPU-only machine: nothing moves)
    int8_gemv_params_s: float  # int8 weights (`host_int8`), while the link copies
    table: tuple[tuple[str, int, float], ...]  # (dtype, threads, GEMV params/s alone) as measured


def thread_choices(cores: int) -> tuple[int, ...]:
    """Thread counts worth timing: half the cores, all but four, all but two (the default). Never more: the
    Python thread that launches the GPU's kernels and the CUDA driver's keep a core each, or the worker's
    threads wait on them. Alone, all but one was the fastest, so the probe chose it, but on an H100 host at
    5638238 the 8B CPU rank ran 0.82x plain with 15 of 16 cores' threads, 1.01x with 12 and 0.96x with 8."""
    return tuple(sorted({max(cores // 2, 1), max(cores - 4, 1), max(cores - 2, 1)}))


def measure(device: torch.device | None, cores: int) -> HostRank:
    """Time the host as a rank. On a GPU machine the chosen thread count's GEMV, GEMM and reads are
    timed again while `BusyLink` copies, since those are the speeds a streamed step sees."""
    table = []
    for dtype in (torch.bfloat16, torch.float32):
        for threads in thread_choices(cores):
            table.append((str(dtype).removeprefix("torch."), threads, linear_rate(dtype, threads)))
    bf16 = [(rate, threads) for name, threads, rate in table if name == "bfloat16"]
    alone, threads = max(bf16)
    if device is None or device.type != "cuda":
        return HostRank(threads, alone, alone, 2 * 64 * linear_rate(torch.bfloat16, threads, tokens=64),
                        host_read_rate(threads), 0.0, int8_rate(threads), tuple(table))
    with BusyLink(device):
        gemv = linear_rate(torch.bfloat16, threads)
        gemm = 2 * 64 * linear_rate(torch.bfloat16, threads, tokens=64)
        read = host_read_rate(threads)
        int8 = int8_rate(threads)
    return HostRank(threads, gemv, alone, gemm, read, join_seconds(device), int8, tuple(table))
