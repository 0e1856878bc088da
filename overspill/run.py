"""`overspill run`: answer one prompt, print the placement and the measured speed."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from .errors import OverspillError
from .planning.units import format_bytes


class TimingStreamer(BaseStreamer):
    """Records when each generated token arrives and optionally prints the text as it grows."""

    def __init__(self, tokenizer=None, echo: bool = True, at_first=None):
        self.tokenizer = tokenizer
        self.echo = echo and tokenizer is not None
        self.at_first = at_first  # called as the first token arrives: counters that then cover decode only
        self.first = None  # what it returned
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._printed = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        if not self.times and self.at_first is not None:
            self.first = self.at_first()
        self.times.append(time.perf_counter())
        self.tokens.extend(value.reshape(-1).tolist())
        if self.echo:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            print(text[self._printed :], end="", flush=True)
            self._printed = len(text)

    def end(self) -> None:
        if self.echo:
            print(flush=True)


@dataclass(frozen=True)
class Timing:
    new_tokens: int
    prefill_seconds: float
    decode_tokens_per_second: float


def timed_generate(model, input_ids: torch.Tensor, max_new_tokens: int, streamer: TimingStreamer, **kwargs) -> Timing:
    """Generation (greedy unless `kwargs` sample: `sampling_options`) with time-to-first-token and steady decode
    speed measured separately."""
    kwargs.setdefault("do_sample", False)
    start = time.perf_counter()
    model.generate(input_ids, max_new_tokens=max_new_tokens, streamer=streamer, **kwargs)
    times = streamer.times
    prefill = times[0] - start if times else float("nan")
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return Timing(len(times), prefill, decode)


def _prompt_ids(tokenizer, prompt: str, chat: bool, vocab: int) -> torch.Tensor:
    """Token ids [1, n] of the prompt; an empty one is refused, as `generate` cannot start from nothing."""
    if tokenizer is None:
        ids = torch.tensor([[b % vocab for b in prompt.encode()]], dtype=torch.long)
    elif chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = enc["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[-1] == 0:
        raise OverspillError("the prompt is empty (no tokens to start from): pass some text with --prompt")
    return ids


def load_options(args: argparse.Namespace) -> dict:
    """`load`'s keywords from `run`'s flags, one place for the single process and each pipeline rank."""
    return dict(
        gpu_memory=args.gpu_memory, dtype=args.dtype, random_weights=args.random_weights, depth=args.depth,
        context=args.context, device=args.device, seed=args.seed, kv_gpu_memory=args.kv_gpu_memory,
        cuda_graphs=getattr(args, "cuda_graphs", False), streaming=getattr(args, "streaming", "auto"),
        speculate=getattr(args, "speculate", None), speculate_tree=getattr(args, "speculate_tree", None),
        stream_format=getattr(args, "stream_format", "auto"),
        cpu_compute=getattr(args, "cpu_compute", "off"), moe_streaming=getattr(args, "moe_streaming", "auto"),
        cpu_compute_format=getattr(args, "cpu_compute_format", "bf16"), cpu_experts=getattr(args, "cpu_experts", "off"),
        layout=getattr(args, "layout", "auto"),
    )


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """Refuse sampling flags `generate` could not honour, in one line naming the flag (the ranges requests to
    the server get: `serving.requests.sampling_fault`)."""
    from .serving.requests import sampling_fault

    fault = sampling_fault(temperature, top_p)
    if fault is not None:
        field, reason = fault
        raise OverspillError(f"--{field.replace('_', '-')}: {reason}")
    if top_k < 0:
        raise OverspillError(f"--top-k must be 0 (no limit) or more, got {top_k}")


def sampling_options(args: argparse.Namespace) -> dict:
    """`generate`'s sampling keywords from `run`'s flags: greedy at --temperature 0, else sampled with --top-p and
    --top-k as given (not the generation config's: a run says what it samples with)."""
    temperature = getattr(args, "temperature", 0.0)
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": getattr(args, "top_p", 1.0),
            "top_k": getattr(args, "top_k", 0)}


def generate_as_flagged(model, tokenizer, ids: torch.Tensor, args: argparse.Namespace,
                        streamer: TimingStreamer) -> Timing:
    """`run`'s generation, for the one process and each pipeline rank alike: the tokenizer's pad id, and the
    flags' sampling seeded by --seed (so every rank samples the shared logits alike)."""
    pad = getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0
    torch.manual_seed(args.seed)
    return timed_generate(model, ids, args.max_new_tokens, streamer, attention_mask=torch.ones_like(ids),
                          pad_token_id=pad, **sampling_options(args))


def check_context(prompt: int | None, new_tokens: int, context: int) -> None:
    """Refuse a prompt plus --max-new-tokens longer than the planned context: past it, KV outgrows what the
    plan reserved. `prompt` None: not tokenized yet (before loading), so at least one token."""
    if (prompt or 1) + new_tokens > context:
        tokens = "at least 1 token" if prompt is None else f"{prompt} tokens"
        raise OverspillError(f"the prompt ({tokens}) plus --max-new-tokens {new_tokens} is more than the "
                             f"{context}-token context the plan reserved KV for: pass a larger --context, or "
                             "fewer tokens")


def check_positions(model, prompt: int, new_tokens: int) -> None:
    """Refuse a prompt plus --max-new-tokens past a learned position table (GPT-2, OPT: `max_position_embeddings`
    rows), which generating past would fail inside torch's embedding lookup. Rotary models compute positions
    past it (transformers warns there).

    Raises:
        OverspillError: a model with a learned position table and too many tokens for it."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(limit, int) or prompt + new_tokens <= limit:
        return
    inputs = model.get_input_embeddings()
    if any(isinstance(m, torch.nn.Embedding) and m is not inputs and limit <= m.num_embeddings <= limit + 2
           for m in model.modules()):  # a row per position (OPT keeps 2 more)
        raise OverspillError(f"the prompt ({prompt} tokens) plus --max-new-tokens {new_tokens} is more than the "
                             f"{limit} positions this model's position table has: pass a shorter --prompt or fewer "
                             "--max-new-tokens")


def run(args: argparse.Namespace) -> None:
    from .api import load, placement_of

    if args.context > 0:  # before minutes of loading (`load` refuses a context below 1)
        check_context(None, args.max_new_tokens, args.context)
    if not torch.cuda.is_available():
        print("no CUDA device found: running on the CPU (the same streaming ring, with host copies)")
    model, tokenizer = load(args.model, **load_options(args))
    placement = placement_of(model)
    print(placement.summary())
    if args.max_new_tokens < 1:
        return
    vocab = model.config.get_text_config().vocab_size
    ids = _prompt_ids(tokenizer, args.prompt, not args.no_chat_template, vocab).to(placement.device)
    check_context(ids.shape[-1], args.max_new_tokens, placement.plan.workload.context)
    check_positions(model, ids.shape[-1], args.max_new_tokens)
    if tokenizer is None:
        print("(no tokenizer for this model: the prompt is sent as byte ids and token ids are printed)")
    if args.random_weights:  # the speed is the model's; the text is noise
        print("(--random-weights: the weights are seeded random numbers, so the answer is meaningless text)")
    print(f"\n> {args.prompt}")
    from .runtime.routing import ExpertCounters

    streamer = TimingStreamer(tokenizer, at_first=lambda: ExpertCounters.of(model))
    timing = generate_as_flagged(model, tokenizer, ids, args, streamer)
    if tokenizer is None:
        print(streamer.tokens)
    link = placement.plan.streamed_bytes_per_step
    line = (
        f"\n{timing.new_tokens} tokens; prefill {timing.prefill_seconds * 1e3:.0f} ms; "
        f"decode {timing.decode_tokens_per_second:.2f} tok/s on {placement.device}"
    )
    if link:
        line += f"; {format_bytes(link)} over the link per token = {link * timing.decode_tokens_per_second / 1e9:.1f} GB/s"
    print(line)
    if streamer.first is not None:
        experts_line(model, streamer.first, timing.new_tokens - 1)
    stats = getattr(model, "speculation_stats", None)
    if stats is not None and stats.passes:
        shape = f"trees of up to {stats.tree} tokens, last budget {stats.budgets[-1]}; " if stats.budgets else ""
        print(f"speculation ({getattr(args, 'speculate', None)}): {shape}{stats.tokens_per_pass:.2f} tokens per verify "
              f"pass, {stats.accepted}/{stats.drafted} drafted tokens accepted, drafting {stats.draft_share:.0%} of "
              "decode time")


def experts_line(model, start, steps: int) -> None:
    """One line after decoding an expert-streamed model: the cache's hit rate and link bytes per token,
    measured against the plan's uniform routing prior and the same plan re-predicted from measured routing."""
    from .runtime.routing import decode_traffic

    t = decode_traffic(model, start, steps)
    if t is None:
        return
    tok_s = f" ({t.predicted_tok_s:.2f} tok/s)" if t.predicted_tok_s else ""
    print(f"expert routing: {t.hit_rate:.0%} cache hits in decode; link bytes per token "
          f"{format_bytes(t.measured)} measured, {format_bytes(t.planned)} planned (uniform routing), {format_bytes(t.predicted)}{tok_s} re-predicted "
          "from measured routing")
