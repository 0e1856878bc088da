"""The engine's model runner: everything that touches torch, the model or the device.

It builds caches, runs prefill passes, owns the decode batch (a `Batch`: `DecodeBatch`, or
`GraphedBatch` when the model was loaded with CUDA graphs), samples tokens and moves prefix-pool
bytes. It decides nothing about requests: `scheduler.Scheduler` does, and `engine.Engine` joins
the two (cf. nano-vllm's `model_runner.py`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from ..planning.kvblocks import KVBlockManager
from ..planning.spec import kv_bytes_per_token
from ..runtime.kv import TieredCache, cache_kwarg, kv_dims
from ..runtime.prefix import Lease, PrefixCache
from ..runtime.speculative import _croppable
from ..runtime.token_serial import serial_tokens
from ..runtime.trees import DraftTree, TreePass, keep_path, verify_tree
from .batching import Batch, DecodeBatch, mergeable
from .graph_batch import GraphedBatch
from .scheduler import Sequence
from .sampling import TokenLogprob, logprob_rows, new_generator, sample_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prefilled:
    """Prompts whose KV is computed: their cache, the real tokens in it, and last-position logits."""

    cache: Any
    valid: torch.Tensor  # bool [rows, tokens]; rows are left-padded
    logits: torch.Tensor  # float32 [rows, vocab]


class Runner:
    """Runs `model` (from `overspill.load`) for one engine.

    Args:
        model: the placed model.
        max_batch: sequences decoded together; None: the batch the plan reserved KV for.
        prefix: a pool of earlier prompts' KV to restore from and store into.
        kv_capacity_tokens: the engine's KV capacity where it was given one (a graphed batch, whose static KV
            holds full-context rows, is capped at the rows it holds; default: the plan's rows).
    """

    def __init__(self, model, max_batch: int | None = None, prefix: PrefixCache | None = None,
                 kv_capacity_tokens: int | None = None):
        self.model, self.prefix = model, prefix
        param = next(model.parameters())
        self.device = param.device
        head = model.get_output_embeddings()  # where the logits are made: requests' generators draw there
        weight = getattr(head, "weight", None)
        self.logits_device = weight.device if isinstance(weight, torch.Tensor) and not weight.is_meta else self.device
        self.placement = getattr(model, "overspill", None)
        plan = self.placement.plan if self.placement is not None else None
        workload = plan.workload if plan is not None else None
        text = model.config.get_text_config()
        self.context = workload.context if workload is not None else text.max_position_embeddings
        # full-context sequences the plan reserved KV for under a GPU budget or a KV cap (None: neither)
        planned = plan is not None and (plan.budget_bytes is not None or plan.kv_device_bytes is not None)
        self.planned_rows = workload.batch if planned else None
        self.max_batch = max_batch or (workload.batch if workload is not None else 1)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {self.max_batch}")
        self.batching_note = None
        self.blocks: KVBlockManager | None = None  # the engine's (`share_blocks`): host-tier KV layers count there
        batchable = mergeable(self.new_cache())
        if self.max_batch > 1 and not batchable:
            self.batching_note = ("the plan keeps some layers' KV in host memory (a TieredCache), which cannot "
                                  "be batched yet: requests run one at a time; give the KV more GPU memory "
                                  "(--kv-gpu-memory) or lower --max-batch / --context to batch them")
            self.max_batch = 1
        self.vocab_size = text.vocab_size
        self.token_bytes = self._kv_bytes_per_token(param.element_size())
        self._cache_key = cache_kwarg(model)
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        graphed = getattr(self.placement, "graphs", None)
        if graphed is not None and batchable:  # the model was loaded with cuda_graphs
            rows = self.planned_rows if kv_capacity_tokens is None else max(1, kv_capacity_tokens // self.context)
            if rows is not None and self.max_batch > rows:  # its static KV holds full-context rows
                requests = f"{rows} request{'s' if rows > 1 else ''}"
                self.batching_note = (f"CUDA graphs decode over a static KV cache of {self.context} tokens a row and "
                                      f"the KV reserved holds {rows} such rows: at most {requests} decode together; "
                                      f"drop --cuda-graphs to share that KV among {self.max_batch} shorter ones")
                self.max_batch = rows
            self.batch: Batch = GraphedBatch(model, self.placement, graphed, self.max_batch, self.context)
        else:
            self.batch = DecodeBatch(self.device, self.forward)

    def new_cache(self) -> Any:
        """The plan's cache for one sequence (a `TieredCache` with host-KV layers), else a dynamic one."""
        cache = self.placement.new_cache(self.model.config, blocks=self.blocks) if self.placement is not None else None
        return cache if cache is not None else DynamicCache(config=self.model.config)

    def share_blocks(self, blocks: KVBlockManager) -> int:
        """Count the host-tier KV layers of the caches made from now on in `blocks`, the engine's manager.
        Returns the HOST_LAYER blocks `max_batch` such caches hold at capacity (0 with no host-tier layers)."""
        self.blocks = blocks
        cache = self.new_cache()
        return self.max_batch * cache.max_host_blocks(blocks.block_tokens) if isinstance(cache, TieredCache) else 0

    def new_generator(self, seed: int | None) -> torch.Generator:
        """A request's generator on the device its logits are sampled on, as `generate` samples."""
        return new_generator(seed, self.logits_device)

    def forward(self, input_ids: torch.Tensor, cache: Any, **inputs: torch.Tensor) -> torch.Tensor:
        """Last-position logits [batch, vocab] in float32 of one pass that extends `cache`."""
        if self._keep_last:
            inputs["logits_to_keep"] = 1
        return self.model(input_ids=input_ids, use_cache=True, **{self._cache_key: cache}, **inputs).logits[:, -1].float()

    def can_verify(self) -> bool:
        """The batch can take a pass over several tokens of one row and drop the rejected ones again:
        an eager batch (a graphed one replays one-token steps) whose cache crops."""
        batch = self.batch
        return isinstance(batch, DecodeBatch) and len(batch) == 1 and _croppable(batch.cache)

    @torch.inference_mode()
    def verify(self, tokens: list[int], serial: bool) -> torch.Tensor:
        """One pass over `tokens` (the only row's last token and its drafts) into the batch's cache:
        float32 logits [len(tokens), vocab]. `serial` runs each layer once per token, plain decoding's
        arithmetic (`runtime.token_serial`), so greedy choices match one-token steps exactly."""
        inputs = self.batch.chain_inputs(tokens)
        if self._keep_last:
            inputs["logits_to_keep"] = len(tokens)
        with serial_tokens(self.model) if serial and len(tokens) > 1 else contextlib.nullcontext():
            out = self.model(use_cache=True, **{self._cache_key: self.batch.cache}, **inputs)
        return out.logits[0, -len(tokens):].float()

    @torch.inference_mode()
    def verify_tree(self, root: int, tree: DraftTree, serial: bool) -> TreePass:
        """One pass over the only row's last token `root` and a draft tree in `preorder`
        (`runtime.trees.verify_tree`); the row must hold no padding, which the tree mask does not hide."""
        root_ids = torch.tensor([root], device=self.device)
        return verify_tree(self.model, self.batch.cache, self._cache_key, root_ids, tree, serial)

    @torch.inference_mode()
    def keep_path(self, tree_pass: TreePass, path: list[int]) -> None:
        """Leave the batch's cache holding what it held before `tree_pass`, its root and `path`'s nodes."""
        keep_path(self.batch.cache, tree_pass, path)
        valid = self.batch.valid
        self.batch.valid = torch.cat([valid, valid.new_ones((1, 1 + len(path)))], 1)

    @torch.inference_mode()
    def prefill_group(self, prompts: list[tuple[int, ...]], width: int) -> Prefilled:
        """Whole prompts together, left-padded to `width`, in one pass into a new cache."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        valid = torch.arange(width, device=self.device) >= (width - lengths)[:, None]  # [rows, width]
        ids = torch.tensor([(0,) * (width - len(p)) + p for p in prompts], device=self.device)
        cache = self.new_cache()
        mask = valid.long()
        logits = self.forward(ids, cache, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        return Prefilled(cache, valid, logits)

    @torch.inference_mode()
    def prefill_chunk(self, cache: Any, chunk: tuple[int, ...], end: int) -> Prefilled:
        """The next `chunk` of one prompt into its own batch-1 cache, which then holds `end` tokens."""
        logits = self.forward(torch.tensor([chunk], device=self.device), cache)
        return Prefilled(cache, torch.ones((1, end), dtype=torch.bool), logits)

    def look_up(self, prompt: tuple[int, ...], restore: bool) -> tuple[Lease | None, Any]:
        """Hold `prompt`'s cached leading blocks in the prefix pool; with `restore`, copy them into a new
        cache. Returns (lease, cache); (None, None) when the pool cannot serve it (the request computes it all).

        Raises: whatever making the cache raises (the request fails)."""
        cache = self.new_cache() if restore else None
        try:
            return self.prefix.start(list(prompt), cache), cache
        except Exception:  # e.g. pool blocks all held by prompts in prefill, or no device memory to restore into
            return None, None

    @torch.inference_mode()
    def store_prefix(self, lease: Lease, cache: Any, prompt: tuple[int, ...], row: int, width: int) -> None:
        """Store a prefilled prompt's new full blocks (row `row` of a cache `width` columns wide) and release
        its lease; storing is an optimisation, so a failure only forgets the blocks."""
        try:
            self.prefix.finish(lease, cache, list(prompt), row, offset=width - len(prompt))
        except Exception:
            self.prefix.abort(lease)

    @torch.inference_mode()
    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int | Exception]:
        """One token per row of logits [rows, vocab] (the step's one host sync); a row that fails gets its exception."""
        return sample_rows(logits, [seq.request for seq in seqs], [seq.generator for seq in seqs])

    @torch.inference_mode()
    def logprobs(self, seqs: list[Sequence], logits: torch.Tensor,
                 tokens: list[int | Exception]) -> list[TokenLogprob | None | Exception]:
        """Each sampled token's log-probability and alternatives, for the rows that asked."""
        return logprob_rows(logits, tokens, [seq.request for seq in seqs])

    def clear_batch(self) -> None:
        """Drop every row of the batch; the engine thread must live on even if that fails."""
        try:
            self.batch.keep([])
        except Exception:  # noqa: BLE001 - queued requests wait for the thread
            log.exception("clearing the decode batch failed; dropping its rows")
            self.batch.rows = []

    def _kv_bytes_per_token(self, dtype_bytes: int) -> tuple[int, int]:
        """KV bytes per token of the device-tier and host-tier layers."""
        layers, kv_heads, head_dim = kv_dims(self.model.config)
        per_layer = kv_bytes_per_token(self.model.config.get_text_config().to_dict(), dtype_bytes, kv_heads, head_dim)
        host = len(self.placement.plan.kv_host_layers) if self.placement is not None else 0
        return per_layer * (layers - host), per_layer * host
