"""One rank of a pipeline over layers (issue 18): its span of decoder layers, and what passes between ranks.

Every rank builds the whole HF model on the meta device and runs the model's own forward, so masks,
position ids, rotary embeddings and cache lengths are computed alike everywhere and never sent.
What a rank does not own holds no weights:

- decoder layers of other ranks are `PipelineLayer`s without a block: hidden states pass through
  untouched, and each writes one-element-wide KV into the cache, so the cache's lengths (which positions
  and masks are computed from) stay those of one process;
- on ranks other than 0 the input embedding is a `ZeroEmbedding` and the LM head a `RemoteHead`.

Between ranks, per forward pass (`Links`): rank r > 0 receives the hidden states [batch, tokens,
hidden] before its first layer and sends them after its last; the last rank sends to rank 0, which
applies the final norm and LM head and broadcasts the logits [batch, kept tokens, vocab]. Every rank
then holds the same logits, so `generate` picks the same tokens on every rank and each runs the same
loop (sampling too, when every rank seeds its generator alike). The KV cache of a layer lives on its
rank. Each rank's own span is placed by `overspill.load`'s loader under its own budget
(`planning.pipeline.split_layers` balances the spans), streaming through its own ring and link.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import OverspillError
from ..planning.pipeline import PipelineSplit, RankSpan, global_plan, span_spec, split_layers
from ..planning.plan import Plan, Workload
from ..planning.spec import ModelSpec
from .loader import decoder_layers


class Links:
    """Point-to-point sends and the logits broadcast over the default process group."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.sent = 0  # bytes of hidden states sent by this rank
        self.messages = 0

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        self.dist.send(tensor, dst)
        self.sent += tensor.numel() * tensor.element_size()
        self.messages += 1

    def recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        self.dist.recv(out, src)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        tensor = tensor.contiguous()
        self.dist.broadcast(tensor, src)
        return tensor


class PipelineLayer(nn.Module):
    """A decoder layer's place in the model on one rank: the layer (`block`) where this rank owns it, else
    nothing (hidden states pass through); hidden states received before it and sent after it where a
    span begins or ends (`recv_from` / `send_to`: ranks, or None)."""

    def __init__(self, block: nn.Module | None, index: int, links: Links | None = None,
                 recv_from: int | None = None, send_to: int | None = None, attention_type: Any = None):
        super().__init__()
        self.block = block
        self.index = index
        self.recv_from = recv_from
        self.send_to = send_to
        object.__setattr__(self, "links", links)
        if attention_type is not None:  # models pick each layer's mask by it
            self.attention_type = attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.recv_from is not None:
            hidden_states = self.links.recv(hidden_states, self.recv_from)
        if self.block is not None:
            hidden_states = self.block(hidden_states, *args, **kwargs)
        else:
            self._count_tokens(hidden_states, kwargs)
        if self.send_to is not None:
            self.links.send(hidden_states, self.send_to)
        return hidden_states

    def _count_tokens(self, hidden_states: torch.Tensor, kwargs: dict) -> None:
        """One-element-wide KV for this layer, so the cache's lengths and masks match one process's: one
        head of width 1 per token (transformers 5.17 counts a cache layer holding no elements as empty,
        whatever its shape, and then sizes masks without the padding of earlier tokens)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or not kwargs.get("use_cache", True):
            return
        batch, tokens = hidden_states.shape[:2]
        marks = hidden_states.new_zeros(batch, 1, tokens, 1)
        cache.update(marks, marks, self.index)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self._modules.get("block")
            if block is None:
                raise
            return getattr(block, name)


class ZeroEmbedding(nn.Module):
    """The input embedding on ranks other than 0: zeros of the right shape (rank 0's hidden states replace them)."""

    def __init__(self, hidden: int, dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        self.embedding_dim = hidden
        self.dtype = dtype
        self.padding_idx = padding_idx
        self.weight = None  # holds no table (a tied head on this rank is a `RemoteHead`)
        self.register_buffer("_device", torch.empty(0), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.embedding_dim, dtype=self.dtype, device=self._device.device)


class RemoteHead(nn.Module):
    """The LM head on ranks other than 0: receives rank 0's logits [batch, tokens, vocab]."""

    def __init__(self, vocab: int, links: Links):
        super().__init__()
        self.out_features = vocab
        self.weight = None
        object.__setattr__(self, "links", links)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = hidden_states.new_empty(*hidden_states.shape[:-1], self.out_features)
        return self.links.broadcast(logits, 0)


class BroadcastHead(nn.Module):
    """Rank 0's LM head: computes the logits and broadcasts them to every rank."""

    def __init__(self, head: nn.Module, links: Links):
        super().__init__()
        self.head = head
        object.__setattr__(self, "links", links)

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.links.broadcast(self.head(hidden_states), 0)


@dataclass
class PipelineStage:
    """This process's part of a pipeline: rank, world, device and (once the model is measured) its span."""

    rank: int
    world: int
    device: torch.device
    split: PipelineSplit | None = None
    links: Links | None = None

    @property
    def span(self) -> RankSpan:
        return self.split.spans[self.rank]

    def own_span(self, model: nn.Module, spec: ModelSpec, budget: int | None, workload: Workload, depth: int) -> ModelSpec:
        """Agree on the split with the other ranks (rank 0 decides from every rank's budget), leave only
        this rank's layers, embedding and head to be placed, and return the spec of its span."""
        import torch.distributed as dist

        budgets: list = [None] * self.world
        dist.all_gather_object(budgets, budget)
        decided = [split_layers(spec, budgets, workload, depth) if self.rank == 0 else None]
        dist.broadcast_object_list(decided, 0)
        self.split = decided[0]
        self.links = Links()
        self._stand_ins(model)
        return span_spec(spec, self.span.start, self.span.stop, self.span.ends)

    def global_plan(self, plan: Plan) -> Plan:
        """This rank's span plan over the whole model's layers (`planning.pipeline.global_plan`)."""
        return global_plan(plan, self.span, len(self.model_layers))

    def _stand_ins(self, model: nn.Module) -> None:
        """Replace what this rank does not hold, on the meta model, before anything is placed."""
        path, layers = decoder_layers(model)
        self.layers_path = path
        self.model_layers = layers
        span = self.span
        for i in range(len(layers)):
            if not span.start <= i < span.stop:
                layers[i] = PipelineLayer(None, i, self.links, attention_type=getattr(layers[i], "attention_type", None))
        if not span.ends:
            embed = model.get_input_embeddings()
            cfg = model.config.get_text_config()
            dtype = embed.weight.dtype
            model.set_input_embeddings(ZeroEmbedding(cfg.hidden_size, dtype, getattr(embed, "padding_idx", None)))
            model.set_output_embeddings(RemoteHead(cfg.vocab_size, self.links))

    def install(self, model: nn.Module) -> None:
        """After placement: receive before this rank's first layer, send after its last; rank 0 receives
        the last rank's output at the last layer and broadcasts the logits."""
        model.pipeline_stage = self
        if self.world == 1:
            return
        layers = self.model_layers
        span, last = self.span, self.world - 1
        first, final = span.start, span.stop - 1
        for i in sorted({first, final}):
            recv = self.rank - 1 if i == first and self.rank > 0 else None
            send = (self.rank + 1 if self.rank < last else 0) if i == final else None
            block = layers[i]
            layers[i] = PipelineLayer(block, i, self.links, recv, send, getattr(block, "attention_type", None))
        if self.rank == 0:
            n = len(layers)
            layers[n - 1].recv_from = last  # a stand-in: rank 0 owns no layer of the last rank
            model.set_output_embeddings(BroadcastHead(model.get_output_embeddings(), self.links))


def join(device: str | torch.device | None, plan: Plan | None, cuda_graphs: bool, speculate: str | None,
         cpu_compute: str | float, stream_format: str, moe_streaming: str) -> PipelineStage:
    """This process as a rank of the pipeline torchrun's variables (or `launch.spawn`) describe, on its
    own GPU (cuda:LOCAL_RANK) or the CPU; refuses what does not run in a pipeline yet."""
    import os

    from .launch import init_process_group

    for what, bad in (("a caller's plan", plan is not None), ("cuda_graphs", cuda_graphs),
                      ("speculate", speculate is not None), ("cpu_compute", cpu_compute not in ("off", 0, 0.0)),
                      (f"stream_format={stream_format!r}", stream_format not in ("auto", "bf16", "lossless")),
                      ("moe_streaming='experts'", moe_streaming == "experts")):
        if bad:
            raise OverspillError(f"a pipeline over GPUs does not combine with {what} yet: drop it or run on one GPU")
    rank, world = init_process_group()
    if device is not None and world > 1 and torch.device(device).type == "cuda":
        raise OverspillError(f"a pipeline of {world} ranks puts rank r on cuda:LOCAL_RANK: drop --device {device}")
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and os.environ.get("OVERSPILL_BACKEND", "") != "gloo"
        device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    return PipelineStage(rank, world, torch.device(device))


def rank_summary(stage: PipelineStage, placement) -> str:
    """A rank's placement summary, its first line counting this rank's own layers (the plan lists every
    layer of the model, other ranks' as weightless stand-ins)."""
    span, plan = stage.span, placement.plan
    streamed = len(plan.streamed_layers)
    first = (f"layers {span.start}-{span.stop - 1} on rank {stage.rank} ({placement.device}): "
             f"{span.layers - streamed}/{span.layers} resident, {streamed} streamed from pinned host memory")
    return "\n".join([first] + plan.summary().splitlines()[1:])
