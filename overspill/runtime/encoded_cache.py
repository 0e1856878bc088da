"""Encoded streamed layers kept on disk, so the next load of the same checkpoint reads them directly.

Beside the converted-GGUF cache (`sources.cache_dir() / "gguf"`), under `cache_dir() / "encoded"`,
one folder per checkpoint, format, dtype and codec, keyed like the GGUF cache by the files' paths,
sizes and modification times: a changed checkpoint gets a new key. Each layer is one file of its
encoded bytes plus, for lossless (whose size is known only once coded), a small JSON of its planes.
Random-weight models are not cached (drawing them again is faster than reading them).

The cache is written only when the disk has room for twice the plan's encoded bytes (all of them,
decided once per load), so a large model on a small disk loads as before, just without the cache,
and never fills the disk; files are written under a temporary name and renamed, so a killed load
never leaves a half-written layer that a later load would read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .formats import LosslessLayer, LossyLayer, lossy_layout
from .layout import LayerLayout
from .quant import Part
from .sources import cache_dir

VERSION = 3  # bump when the container changes (3: int8 / fp8 scales per group of inputs, not per row)


def cache_folder(weights_dir: Path, fmt: str, dtype: torch.dtype, codec: str) -> Path:
    """The folder for a checkpoint's layers encoded in `fmt` (keyed by its files' paths, sizes and mtimes)."""
    files = sorted(p for p in Path(weights_dir).iterdir() if p.suffix in (".safetensors", ".json"))
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(f"{VERSION}|{stamp}|{fmt}|{dtype}|{codec}".encode()).hexdigest()[:16]
    return cache_dir() / "encoded" / f"{Path(weights_dir).name}-{fmt}-{key}"


class EncodedCache:
    """Reads and writes one checkpoint's encoded layers (`folder` from `cache_folder`)."""

    def __init__(self, folder: Path, fmt: str, total_bytes: int):
        """`total_bytes`: the encoded bytes the plan expects for every layer (writes need twice that free)."""
        self.folder = folder
        self.fmt = fmt
        self.hits = self.writes = 0
        self.writable = _free_bytes(folder) >= 2 * total_bytes

    def _name(self, index: int, layout: LayerLayout) -> str:
        shape = hashlib.sha256(repr(layout.signature).encode()).hexdigest()[:8]
        return f"layer-{index}-{shape}"

    def read(self, index: int, layout: LayerLayout, host) -> tuple[object, torch.Tensor] | None:
        """(encoded layout, host buffer holding its bytes) for layer `index`, or None when not cached.
        `host(nbytes)` allocates the buffer (pinned where a GPU will read it)."""
        base = self.folder / self._name(index, layout)
        data = base.with_suffix(".bin")
        if not data.exists():
            return None
        if self.fmt == "lossless":
            meta = base.with_suffix(".json")
            if not meta.exists():
                return None
            d = json.loads(meta.read_text())
            encoded = LosslessLayer(d["elements"], d["itemsize"], Part(0, tuple(d["low"]), torch.uint8),
                                    tuple(Part(offset, (nbytes,), torch.uint8) for offset, nbytes in d["chunks"]))
        else:
            encoded = lossy_layout(self.fmt, layout)
        if data.stat().st_size != encoded.nbytes:
            return None
        buffer = host(encoded.nbytes)
        with open(data, "rb") as f:
            f.readinto(memoryview(buffer.numpy()))
        self.hits += 1
        return encoded, buffer

    def write(self, index: int, layout: LayerLayout, encoded: LossyLayer | LosslessLayer, buffer: torch.Tensor) -> None:
        """Keep layer `index`'s encoded bytes (when the disk had room for the whole model's)."""
        if not self.writable:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        base = self.folder / self._name(index, layout)
        if isinstance(encoded, LosslessLayer):
            meta = {"elements": encoded.elements, "itemsize": encoded.itemsize, "low": list(encoded.low.shape),
                    "chunks": [[c.offset, c.nbytes] for c in encoded.chunks]}
            _atomic(base.with_suffix(".json"), json.dumps(meta).encode())
        _atomic(base.with_suffix(".bin"), memoryview(buffer.numpy()))
        self.writes += 1


def _free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds `path` (or would: its nearest existing ancestor)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
