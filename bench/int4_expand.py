"""How long int4 expansion takes for one Llama-3-8B layer: the torch path against the Triton kernel.

Issue 15: int4 streaming reached 0.54 of its link floor on the H100 because expanding a layer with torch
ops took 3.6 ms beside 2.1 ms of link. For each of the layer's seven matrices (random N(0, 0.02) weights,
encoded on the device as the loader does) this times `quant._expand_int4_torch` (with the scratch the plan
keeps) and `runtime.int4_kernel` into the compute dtype, CUDA events, the median of `--repeats` calls after
`--warmup`; then the whole layer (the seven back to back) the same way. Recorded per matrix and for the
layer: ms of each path, the HBM GB/s that is (codes, scales and zeros read plus the output written, over
the time), `bitwise_equal` (torch.equal of the two outputs) and the layer's `speedup_vs_torch`.

    python bench/int4_expand.py --out bench/results      # GPU
    python bench/int4_expand.py --smoke                  # tiny shapes on the CPU, torch path only: checks the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import provenance  # noqa: E402 - after the path

# Llama-3-8B's layer: [out, in] of each matrix (218M parameters)
LAYER = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
         "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}
SMOKE_DIVISOR = 32  # --smoke: every side 32 times smaller (groups of 128 and 64 still divide)


def shapes(smoke: bool) -> dict[str, tuple[int, int]]:
    return {name: (r // SMOKE_DIVISOR, c // SMOKE_DIVISOR) if smoke else (r, c) for name, (r, c) in LAYER.items()}


def median_ms(fn, device, repeats: int, warmup: int) -> float:
    """The median time of one call of `fn`: CUDA events on a GPU, the wall clock on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="compute dtype")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per path (the median is kept)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (the Triton compile among them)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, torch path only (checks the script)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for the JSON record")
    args = p.parse_args()

    import torch

    from overspill.planning.formats import expand_scratch_bytes
    from overspill.runtime import int4_kernel, quant
    from overspill.runtime.hardware import machine_facts

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = getattr(torch, args.dtype)
    use_triton = device.type == "cuda"
    kernel = int4_kernel.build() if use_triton else None  # raises here, not silently, if Triton cannot run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    machine = machine_facts()
    machine["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    record = {**provenance.header("int4_expand", stamp, machine), "device": str(device), "smoke": args.smoke,
              "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup, "triton": use_triton}

    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in shapes(args.smoke).items():
        w = (torch.randn(shape, generator=gen) * 0.02).to(dtype=torch.bfloat16, device=device)
        parts = [torch.empty(s, dtype=d, device=device) for s, d in quant.part_shapes("int4", shape)]
        quant.encode("int4", w, parts)
        weights[name] = parts
    layer_bytes = sum(r * c for r, c in shapes(args.smoke).values()) * dtype.itemsize
    scratch = torch.empty(expand_scratch_bytes("int4", layer_bytes, dtype.itemsize), dtype=torch.uint8, device=device)
    outs = {name: (torch.empty(s, dtype=dtype, device=device), torch.empty(s, dtype=dtype, device=device))
            for name, s in shapes(args.smoke).items()}

    def torch_path(name: str) -> None:
        quant._expand_int4_torch(*weights[name], outs[name][0], scratch)

    def triton_path(name: str) -> None:
        assert int4_kernel.launch(kernel, *weights[name], outs[name][1]), f"the kernel refused {name}"

    def moved(names) -> int:  # bytes read (codes, scales, zeros) and written (the output)
        return sum(sum(t.nbytes for t in weights[n]) + outs[n][0].nbytes for n in names)

    def timing(fn, names) -> float:
        return median_ms(lambda: [fn(n) for n in names], device, args.repeats, args.warmup)

    rows = []
    for name, shape in shapes(args.smoke).items():
        row = {"name": name, "shape": list(shape), "bytes": moved([name]), "torch_ms": timing(torch_path, [name])}
        if use_triton:
            row["triton_ms"] = timing(triton_path, [name])
            row["bitwise_equal"] = torch.equal(outs[name][0], outs[name][1])
        else:
            row["triton_ms"] = row["bitwise_equal"] = None
        rows.append(row)
    names = list(LAYER)
    layer = {"bytes": moved(names), "torch_ms": timing(torch_path, names),
             "triton_ms": timing(triton_path, names) if use_triton else None}
    layer["sum_of_matrices_torch_ms"] = sum(r["torch_ms"] for r in rows)
    layer["sum_of_matrices_triton_ms"] = sum(r["triton_ms"] for r in rows) if use_triton else None
    for entry in (*rows, layer):
        for path in ("torch", "triton"):
            ms = entry[f"{path}_ms"]
            entry[f"{path}_gb_s"] = entry["bytes"] / ms / 1e6 if ms else None
    record.update(matrices=rows, layer=layer, bitwise_equal=all(r["bitwise_equal"] for r in rows) if use_triton else None,
                  speedup_vs_torch=layer["torch_ms"] / layer["triton_ms"] if use_triton else None)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"int4-expand-{stamp}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"{'matrix':<6} {'shape':>12} {'torch ms':>9} {'GB/s':>6} {'triton ms':>9} {'GB/s':>6}  equal")
    for r in (*rows, {**layer, "name": "layer", "shape": ["7", "matrices"], "bitwise_equal": record["bitwise_equal"]}):
        tri = f"{r['triton_ms']:9.3f} {r['triton_gb_s']:6.1f}" if r["triton_ms"] else f"{'-':>9} {'-':>6}"
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['name']:<6} {shape:>12} {r['torch_ms']:9.3f} {r['torch_gb_s']:6.1f} {tri}  {r['bitwise_equal']}")
    if use_triton:
        print(f"speedup vs torch: {record['speedup_vs_torch']:.2f}x")
    print(path)


if __name__ == "__main__":
    main()
