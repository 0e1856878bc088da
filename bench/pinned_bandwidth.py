"""Host->GPU copy bandwidth by host allocation kind, at the size of one streamed layer.

    python bench/pinned_bandwidth.py --mib 436
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from overspill.runtime.layout import pinned_bytes  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=436)
    args = p.parse_args()
    n = args.mib * 2**20
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    sources = {
        "cudaHostRegister": pinned_bytes(n),
        "torch pin_memory": torch.empty(n, dtype=torch.uint8, pin_memory=True),
        "pageable": torch.empty(n, dtype=torch.uint8),
    }
    side = torch.cuda.Stream(priority=-1)
    for name, src in sources.items():
        src.fill_(3)
        for label, stream in (("default stream", torch.cuda.current_stream()), ("side stream", side)):
            times = []
            for _ in range(8):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(stream):
                    a.record()
                    dst.copy_(src, non_blocking=True)
                    b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            times.sort()
            print(f"{name:18s} {label:15s} {n / times[len(times) // 2] / 1e9:6.1f} GB/s (median of 8, {args.mib} MiB)")


if __name__ == "__main__":
    main()
