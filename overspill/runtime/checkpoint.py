"""Reading weights: safetensors checkpoints (mmap, tensor by tensor) and seeded random weights.

Both sources fill a destination tensor in place (`fill(name, out)`), so each tensor goes straight
from the file into its tier (a GPU tensor or a view of a pinned layer buffer) with at most one
tensor of temporary host memory.

A checkpoint's keys need not be the model's parameter names: transformers 5 renames some on load
(GPT-NeoX's `embed_out` is the model's `lm_head`) and fuses per-expert MoE matrices into one tensor
(`experts.gate_up_proj` of shape [E, 2I, H]). `CheckpointReader.bind` asks transformers' own
conversion mapping, the one `from_pretrained` applies, what each key becomes.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import OverspillError, one_line

CHUNK_ELEMENTS = 1 << 24  # random-weight scratch: 64 MiB of float32 at most, inside the workspace a plan keeps free
INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file or shards with an index).

    Every file is opened (its header parsed, its data mapped) up front, so a truncated or missing
    shard fails at once with a one-line error instead of after minutes of placing weights.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self.aliases: dict[str, str] = {}  # model name -> the checkpoint key holding it (renamed or tied)
        self._fused: dict[str, _Fused] = {}  # model name -> per-expert checkpoint keys to stack
        try:
            self.key_to_file = self._index()
        except BaseException:
            self.close()
            raise

    def _index(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.exists():
            key_to_file = _read_index(index)
            for file in sorted(set(key_to_file.values())):
                self._handle(file)
            return key_to_file
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise OverspillError(
                f"no *.safetensors weights in {self.directory}; pass a checkpoint directory, a .gguf "
                f"file, or --random-weights to build the model from its config"
            )
        return {key: f.name for f in files for key in self._handle(f.name).keys()}

    def _handle(self, file: str):
        if file not in self._handles:
            path = self.directory / file
            if not path.is_file():
                raise OverspillError(f"{file}, listed in {INDEX_FILE}, is missing from {self.directory}: download it again")
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except (SafetensorError, OSError) as exc:
                raise self._corrupt(file, exc) from None
        return self._handles[file]

    def _corrupt(self, file: str, exc: BaseException) -> OverspillError:
        return OverspillError(f"{file} in {self.directory} is truncated or corrupt ({one_line(exc)}): download it again")

    def close(self) -> None:
        self._stack.close()

    def _get(self, key: str) -> torch.Tensor:
        file = self.key_to_file[key]
        try:
            return self._handle(file).get_tensor(key)
        except SafetensorError as exc:
            raise self._corrupt(file, exc) from None

    def bind(self, model: torch.nn.Module) -> None:
        """Learn the model's names for this checkpoint's tensors: transformers' renames and fused
        experts (what `from_pretrained` would do), and tied parameters, either of which may be stored."""
        conversion = _Conversion.of(model)
        experts: dict[str, dict[str, dict[int, str]]] = {}  # fused name -> source pattern -> expert -> key
        for key in self._bind_keys():
            name, pattern = conversion.rename(key)
            if pattern is not None:
                experts.setdefault(name, {}).setdefault(pattern, {})[conversion.expert_index(key, pattern)] = key
            elif name != key:
                self.aliases.setdefault(name, key)
        self._fused.update({name: conversion.fused(parts) for name, parts in experts.items()})
        for name, shared in tied_parameters(model).items():
            self.aliases.setdefault(name, shared)
            self.aliases.setdefault(shared, name)

    def _bind_keys(self):
        """The keys `bind` maps onto the model's names (a quantized checkpoint adds its weights' own names)."""
        return self.key_to_file

    def _candidates(self, name: str) -> list[str]:
        return [name] + ([self.aliases[name]] if name in self.aliases else [])

    def has(self, name: str) -> bool:
        return any(c in self.key_to_file for c in self._candidates(name)) or name in self._fused

    def fill(self, name: str, out: torch.Tensor) -> None:
        """Copy the checkpoint tensor for model parameter `name` into `out` (any device, cast to its dtype)."""
        for cand in self._candidates(name):
            if cand in self.key_to_file:
                self._copy(cand, self._get(cand), out)
                return
        fused = self._fused.get(name)
        if fused is None:
            raise OverspillError(f"checkpoint in {self.directory} has no tensor for {name}")
        if fused.problem:
            raise OverspillError(f"cannot build {name} from the checkpoint in {self.directory}: {fused.problem}")
        if len(fused.experts) != out.shape[0]:
            raise self._mismatch(f"{name} (per-expert tensors)", (len(fused.experts),), tuple(out.shape))
        for e, keys in enumerate(fused.experts):
            row = 0
            for key in keys:  # transformers' Concatenate(dim=1) of the stacked parts, one expert at a time
                src = self._get(key)
                self._copy(key, src, out[e, row : row + src.shape[0]])
                row += src.shape[0]
            if row != out.shape[1]:
                raise self._mismatch(f"{name} (expert {e})", (row,), tuple(out.shape[1:2]))

    def _copy(self, key: str, src: torch.Tensor, out: torch.Tensor) -> None:
        if tuple(src.shape) != tuple(out.shape):
            raise self._mismatch(key, tuple(src.shape), tuple(out.shape))
        out.copy_(src)

    def _mismatch(self, key: str, got: tuple, want: tuple) -> OverspillError:
        return OverspillError(
            f"checkpoint tensor {key} has shape {got}, the model expects {want}: "
            f"config.json does not match the weights in {self.directory}"
        )


def _read_index(index: Path) -> dict[str, str]:
    """The index's key -> shard file map, or a one-line error for a broken index."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a JSON {type(weight_map).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OverspillError(
            f"{index.name} in {index.parent} is not a valid index ({one_line(exc)}): download it again"
        ) from None
    return {str(k): str(v) for k, v in weight_map.items()}


def tied_parameters(model: torch.nn.Module) -> dict[str, str]:
    """{parameter: the parameter it shares storage with}, as transformers ties them: the model's own
    tie map where transformers has one (5.x), else head and embedding when the config ties them."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, Mapping):
        return {str(k): str(v) for k, v in tied.items()}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(head)]}.weight": f"{names[id(embed)]}.weight"}


@dataclass(frozen=True)
class _Fused:
    """A fused expert parameter: for each expert, the checkpoint keys concatenated along its dim 0."""

    experts: tuple[tuple[str, ...], ...]
    problem: str = ""  # why it cannot be built, when transformers' conversion is not a plain stack


@dataclass
class _Conversion:
    """transformers' checkpoint -> model key conversion for one model (identity without one)."""

    rename_key: Callable[[str, bool], tuple[str, str | None]]
    converters: dict[str, object]  # source pattern -> the WeightConverter it belongs to
    plain_stack: Callable[[object], bool]

    @classmethod
    def of(cls, model: torch.nn.Module) -> _Conversion:
        try:  # transformers 5: the mapping `from_pretrained` applies (absent before 5.0)
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, rename_source_key
        except ImportError:
            return cls(lambda key, convert=True: (key, None), {}, lambda converter: False)
        try:
            transforms = get_model_conversion_mapping(model)
        except Exception as exc:  # e.g. conflicting fused modules: this transformers cannot load the model either
            raise OverspillError(
                f"transformers cannot map checkpoint keys onto {type(model).__name__} ({one_line(exc)}): "
                f"try another transformers version"
            ) from None
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        names = dict.fromkeys(model.state_dict(), True)  # what the model calls its tensors, tied ones included
        prefix = getattr(model, "base_model_prefix", None)

        def rename_key(key: str, convert: bool = True) -> tuple[str, str | None]:
            if key in names:  # as from_pretrained: a key the model already has keeps its name
                return key, None
            return rename_source_key(key, renamings, converters if convert else [], prefix, names)

        def plain_stack(converter) -> bool:
            ops = converter.operations
            merge = len(ops) >= 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
            concat = len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1
            return merge and (len(ops) == 1 or concat)

        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        return cls(rename_key, by_pattern, plain_stack)

    def rename(self, key: str) -> tuple[str, str | None]:
        """(model name, the converter source pattern that matched or None) for checkpoint `key`."""
        return self.rename_key(key, True)

    def expert_index(self, key: str, pattern: str) -> int:
        """The expert number `*` stands for in `pattern` (e.g. `.experts.*.w1.weight`); -1 if none."""
        renamed, _ = self.rename_key(key, False)
        match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
        return int(match.group(1)) if match and match.groups() else -1

    def fused(self, parts: dict[str, dict[int, str]]) -> _Fused:
        """How to build a fused parameter from its per-expert keys (source pattern -> expert -> key),
        or why overspill cannot."""
        converter = self.converters[next(iter(parts))]
        if not self.plain_stack(converter):
            ops = ", ".join(type(op).__name__ for op in converter.operations)
            return _Fused((), f"transformers converts it with {ops}, which overspill does not apply")
        experts = sorted({e for by_expert in parts.values() for e in by_expert})
        if -1 in experts:
            return _Fused((), "its checkpoint keys do not number the experts as transformers' conversion expects")
        missing = [p for p in converter.source_patterns if set(parts.get(p, {})) != set(experts)]
        if missing:
            return _Fused((), f"the checkpoint lacks {', '.join(missing)} for some of its {len(experts)} experts")
        return _Fused(tuple(tuple(parts[p][e] for p in converter.source_patterns) for e in experts))


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
        # Drawn in chunks of rows of the last dimension with one seed each: bounded scratch memory (a
        # 128k-vocab head would otherwise need a 4 GB float32 temporary; one of Mixtral's experts, a row
        # of [experts, rows, cols], 470 MB on a GPU whose budget is full) and the same values wherever
        # `out` lives.
        base = self.seed * 1_000_003 + zlib.crc32(name.encode())
        flat = out.view(-1, out.shape[-1]) if out.dim() > 1 else out.view(1, -1)
        rows = max(1, CHUNK_ELEMENTS // max(flat.shape[1], 1))
        for i, start in enumerate(range(0, flat.shape[0], rows)):
            chunk = flat[start : start + rows]
            gen = torch.Generator(device=self.device).manual_seed(base + i)
            values = torch.randn(chunk.shape, generator=gen, device=self.device, dtype=torch.float32)
            chunk.copy_(values.mul_(self.std))
