"""Reading weights: safetensors checkpoints (mmap, tensor by tensor) and seeded random weights.

Both sources fill a destination tensor in place (`fill(name, out)`), so each tensor goes straight
from the file into its tier (a GPU tensor or a view of a pinned layer buffer) with at most one
tensor of temporary host memory.

transformers 5 fuses MoE experts (`experts.gate_up_proj` of shape [E, 2I, H]) while checkpoints keep
one matrix per expert; `_EXPERT_RULES` rebuilds the fused tensors from the per-expert keys the
way transformers' own conversion mapping does for Mixtral and Qwen-MoE checkpoints.
"""

from __future__ import annotations

import json
import re
import zlib
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import OverspillError

# model key suffix -> (checkpoint per-expert names concatenated along dim 0 of each expert)
_EXPERT_RULES: dict[str, tuple[tuple[str, ...], ...]] = {
    "experts.gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
    "experts.down_proj": (("w2",), ("down_proj",)),
}
_RENAMES = ((".mlp.", ".block_sparse_moe."),)
CHUNK_ELEMENTS = 1 << 26  # random-weight scratch: 256 MB of float32 at most


class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file or shards with an index), opened lazily."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self.key_to_file: dict[str, str] = {}
        self.aliases: dict[str, str] = {}  # tied parameters: a checkpoint may store either name
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            self.key_to_file = dict(json.loads(index.read_text())["weight_map"])
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise OverspillError(
                    f"no *.safetensors weights in {self.directory}; pass a checkpoint directory, a .gguf "
                    f"file, or --random-weights to build the model from its config"
                )
            for f in files:
                for key in self._handle(f.name).keys():
                    self.key_to_file[key] = f.name

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(
                safe_open(str(self.directory / file), framework="pt", device="cpu")
            )
        return self._handles[file]

    def close(self) -> None:
        self._stack.close()

    def _get(self, key: str) -> torch.Tensor:
        return self._handle(self.key_to_file[key]).get_tensor(key)

    def _candidates(self, name: str) -> list[str]:
        names = [name] + ([self.aliases[name]] if name in self.aliases else [])
        for new, old in _RENAMES:
            if new in name:
                names.append(name.replace(new, old))
        return names

    def has(self, name: str) -> bool:
        return any(c in self.key_to_file for c in self._candidates(name)) or self._expert_source(name) is not None

    def _expert_source(self, name: str) -> tuple[str, tuple[str, ...], int] | None:
        for suffix, alternatives in _EXPERT_RULES.items():
            if not name.endswith(suffix):
                continue
            base = name.rsplit(".", 1)[0] + "."
            for cand in self._candidates(base):
                for parts in alternatives:
                    pattern = re.compile(re.escape(cand) + r"(\d+)\." + re.escape(parts[0]) + r"\.weight$")
                    experts = [int(m.group(1)) for k in self.key_to_file if (m := pattern.match(k))]
                    if experts:
                        return cand, parts, max(experts) + 1
        return None

    def fill(self, name: str, out: torch.Tensor) -> None:
        """Copy the checkpoint tensor for model parameter `name` into `out` (any device, cast to its dtype)."""
        for cand in self._candidates(name):
            if cand in self.key_to_file:
                src = self._get(cand)
                if tuple(src.shape) != tuple(out.shape):
                    raise OverspillError(
                        f"checkpoint tensor {cand} has shape {tuple(src.shape)}, the model expects "
                        f"{tuple(out.shape)}: config.json does not match the weights in {self.directory}"
                    )
                out.copy_(src)
                return
        source = self._expert_source(name)
        if source is None:
            raise OverspillError(f"checkpoint in {self.directory} has no tensor for {name}")
        base, parts, n_experts = source
        for e in range(n_experts):
            row = 0
            for part in parts:
                src = self._get(f"{base}{e}.{part}.weight")
                out[e, row : row + src.shape[0]].copy_(src)
                row += src.shape[0]


class RandomWeights:
    """Seeded random weights, identical for a given name and seed wherever the tensor lives.

    Values are drawn on the GPU when there is one (fast for full-size shapes) and on the host
    otherwise; norms start at one and biases at zero, like transformers' own initialisation.
    """

    def __init__(self, seed: int = 0, std: float = 0.02, device: torch.device | None = None):
        self.seed = seed
        self.std = std
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def has(self, name: str) -> bool:
        return True

    def fill(self, name: str, out: torch.Tensor) -> None:
        leaf = name.rsplit(".", 1)[-1]
        if out.dim() == 1 and ("norm" in name or "ln" in name):
            out.fill_(1.0)
            return
        if leaf == "bias":
            out.zero_()
            return
        # Drawn in chunks of rows with one seed each: bounded scratch memory (a 128k-vocab head
        # would otherwise need a 4 GB float32 temporary) and the same values wherever `out` lives.
        base = self.seed * 1_000_003 + zlib.crc32(name.encode())
        flat = out.view(out.shape[0], -1) if out.dim() > 1 else out.view(1, -1)
        rows = max(1, CHUNK_ELEMENTS // max(flat.shape[1], 1))
        for i, start in enumerate(range(0, flat.shape[0], rows)):
            chunk = flat[start : start + rows]
            gen = torch.Generator(device=self.device).manual_seed(base + i)
            values = torch.randn(chunk.shape, generator=gen, device=self.device, dtype=torch.float32)
            chunk.copy_(values.mul_(self.std))
