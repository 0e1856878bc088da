"""`Profile`: the measured machine the planner plans for. Pure data, no torch.

`hardware.probe()` measures one and caches it as JSON; `REFERENCE_PROFILES` are synthetic
machines for planning on a host without a GPU and for scenario tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

GiB = 2**30


@dataclass(frozen=True)
class Profile:
    """What the cost model needs to know about a machine. Bandwidths in bytes/s, rates per second."""

    name: str
    gpu_total_bytes: int
    gpu_free_bytes: int
    host_available_bytes: int
    h2d_bytes_s: float  # pinned host -> GPU copy
    d2h_bytes_s: float  # GPU -> pinned host copy
    zero_copy_bytes_s: float | None  # GPU kernels reading mapped host memory
    hbm_bytes_s: float  # device memory, bytes read + written per second by a large copy
    matmul_flops_s: float  # dense bf16 matrix product
    cpu_gemv_params_s: float  # host bf16 matrix-vector product, parameters per second
    layer_overhead_s: float  # host time to dispatch one decoder layer at decode (HF eager)
    step_overhead_s: float  # host time per decode step outside the layers (generate loop, sampling)
    coherent: bool  # GPU reads pageable host memory through host page tables (GH200 NVLink-C2C)
    key: str = ""  # GPU, driver and torch version: a different key invalidates a cached profile
    managed_bytes_s: float = 0.0  # GPU reading managed memory in place, "mapped" (0: not measured, never preferred)
    # The host as a CPU rank (`runtime.host_probe`): bf16 rates at `cpu_threads` while the link copies
    # (cpu_gemv_params_s above), 0 where not measured.
    cpu_threads: int = 0
    cpu_gemv_alone_params_s: float = 0.0
    cpu_gemm_flops_s: float = 0.0  # bf16 at 64 tokens
    host_read_bytes_s: float = 0.0
    cpu_join_s: float = 0.0  # one join's fixed cost (activation out, partial back)
    cpu_int8_gemv_params_s: float = 0.0  # int8 host weights (`runtime.host_int8`)
    lossless_decode_bytes_s: float = 0.0  # nvCOMP ANS decode of a bf16 high byte plane, output bytes/s (0: not measured)

    @property
    def managed_wins(self) -> bool:
        """Managed memory read in place measured faster than pinned copies (`placement.choose_streaming`)."""
        return self.managed_bytes_s > self.h2d_bytes_s

    def auto_budget(self, margin_bytes: int) -> int:
        """The "auto" GPU budget on this machine: free memory less `margin_bytes` (`placement.AUTO_MARGIN_BYTES`)."""
        return max(self.gpu_free_bytes - margin_bytes, 0)

    @property
    def decode_bytes_s(self) -> float:
        """The lossless codec's decode rate the plan uses: this machine's where the probe measured it, else
        the H200's (`planning.formats.ANS_DECODE_BYTES_S`)."""
        from .formats import ANS_DECODE_BYTES_S

        return self.lossless_decode_bytes_s or ANS_DECODE_BYTES_S

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> str:
        gpu = [  # a CPU-only profile has no GPU to describe (its matmul rate is a placeholder, not a reading)
            f"GPU memory: {self.gpu_free_bytes / GiB:.1f} GiB free of {self.gpu_total_bytes / GiB:.1f} GiB",
            f"host memory available: {self.host_available_bytes / GiB:.1f} GiB",
            f"host->GPU pinned: {_gbs(self.h2d_bytes_s)}, GPU->host pinned: {_gbs(self.d2h_bytes_s)}, "
            f"zero-copy read: {_gbs(self.zero_copy_bytes_s)}, managed read in place: "
            f"{_gbs(self.managed_bytes_s) if self.managed_bytes_s else 'not measured'}",
            f"HBM copy: {_gbs(self.hbm_bytes_s)}, bf16 matmul: {self.matmul_flops_s / 1e12:.0f} TFLOP/s",
        ] if self.gpu_total_bytes else [f"no GPU; host memory available: {self.host_available_bytes / GiB:.1f} GiB"]
        return "\n".join([
            f"device: {self.name}{' (coherent host memory)' if self.coherent else ''}",
            *gpu,
            self._host_rank_line(),
            f"host dispatch at decode: {self.layer_overhead_s * 1e3:.2f} ms per layer + "
            f"{self.step_overhead_s * 1e3:.2f} ms per step",
            f"lossless decode (nvCOMP ANS, bf16 high plane): "
            f"{_gbs(self.lossless_decode_bytes_s) if self.lossless_decode_bytes_s else 'not measured'}",
        ])

    def _host_rank_line(self) -> str:
        """The host as a rank: its GEMV, and where it was probed as one, threads, GEMM and reads (beside a GPU,
        while the link copies, and a join's cost)."""
        line = f"host bf16 GEMV: {self.cpu_gemv_params_s / 1e9:.1f} G params/s"
        if not self.cpu_threads:
            return line
        line += f" on {self.cpu_threads} thread{'s' * (self.cpu_threads != 1)}"
        if self.gpu_total_bytes:
            line += f" while the link copies (alone {self.cpu_gemv_alone_params_s / 1e9:.1f})"
        line += (f", GEMM at 64 tokens {self.cpu_gemm_flops_s / 1e12:.2f} TFLOP/s, host reads "
                 f"{_gbs(self.host_read_bytes_s)}")
        if self.gpu_total_bytes:
            line += f", join {self.cpu_join_s * 1e6:.0f} us"
        return line


def _gbs(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e9:.1f} GB/s"


_H100_PCIE5 = Profile(
    name="reference: H100 80GB, PCIe Gen5 host link",
    gpu_total_bytes=80 * GiB, gpu_free_bytes=79 * GiB, host_available_bytes=120 * GiB,
    h2d_bytes_s=54e9, d2h_bytes_s=54e9, zero_copy_bytes_s=50e9, hbm_bytes_s=3.0e12, matmul_flops_s=780e12,
    cpu_gemv_params_s=38e9, layer_overhead_s=0.9e-3, step_overhead_s=4e-3, coherent=False, key="reference-h100",
)

REFERENCE_PROFILES: dict[str, Profile] = {
    "h100-pcie5": _H100_PCIE5,
    "a100-pcie4": replace(
        _H100_PCIE5, name="reference: A100 80GB, PCIe Gen4 host link", h2d_bytes_s=25e9, d2h_bytes_s=25e9,
        zero_copy_bytes_s=22e9, hbm_bytes_s=1.6e12, matmul_flops_s=300e12, key="reference-a100",
    ),
    "gh200": replace(
        _H100_PCIE5, name="reference: GH200 96GB, NVLink-C2C", gpu_total_bytes=96 * GiB, gpu_free_bytes=95 * GiB,
        host_available_bytes=460 * GiB, h2d_bytes_s=400e9, d2h_bytes_s=400e9, zero_copy_bytes_s=450e9,
        hbm_bytes_s=3.6e12, cpu_gemv_params_s=150e9, coherent=True, key="reference-gh200",
    ),
    "cpu": replace(
        _H100_PCIE5, name="reference: CPU only", gpu_total_bytes=0, gpu_free_bytes=0, h2d_bytes_s=0.0,
        d2h_bytes_s=0.0, zero_copy_bytes_s=None, hbm_bytes_s=0.0, matmul_flops_s=1e12, key="reference-cpu",
    ),
}
