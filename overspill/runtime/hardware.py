"""Measurements of the machine: `probe()` returns the `Profile` the planner plans for.

This is the only planning code that touches the device. Each measurement is small and direct
(a copy, a matrix product, a tiny model's decode loop), so the whole probe takes about 10 s and is
cached per GPU, driver and torch version.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..planning.profile import Profile


def measure_h2d(device: torch.device, nbytes: int = 1 << 30, iters: int = 10, pinned: bool = True) -> float:
    """Bytes per second of host->device copies from pinned (or pageable) memory, median of `iters`."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for i in range(iters + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=pinned)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return nbytes / times[len(times) // 2]


def machine_facts() -> dict:
    """What a benchmark JSON records about the machine it ran on."""
    import os
    import platform

    facts = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        facts["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            driver=_driver_version(),
        )
    return facts


def _driver_version() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def host_available_bytes() -> int:
    """Memory the OS will give this process: MemAvailable, capped by a cgroup limit if one is set."""
    available = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
        if limit != "max":
            room = int(limit) - used
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    if available is None:
        import os

        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return available


def coherent_platform(device_index: int = 0) -> bool:
    """True when the GPU reads pageable host memory through the host's page tables (GH200/GB200)."""
    from . import cuda_driver

    return bool(cuda_driver.device_attribute(device_index, cuda_driver.PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES))


def disable_cudnn_sdpa() -> bool:
    """Turn PyTorch's cuDNN attention backend off process-wide; returns whether it was on.

    On the lent H100 cuDNN SDPA blocked the host ~1 ms per call at decode, which delayed the ring's
    copies (copy engine 91% busy instead of 99.98%) and halved resident decode speed; the flash and
    memory-efficient kernels run instead. `load` calls this for the process (unless asked to keep
    cuDNN); `probe` calls it only while timing dispatch, then restores the setting.
    """
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    return was


def _time_cuda(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_d2h(device: torch.device, nbytes: int = 256 << 20, iters: int = 8) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return nbytes / _time_cuda(lambda: dst.copy_(src, non_blocking=True), iters)


def measure_hbm(device: torch.device, nbytes: int = 1 << 30, iters: int = 8) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time_cuda(lambda: dst.copy_(src), iters)


def measure_matmul(device: torch.device, n: int = 8192, iters: int = 6) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / _time_cuda(lambda: a @ b, iters)


def measure_mapped(device: torch.device, nbytes: int = 256 << 20) -> float:
    """A GPU kernel reading CUDA managed memory in place (advised to the host, mapped for the GPU):
    the speed of the "mapped" streaming mode. 0.0 where it cannot run (no cuda-bindings, no
    managed memory): never preferred then. The buffer is far inside the free memory `probe` checked."""
    try:
        from .managed import ManagedMemory

        memory = ManagedMemory(device)
    except Exception:  # noqa: BLE001 - optional measurement
        return 0.0
    try:
        buf = memory.tensor(nbytes)
        buf.fill_(1)
        memory.advise_host_home(buf)
        memory.prefetch(buf, host=True, stream=torch.cuda.current_stream(device))
        torch.cuda.synchronize(device)
        words = buf.view(torch.int32)
        return nbytes / _time_cuda(lambda: words.sum(), 3)
    except Exception:  # noqa: BLE001
        return 0.0
    finally:
        torch.cuda.synchronize(device)
        memory.free()


def measure_zero_copy(device: torch.device, nbytes: int = 256 << 20) -> float | None:
    """GPU kernel reading pinned host memory in place (UVA); None if Triton cannot run here."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _read(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    host = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=True).fill_(1.0)
    out = torch.empty(nbytes // 4, dtype=torch.float32, device=device)

    class _HostPtr:  # Triton takes any object with data_ptr(); UVA makes the host pointer valid on the GPU
        dtype = torch.float32

        def data_ptr(self) -> int:
            return host.data_ptr()

    block = 4096
    grid = (triton.cdiv(host.numel(), block),)
    try:
        seconds = _time_cuda(lambda: _read[grid](_HostPtr(), out, host.numel(), BLOCK=block), 5)
    except Exception:
        return None
    return nbytes / seconds if bool(out[:1024].eq(1.0).all()) else None


def host_rank_fields(device: torch.device | None) -> dict:
    """The `Profile` fields of the host as a CPU rank (`host_probe.measure`: per dtype and thread
    count, then the chosen thread count while the link copies)."""
    import os

    from .host_probe import measure

    rank = measure(device, len(os.sched_getaffinity(0)))
    return dict(cpu_gemv_params_s=rank.gemv_params_s, cpu_threads=rank.threads,
                cpu_gemv_alone_params_s=rank.gemv_alone_params_s, cpu_gemm_flops_s=rank.gemm_flops_s,
                host_read_bytes_s=rank.read_bytes_s, cpu_join_s=rank.join_s,
                cpu_int8_gemv_params_s=rank.int8_gemv_params_s)


# (hidden, heads, KV heads, intermediate) of the layers the dispatch probe times: Llama-3-8B's, so
# the kernels launched are those of the models users offload. On one H100 host, 256-, 2048- and
# 4096-wide layers cost the same within noise (0.52, 0.58, 0.56 and 0.48 ms per layer,
# bench/results/dispatch-shapes-plan-accuracy-20261125-220117.log); what moves the number is the host:
# a resident 8B decoded at 37 tok/s on one lent machine and 51 on another the same evening.
DISPATCH_LAYER = (4096, 32, 8, 14336)


def measure_dispatch(device: torch.device, short: int = 8, long: int = 40, samples: int = 5,
                     layer_counts: tuple[int, ...] = (1, 2, 4),
                     shape: tuple[int, int, int, int] = DISPATCH_LAYER) -> tuple[float, float]:
    """Host time per decoder layer and per decode step of HF `generate`, from few-layer models.

    At batch 1 a few layers' decode is dispatch cost (an 8B layer reads in ~0.15 ms of HBM time
    what the host needs ~0.8 ms to launch). Timing `short` and `long` generations gives the
    per-token time without prefill and set-up; doing that for several layer counts and fitting a
    line separates the per-layer slope from the per-step intercept (generate loop, sampling,
    masks). Host timings only ever get slower from interference, so each point is the fastest of
    `samples` runs: on the H100 the median of 3 gave 0.88 and 1.27 ms per layer in two probes of
    one day (bench/results/plan-accuracy-20261125-*.json).
    """
    import time

    from transformers import AutoModelForCausalLM, LlamaConfig

    def seconds(model, ids, tokens: int) -> float:
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    hidden, heads, kv_heads, intermediate = shape
    points = []
    for layers in layer_counts:
        config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=1024)
        with torch.device(device):  # initialised in place, in bf16: no host copy, no float32 peak
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        ids = torch.randint(0, 1024, (1, 8), device=device)
        seconds(model, ids, 4)
        per_token = min(seconds(model, ids, long) - seconds(model, ids, short) for _ in range(samples)) / (long - short)
        points.append((layers, per_token))
        del model
    return fit_dispatch(points)


def fit_dispatch(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (seconds per layer, seconds per step) through (layers, seconds per token) points."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = max(sum((x - mean_x) * (y - mean_y) for x, y in points) / var, 0.0) if var else 0.0
    return slope, max(mean_y - slope * mean_x, 0.0)


PROBE_VERSION = 5  # bump when a measurement changes: cached profiles of older probes are re-measured


def measure_lossless_decode(dev: torch.device, elements: int = 64 << 20, iters: int = 5) -> float:
    """nvCOMP ANS decoding the high byte plane of N(0, 0.02) bf16 weights (one coded chunk, as the lossless
    stream format codes them), output bytes/s; 0 where nvCOMP is not installed or the measurement fails,
    which leaves the plan on the H200's prior (`planning.formats.ANS_DECODE_BYTES_S`)."""
    from .lossless_codec import codec_installed, plane_codec

    if not codec_installed():
        return 0.0
    try:
        weights = (torch.randn(elements, device=dev) * 0.02).to(torch.bfloat16)
        high = weights.view(torch.uint8).view(elements, 2)[:, 1].contiguous()  # little-endian: byte 1 is the top
        del weights
        codec = plane_codec(dev)
        coded = codec.encode(high)
        return elements / _time_cuda(lambda: codec.decode(coded, high), iters, warmup=1)  # decodes the same bytes back
    except Exception:  # a probe must not fail a load: the prior stands in
        return 0.0


def profile_key(device: torch.device) -> str:
    return f"{torch.cuda.get_device_name(device)}|{_driver_version()}|torch {torch.__version__}|probe {PROBE_VERSION}"


def probe(refresh: bool = False, device: str | torch.device = "cuda:0", cache: bool = True) -> "Profile":
    """Measure this machine (about 10 s) or return the cached measurement for the same GPU/driver/torch.

    Only this function touches the device for planning; `plan` itself is pure.
    """
    from ..errors import OverspillError
    from ..planning.profile import REFERENCE_PROFILES, Profile
    from .sources import cache_dir

    if not torch.cuda.is_available():
        cpu = REFERENCE_PROFILES["cpu"]
        return Profile(**{**cpu.__dict__, "name": "this machine: CPU only", "host_available_bytes": host_available_bytes(),
                          **host_rank_fields(None), "key": "cpu"})
    dev = torch.device(device)
    key = profile_key(dev)
    path = cache_dir() / "profile.json"
    if cache and not refresh and path.exists():
        try:
            cached = Profile.from_json(path.read_text())
            if cached.key == key:
                free, total = torch.cuda.mem_get_info(dev)
                return Profile(**{**cached.__dict__, "gpu_free_bytes": free, "host_available_bytes": host_available_bytes()})
        except (ValueError, TypeError):
            pass
    free, total = torch.cuda.mem_get_info(dev)
    if free < 3 * 2**30:
        raise OverspillError(f"probe needs ~3 GiB of free GPU memory; {free / 2**30:.1f} GiB free on {dev}")
    cudnn_was_on = disable_cudnn_sdpa()  # dispatch as `load` runs it
    try:
        layer_s, step_s = measure_dispatch(dev)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_was_on)
    profile = Profile(
        name=torch.cuda.get_device_name(dev),
        gpu_total_bytes=total,
        gpu_free_bytes=free,
        host_available_bytes=host_available_bytes(),
        h2d_bytes_s=measure_h2d(dev, nbytes=512 << 20, iters=6),
        d2h_bytes_s=measure_d2h(dev),
        zero_copy_bytes_s=measure_zero_copy(dev),
        hbm_bytes_s=measure_hbm(dev),
        matmul_flops_s=measure_matmul(dev),
        **host_rank_fields(dev),
        layer_overhead_s=layer_s,
        step_overhead_s=step_s,
        coherent=coherent_platform(dev.index or 0),
        key=key,
        managed_bytes_s=measure_mapped(dev),
        lossless_decode_bytes_s=measure_lossless_decode(dev),
    )
    torch.cuda.empty_cache()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(profile.to_json())
    return profile
