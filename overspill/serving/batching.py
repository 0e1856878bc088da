"""`Batch`, what the engine decodes through, and `DecodeBatch`: the running sequences' KV in one
left-padded cache, so one pass serves them all.

When weights stream over the link, a pass over the layers costs about the same for 1 sequence as
for 64, so the engine decodes every running sequence in one forward call. Sequences join after
their own (chunked, batch-1) prefill and leave when they finish, at different lengths; their KV is
kept right-aligned in one transformers `DynamicCache`:

    row 0:  . . k k k k k      `valid[b, j]` marks real tokens; attention masks the padding,
    row 1:  k k k k k k k      and each row's position id is its own count of real tokens,
    row 2:  . . . . . k k      so RoPE and outputs match the sequence decoded alone.

Joining pads the shorter side on the left; leaving selects the remaining rows and drops leading
columns that became padding in every row. Columns are aligned in time (every row advances one
column per step), so a sliding-window layer, which keeps only its last `window - 1` columns,
stays exact too: it holds the last columns of the same global timeline, and its
`cumulative_length` is the batch's width, which is what transformers' masks count from. Caches
of other layer types (host-tier KV) cannot be padded like this (`mergeable`) and run one
sequence at a time. `graph_batch.GraphedBatch` is the other kind: static buffers, steps replayed
as CUDA graphs.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..runtime.drafts import drop_last

_PADDABLE = (DynamicLayer, DynamicSlidingWindowLayer)


class Batch(Protocol):
    """The running sequences' KV and their decode step. `rows` holds the caller's per-sequence
    objects, in row order; a row's KV columns are time-aligned with every other row's."""

    rows: list[Any]

    def __len__(self) -> int: ...

    def held_tokens(self) -> int:
        """KV columns the running rows hold, padding included."""

    def join(self, rows: list[Any], cache: Any, valid: torch.Tensor) -> None:
        """Add prefilled sequences: `cache` holds their KV, `valid` [len(rows), tokens] marks real tokens."""

    def keep(self, keep_rows: list[int]) -> None:
        """Keep only these rows, in this order, and free the others' KV."""

    def decode(self, next_tokens: list[int]) -> torch.Tensor:
        """One step for every row, fed its next token: float32 logits [rows, vocab]."""

    def warm_up(self) -> None:
        """Prepare before serving (capture graphs), so that no request waits on it later."""


Forward = Callable[..., torch.Tensor]  # (input_ids, cache, **inputs) -> last-position logits, as `Runner.forward`


def mergeable(cache: Any) -> bool:
    """True when `cache` is a plain dynamic cache of full or sliding-window layers (left padding is exact)."""
    return type(cache) is DynamicCache and all(type(layer) in _PADDABLE for layer in cache.layers)


def _kept(layer: Any, width: int) -> int:
    """Columns a layer stores when the batch is `width` columns wide."""
    return min(width, layer.sliding_window - 1) if isinstance(layer, DynamicSlidingWindowLayer) else width


def _set_width(layer: Any, width: int) -> None:
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = width


class DecodeBatch:
    """A `Batch` of rows sharing one dynamic cache, each step one eager `forward` pass."""

    def __init__(self, device: torch.device, forward: Forward) -> None:
        self.device, self.forward = device, forward
        self.rows: list[Any] = []
        self.cache: Any = None
        self.valid: torch.Tensor | None = None  # bool [rows, cached tokens]

    def __len__(self) -> int:
        return len(self.rows)

    def held_tokens(self) -> int:
        """KV columns the running rows hold, padding included."""
        return self.valid.numel() if self.valid is not None else 0

    @torch.inference_mode()
    def join(self, rows: list[Any], cache: Any, valid: torch.Tensor) -> None:
        """Add prefilled sequences: `cache` holds their KV, `valid` [len(rows), tokens] marks real tokens."""
        valid = valid.to(device=self.device, dtype=torch.bool)
        if not self.rows:
            self.rows, self.cache, self.valid = list(rows), cache, valid
            return
        if not (mergeable(self.cache) and mergeable(cache)):
            raise ValueError("only plain full-attention dynamic caches can share a batch")
        have, new = self.valid.shape[1], valid.shape[1]
        width = max(have, new)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            kept = _kept(mine, width)
            a, b = kept - mine.keys.shape[-2], kept - theirs.keys.shape[-2]
            mine.keys = torch.cat([_left_pad(mine.keys, a), _left_pad(theirs.keys, b)])
            mine.values = torch.cat([_left_pad(mine.values, a), _left_pad(theirs.values, b)])
            _set_width(mine, width)
        self.valid = torch.cat([_left_pad_mask(self.valid, width - have), _left_pad_mask(valid, width - new)])
        self.rows.extend(rows)

    @torch.inference_mode()
    def keep(self, keep_rows: list[int]) -> None:
        """Keep only these rows (in this order); frees the others' KV and trims all-padding columns."""
        if len(keep_rows) == len(self.rows):
            return
        if not keep_rows:
            self.rows, self.cache, self.valid = [], None, None
            return
        self.rows = [self.rows[i] for i in keep_rows]
        index = torch.tensor(keep_rows, device=self.device)
        valid = self.valid.index_select(0, index)
        start = int(valid.any(0).to(torch.int8).argmax())  # first column some row still uses
        self.valid = valid[:, start:]
        width = self.valid.shape[1]
        for layer in self.cache.layers:
            drop = layer.keys.shape[-2] - _kept(layer, width)
            layer.keys = layer.keys.index_select(0, index)[:, :, drop:].contiguous()
            layer.values = layer.values.index_select(0, index)[:, :, drop:].contiguous()
            _set_width(layer, width)

    def warm_up(self) -> None:
        """Nothing to capture: each step runs eagerly."""

    @torch.inference_mode()
    def decode(self, next_tokens: list[int]) -> torch.Tensor:
        inputs = self.step_inputs(next_tokens)
        return self.forward(inputs.pop("input_ids"), self.cache, **inputs)

    def step_inputs(self, next_tokens: list[int]) -> dict[str, torch.Tensor]:
        """Forward kwargs for one decode step: each row's next token, the padding mask, positions."""
        new = torch.ones((len(self.rows), 1), dtype=torch.bool, device=self.device)
        self.valid = torch.cat([self.valid, new], 1)
        positions = self.valid.sum(1, keepdim=True) - 1  # [rows, 1]: real tokens before this one
        return {
            "input_ids": torch.tensor(next_tokens, device=self.device).unsqueeze(1),
            "attention_mask": self.valid.long(),
            "position_ids": positions,
        }


    def chain_inputs(self, tokens: list[int]) -> dict[str, torch.Tensor]:
        """Forward kwargs for one pass over several tokens of the batch's only row (a speculative
        verify): the row's last token and its drafts, at the positions that follow its real tokens."""
        if len(self.rows) != 1:
            raise ValueError(f"a chain is verified for one sequence, the batch holds {len(self.rows)}")
        start = int(self.valid.sum())
        self.valid = torch.cat([self.valid, torch.ones((1, len(tokens)), dtype=torch.bool, device=self.device)], 1)
        return {
            "input_ids": torch.tensor([tokens], device=self.device),
            "attention_mask": self.valid.long(),
            "position_ids": torch.arange(start, start + len(tokens), device=self.device)[None],
        }

    @torch.inference_mode()
    def drop_last(self, columns: int) -> None:
        """Forget the last `columns` KV columns of every row (rejected drafts)."""
        if columns > 0:
            drop_last(self.cache, columns)
            self.valid = self.valid[:, :-columns]


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """[batch, heads, tokens, dim] with `n` zero tokens in front."""
    return F.pad(t, (0, 0, n, 0)) if n else t


def _left_pad_mask(m: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(m, (n, 0), value=False) if n else m
