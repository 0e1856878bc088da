"""`overspill` command line: the argument parser and one dispatcher over each action's `main(args)`
(in `overspill.commands`)."""

from __future__ import annotations

import argparse
import os
import sys

from . import commands
from .errors import OverspillError
from .planning.configs import shipped_names
from .planning.host_experts import CPU_EXPERTS
from .planning.moe import MOE_STREAMING
from .planning.placement import AUTO_MARGIN_BYTES, ENGINE_PREFILL_CHUNK, LAYOUTS
from .planning.plan import DEFAULT_CONTEXT, DEFAULT_DEPTH, STREAMING
from .planning.spec import DEFAULT_DTYPE
from .planning.speculation import ASSUMED_ACCEPTANCE, SOURCES
from .planning.trees import ASSUMED_RANKS, ASSUMED_SIBLING_SHARE
from .planning.units import format_bytes
from .runtime import launch
from .serving.defaults import (
    DEFAULT_HOST, DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY, DEFAULT_MAX_CHAIN, DEFAULT_MAX_NEW_TOKENS_LIMIT,
    DEFAULT_MAX_QUEUE, DEFAULT_PORT,
)

DEFAULT_PROMPT = "What is the highest mountain in the world?"


LAYOUT_HELP = ("which layers stream: prefix (the first ones), spread (evenly among the resident ones, so the ring's "
               "copies run beside resident layers; host-tier KV keeps the prefix) or auto (default: spread with "
               "--speculate, where a verify pass runs each resident layer once a drafted token; else prefix).")


def _add_model_args(p: argparse.ArgumentParser, model_option: bool = False) -> None:
    """The model and placement flags; `model_option` makes MODEL a --model option (for commands whose
    positionals are files, where an optional positional first would be ambiguous)."""
    names, optional = (["--model"], {}) if model_option else (["model"], {"nargs": "?"})
    p.add_argument(
        *names, **optional, default=None, metavar="MODEL",
        help="checkpoint directory, Hugging Face id already in the local cache, .gguf file, or shipped "
        f"config name ({', '.join(shipped_names())}; needs --random-weights). "
        "Default: the embedded SmolLM2-135M-Instruct.",
    )
    p.add_argument(
        "--gpu-memory", default="auto",
        help="GPU memory the model may use, e.g. 6GiB, 12GB, a byte count, or 'auto' (free memory minus "
        "a margin). Layers that do not fit stream from pinned host memory. Default: auto.",
    )
    p.add_argument("--dtype", default="auto", help=f"weight/compute dtype: auto (default: {DEFAULT_DTYPE} on a GPU, float32 "
                   "on the CPU, where bf16 math is ~13x slower without native support), bfloat16, float16 or float32.")
    p.add_argument(
        "--random-weights", action="store_true",
        help="build the model from its config with seeded random weights (benchmark full-size shapes without a checkpoint).",
    )
    p.add_argument("--seed", type=int, default=0,
                   help="seed for --random-weights, and for run's sampling (--temperature above 0) (default 0).")
    p.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                   help=f"how many layers ahead the copy stream prefetches (default {DEFAULT_DEPTH}).")
    p.add_argument("--layout", default="auto", choices=list(LAYOUTS),
                   help=LAYOUT_HELP)
    p.add_argument(
        "--context", type=int, default=DEFAULT_CONTEXT,
        help=f"longest sequence (prompt + new tokens) to reserve KV-cache room for in the GPU budget (default {DEFAULT_CONTEXT}).",
    )
    p.add_argument(
        "--kv-gpu-memory", default=None, metavar="SIZE",
        help="device memory the KV cache may use, e.g. 2GiB; layers whose KV does not fit keep it in pinned "
        "host memory and stream it with their layer. Default: KV stays on the GPU unless even streaming "
        "every layer leaves no room for it.",
    )
    p.add_argument(
        "--streaming", default="auto", choices=list(STREAMING),
        help="how streamed layers reach the GPU: copy (pinned host memory into GPU ring slots), managed "
        "(CUDA managed memory, prefetched ahead and evicted after use), mapped (managed memory the GPU reads "
        "in place over the link); managed and mapped need cuda-bindings and, on a PCIe GPU, fit in half its "
        "free memory. auto (default): mapped where the probe measured it faster than copies, else copy.",
    )
    _add_stream_format_arg(p)
    _add_cpu_compute_arg(p)
    _add_moe_streaming_arg(p)
    _add_cpu_experts_arg(p)
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:1 (default: cuda:0 if present, else cpu).")


def _run_main(args: argparse.Namespace) -> int:
    """`overspill run` with `--gpus N` / `--ranks N` (this process starts the ranks) or under torchrun
    (this process is one); otherwise the one-process `run`."""
    for flag in ("gpus", "ranks"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            raise OverspillError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.max_new_tokens < 0:  # before minutes of loading; 0 is the placement-only run
        raise OverspillError(f"--max-new-tokens must be 0 or more, got {args.max_new_tokens}: pass the number of "
                             "tokens to generate, or 0 to load the model and print its placement only")
    from .run import check_sampling

    check_sampling(args.temperature, args.top_p, args.top_k)  # before minutes of loading
    ranks = max(getattr(args, "gpus", None) or 1, getattr(args, "ranks", None) or 1)
    if launch.world_size() > 1:  # torchrun started this process as one rank
        try:
            _run_rank(args)
        except BaseException:
            try:
                launch.leave(ok=False)
            except Exception:  # noqa: BLE001 - the rank's own error is the one to report
                pass
            raise
        launch.leave()
        return 0
    if ranks == 1:
        return commands.run_main(args)
    _refuse_more_ranks_than_layers(args.model, ranks, "--gpus" if getattr(args, "gpus", None) else "--ranks")
    if getattr(args, "gpus", None):
        import torch

        if not torch.cuda.is_available():
            raise OverspillError(f"--gpus {ranks} needs CUDA GPUs and none is available: on the CPU, --ranks {ranks} "
                                 f"runs the same pipeline in gloo processes")
        launch.spawn(_run_rank, ranks, (args,), backend_name="nccl")
    else:
        launch.spawn(_run_rank, ranks, (args,), backend_name="gloo")
    return 0


def _run_rank(args: argparse.Namespace) -> None:
    """One rank of `overspill run`: load its span (`load(pipeline=True)`), generate like every rank;
    rank 0 prints the split, its placement, the answer and the speed."""
    import torch
    import torch.distributed as dist

    from .api import load
    from .run import TimingStreamer, _prompt_ids, check_context, check_positions, generate_as_flagged, load_options
    from .runtime.loader import placement_of
    from .runtime.pipeline import rank_summary

    torch.manual_seed(args.seed)
    model, tokenizer = load(args.model, **load_options(args), pipeline=True, progress=False)
    stage, placement = launch.model_stage(model), placement_of(model)
    summaries: list = [None] * stage.world
    dist.all_gather_object(summaries, rank_summary(stage, placement))
    lead = stage.rank == 0
    if lead:
        print(stage.split.summary())
        print("\n\n".join(summaries))
    if args.max_new_tokens < 1:
        return
    vocab = model.config.get_text_config().vocab_size
    ids = _prompt_ids(tokenizer, args.prompt, not args.no_chat_template, vocab).to(placement.device)
    check_context(ids.shape[-1], args.max_new_tokens, placement.plan.workload.context)
    check_positions(model, ids.shape[-1], args.max_new_tokens)
    if lead:
        print(f"\n> {args.prompt}")
    streamer = TimingStreamer(tokenizer, echo=lead)
    timing = generate_as_flagged(model, tokenizer, ids, args, streamer)
    streamed: list = [None] * stage.world
    dist.all_gather_object(streamed, placement.plan.streamed_bytes_per_step)
    if not lead:
        return
    if tokenizer is None:
        print(streamer.tokens)
    link = sum(streamed)
    line = (f"\n{timing.new_tokens} tokens; prefill {timing.prefill_seconds * 1e3:.0f} ms; decode "
            f"{timing.decode_tokens_per_second:.2f} tok/s over {stage.world} ranks ({placement.device.type})")
    if link:
        line += (f"; {format_bytes(link)} over {stage.world} links per token = "
                 f"{link * timing.decode_tokens_per_second / 1e9:.1f} GB/s in all")
    print(line, flush=True)


def _add_rank_args(p: argparse.ArgumentParser, runs: bool = True) -> None:
    """--gpus/--ranks: `run` starts a pipeline over them; serve and batch take only 1 (`runs=False`), so that a
    larger N is refused in one line that points at `run` rather than as an unknown flag."""
    if not runs:
        one = "only 1 for now: the engine batches on one device (a pipeline over GPUs runs with `overspill run`)"
        p.add_argument("--gpus", type=int, default=None, metavar="N", help=f"GPUs to run on: {one}.")
        p.add_argument("--ranks", type=int, default=None, metavar="N", help=f"CPU ranks to run as: {one}.")
        return
    p.add_argument(
        "--gpus", type=int, default=None, metavar="N",
        help="run a pipeline over layers on N GPUs of this host (NCCL): each GPU holds a contiguous span of "
        "decoder layers under its own --gpu-memory, streams the rest of its span over its own host link, and "
        "passes hidden states to the next; GPU 0 also holds the embeddings and LM head. Starts N processes; "
        "`torchrun --nproc-per-node N -m overspill run ...` works too. Default: one GPU.",
    )
    p.add_argument("--ranks", type=int, default=None, metavar="N",
                   help="the same pipeline in N CPU processes over gloo (tests and the CPU; no GPU needed). "
                   "Default: one process.")


def _refuse_more_ranks_than_layers(model: str | None, ranks: int, flag: str) -> None:
    """Before any rank starts (spawning 40 on a small host took minutes before the plan refused): each rank
    needs at least one decoder layer. A config without the count is left to the ranks' own refusal."""
    from .runtime.sources import resolve

    try:
        config = resolve(model, config_only=True).config()
    except OverspillError:  # not readable without loading (the embedded model before its conversion): the ranks say
        return
    layers = (config.get("text_config") or config).get("num_hidden_layers") if isinstance(config, dict) else None
    if isinstance(layers, int) and 0 < layers < ranks:
        raise OverspillError(f"{flag} {ranks}: this model has {layers} decoder layers and each rank needs at least "
                             f"one: use at most {layers}")


def _single_rank(func, command: str):
    """`func` after refusing ranks: `command` does not run as a pipeline over GPUs yet."""

    def refuse_ranks(args: argparse.Namespace) -> int:
        ranks = max(args.gpus or 1, args.ranks or 1, launch.world_size())
        if ranks > 1:
            raise OverspillError(f"{command} runs on one GPU for now (its engine batches on one device); "
                                 f"--gpus/--ranks {ranks} work with `overspill run` only")
        return func(args)

    return refuse_ranks


def _add_stream_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stream-format", default="auto", metavar="FORMAT",
        help="how streamed layers travel over the link; each expands into the compute dtype in its GPU slot and "
        "resident layers are unchanged: bf16 (as they are), lossless (byte planes, the exponent plane entropy-"
        "coded: ~0.68 of the bytes, identical tokens; pip install 'overspill[compress]'), int8 or fp8 (1 byte a "
        "weight + a float32 scale per group of 128 inputs; lossy), int4 (0.53 bytes a weight, groups of 128 with zero points; "
        "lossy). auto (default): lossless where the codec is installed and decodes faster than the link, else "
        "bf16; lossy formats only when asked.",
    )


def _add_cpu_compute_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpu-compute", default="off", metavar="MODE",
        help="the host CPU as a second tensor-parallel rank: a fraction of every streamed layer (KV-head groups "
        "and MLP columns) stays in host memory and the host computes it while the GPU computes the rest, so "
        "only the GPU's share crosses the link. auto: where the plan predicts a gain of 5%% or more (small "
        "batches); on: the planner's fraction whatever the gain; a number such as 0.5: that fraction; off "
        "(default). Dense llama/mistral/qwen2/qwen3/phi3/gemma2, bf16 copies, eager decode; serve and batch "
        "run it off (their engine reorders KV rows). `plan --cpu-compute auto` shows the fraction per batch.",
    )
    p.add_argument(
        "--cpu-compute-format", default="bf16", choices=["bf16", "int8"],
        help="how the host keeps and multiplies its share with --cpu-compute: bf16 (default: as loaded, "
        "GPU-only streaming's arithmetic) or int8 (a byte a weight and a scale per output row, in place of the "
        "share: about half its host memory and, where `overspill probe` measured it, a faster host GEMV, so "
        "the planner gives the host a larger share; lossy). Separate from --stream-format, which stays bf16 "
        "under the CPU rank; serve and batch refuse int8 (they run the CPU rank off).",
    )


def _add_cpu_experts_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cpu-experts", default="off", choices=list(CPU_EXPERTS),
        help="under expert streaming, routed experts missing from the GPU cache that the host computes from "
        "its pinned copy instead of copying them (as llama.cpp's --n-cpu-moe): on (every miss once the "
        "cache's free slots are filled), auto (per layer, the misses routed to the fewest tokens while that "
        "shortens the layer at the probed link and host rates), off (default until GPU runs measure it). "
        "Logits move within bf16 noise (the host rounds differently).",
    )


def _add_moe_streaming_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--moe-streaming", default="auto", choices=list(MOE_STREAMING),
        help="how streamed mixture-of-experts layers move: experts (attention, router, norms and shared experts "
        "ride the ring; only the routed experts the batch selects cross the link, into a GPU cache of hot "
        "experts sized from the budget), dense (whole layers), or auto (default): experts where the plan "
        "predicts it faster. Expert streaming copies bf16 from pinned memory and decodes eagerly.",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overspill",
        description="Run Hugging Face causal LMs larger than GPU memory by streaming layers from pinned host memory.",
    )
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run", help="generate from a prompt and report placement and tokens/s",
        description="Load a model under a GPU budget, answer a prompt (through the chat template when the "
        "tokenizer has one), and print the placement and decode speed.",
    )
    _add_model_args(run)
    run.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt (default: {DEFAULT_PROMPT!r}).")
    run.add_argument("--max-new-tokens", type=int, default=64,
                     help="tokens to generate (default 64; 0 loads the model and prints its placement without generating).")
    run.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text, without the chat template.")
    run.add_argument("--temperature", type=float, default=0.0,
                     help="sample at this temperature, seeded by --seed so a run repeats (default 0: greedy, the "
                     "tokens speed runs compare).")
    run.add_argument("--top-p", type=float, default=1.0,
                     help="with --temperature, sample from the smallest set of tokens holding this probability "
                     "(0 < P <= 1; default 1: all).")
    run.add_argument("--top-k", type=int, default=0,
                     help="with --temperature, sample from the K likeliest tokens (default 0: no limit).")
    run.add_argument("--cuda-graphs", action="store_true",
                     help="replay each decode step as a CUDA graph over a static KV cache of --context tokens "
                     "(CUDA only; models with host-tier KV or sliding windows decode eagerly). Default: off.")
    run.add_argument("--speculate", default=None, metavar="SOURCE",
                     help="draft tokens and verify them in one streamed pass: 'ngram' (prompt lookup, no model), "
                     "'self' (the model's own layers in int4, resident, counted in the budget), 'draft:PATH' (a "
                     "small model with the same tokenizer) or 'auto' (ngram where the plan streams, else off). "
                     "Greedy output stays plain greedy's. Default: off.")
    run.add_argument("--speculate-tree", type=int, default=None, metavar="N",
                     help="with --speculate, draft trees of up to N tokens a pass (N >= 2) instead of chains: one "
                     "verify pass holds the draft's alternatives where its first choice may be wrong; the budget "
                     "adapts between 2 and N to the acceptance measured. Greedy output stays plain greedy's. "
                     "Under --cuda-graphs trees run as chains (the plan notes it). Default: chains.")
    _add_rank_args(run)
    run.set_defaults(func=_run_main)
    _add_probe_parser(sub)
    _add_plan_parser(sub)
    _add_serve_parser(sub)
    _add_batch_parser(sub)
    return parser


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags of the engine `serve` and `batch` share."""
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help="sequences decoded together in one pass over the layers; the plan reserves KV room "
                   f"for this many (default {DEFAULT_MAX_BATCH}).")
    p.add_argument("--prefix-cache", default="0", metavar="SIZE",
                   help="pinned host memory for reusing the KV of earlier prompts' shared beginnings (system "
                   "prompts, documents), e.g. 4GiB; a request then computes only what follows its longest "
                   "cached prefix, in blocks of 64 tokens. Full-attention models only. Default 0: off.")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="decode the running batch as CUDA graphs (one per power-of-two batch size) over a static "
                   "KV cache of --max-batch x --context tokens (CUDA only; host-tier KV or sliding windows "
                   "decode eagerly). Default: off.")
    p.add_argument("--speculate", default=None, metavar="SOURCE",
                   help=f"draft tokens with SOURCE ({SOURCES}) and verify them in one streamed pass while a "
                   "single request is running (off while two or more share the pass, which batching fills "
                   "already). A request may ask for it with the extension field \"speculate\": \"ngram\", "
                   "this SOURCE, or \"off\". Greedy output stays the plain server's. Full-attention models, "
                   f"eager decoding (not --cuda-graphs); chains of up to {DEFAULT_MAX_CHAIN} tokens, adapted to "
                   "the acceptance measured per request. Default: off.")
    p.add_argument("--speculate-tree", type=int, default=None, metavar="N",
                   help="with --speculate, draft trees of up to N tokens a pass (N >= 2) instead of chains, for "
                   "every request that drafts: one verify pass holds the draft's alternatives where its first "
                   "choice may be wrong; the budget adapts between 2 and N to the acceptance measured per "
                   "request. Greedy output stays the plain server's. Default: chains.")


def _add_batch_parser(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser(
        "batch", help="run an OpenAI Batch file (JSONL) for throughput",
        description="Run every request of an OpenAI Batch input file, up to --max-batch sequences decoded "
        "together. Input lines: {\"custom_id\": ..., \"method\": \"POST\", \"url\": \"/v1/chat/completions\" "
        "or \"/v1/completions\", \"body\": {...}}. Each body's \"model\" must be the served name, as the "
        "server and OpenAI's batch API check it: the last part of --model when that is a path, the "
        "Hugging Face id or shipped name as given, or SmolLM2-135M-Instruct for the embedded default. Each result is appended to OUTPUT as "
        "{\"id\", \"custom_id\", \"response\": {\"status_code\", \"request_id\", \"body\"}, \"error\": null} "
        "as soon as it finishes, so lines come in completion order. A bad line (malformed JSON, unknown "
        "url, invalid body, unknown model, max_tokens out of range, prompt too long, repeated custom_id) "
        "gets the status and OpenAI error body the server would answer, and the batch goes on. Resumable: "
        "custom_ids already in OUTPUT are skipped (delete a line to run it again). Exits 0 when the file "
        "was processed, whatever each request's status.",
    )
    batch.add_argument("input", metavar="INPUT", help="JSONL file of batch requests, one per line.")
    batch.add_argument("output", metavar="OUTPUT",
                       help="JSONL file of results; created, or appended to when it exists (resume).")
    _add_model_args(batch, model_option=True)
    _add_engine_args(batch)
    batch.add_argument("--max-new-tokens-limit", type=int, default=DEFAULT_MAX_NEW_TOKENS_LIMIT, metavar="N",
                       help="largest max_tokens a request may ask for; chat requests without max_tokens may generate "
                       f"this many, completions without it 16, as at OpenAI (default {DEFAULT_MAX_NEW_TOKENS_LIMIT}).")
    _add_rank_args(batch, runs=False)
    batch.set_defaults(func=_single_rank(commands.batch_main, "batch"))


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Load a model under a GPU budget and serve /v1/chat/completions, /v1/completions, "
        "/v1/models, /health and /metrics. One engine thread owns the model; requests run in FIFO order.",
    )
    _add_model_args(serve)
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help=f"address to bind (default {DEFAULT_HOST}: this machine only).")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT}).")
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 (default: no key).")
    serve.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                       help=f"requests that may wait for the engine; more are answered 429 (default {DEFAULT_MAX_QUEUE}).")
    serve.add_argument("--max-new-tokens-limit", type=int, default=DEFAULT_MAX_NEW_TOKENS_LIMIT, metavar="N",
                       help="largest max_tokens a request may ask for; chat requests without max_tokens may generate "
                       f"this many, completions without it 16, as at OpenAI (default {DEFAULT_MAX_NEW_TOKENS_LIMIT}).")
    serve.add_argument("--max-body-bytes", default=DEFAULT_MAX_BODY, metavar="SIZE",
                       help="largest request body, e.g. 4MiB; a larger one is answered 413 before it is read "
                       f"(default {DEFAULT_MAX_BODY}).")
    _add_engine_args(serve)
    _add_rank_args(serve, runs=False)
    serve.set_defaults(func=_single_rank(commands.serve_main, "serve"))


def _add_probe_parser(sub: argparse._SubParsersAction) -> None:
    probe = sub.add_parser(
        "probe", help="measure this machine (link, HBM, matmul, dispatch) for the planner",
        description="Measure this machine's host->GPU link, HBM, matmul rate, host GEMV and decode dispatch "
        "overhead (about 10 s on a GPU), cache the result per GPU/driver/torch version, and print it. "
        "Without CUDA it prints the CPU-only profile.",
    )
    probe.add_argument("--refresh", action="store_true", help="measure again instead of using the cached profile (default: use the cache).")
    probe.add_argument("--json", action="store_true", help="print the profile as JSON instead of a summary (default: summary).")
    probe.set_defaults(func=commands.probe_main)


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    from .planning.profile import REFERENCE_PROFILES

    plan = sub.add_parser(
        "plan", help="show where each layer would live and the predicted speed, from the config alone",
        description="Plan a model's placement from its config.json alone (no weights, no torch): which "
        "layers stay on the GPU and which stream from pinned host memory, the ring and workspace, and the "
        "cost model's predicted decode/prefill speed, bottleneck and largest batch.",
    )
    plan.add_argument(
        "model", metavar="MODEL", nargs="?", default=None,
        help=f"shipped config name ({', '.join(shipped_names())}), a directory containing config.json, "
        "a config.json path, a .gguf file `run` has converted, or a Hugging Face id whose config.json is already "
        "in the local cache (never downloaded). Default: the embedded model `run` uses, once it has converted it.",
    )
    plan.add_argument(
        "--gpu-memory", default=None, metavar="SIZE",
        help="GPU memory the model may use, e.g. 6GiB, 12GB or a byte count. Default (or 'auto'): the "
        f"profile's free GPU memory minus a {format_bytes(AUTO_MARGIN_BYTES)} margin, as `run` and `serve` do.",
    )
    plan.add_argument("--context", type=int, default=DEFAULT_CONTEXT, metavar="N",
                      help=f"tokens per sequence to reserve KV-cache room for (default {DEFAULT_CONTEXT}).")
    plan.add_argument("--batch", type=int, default=1, metavar="N", help="concurrent sequences to plan and predict for (default 1).")
    plan.add_argument(
        "--kv-gpu-memory", default=None, metavar="SIZE",
        help="device memory the KV cache may use, e.g. 2GiB; layers whose KV does not fit keep it in pinned "
        "host memory and stream it with their layer. Default: KV stays on the GPU unless even streaming "
        "every layer leaves no room for it.",
    )
    plan.add_argument(
        "--host-memory", default=None, metavar="SIZE",
        help="host memory to plan for, e.g. 256GiB: streamed layers, host KV and host embeddings live in pinned "
        "host memory, and a plan that does not fit it is refused, as `load` refuses it. Default: the profile's "
        "(this machine's available memory when probed).",
    )
    plan.add_argument("--depth", type=int, default=DEFAULT_DEPTH, metavar="N",
                      help=f"how many layers ahead the copy stream prefetches; the ring has depth+1 slots, or depth "
                      f"(at least 2) for encoded stream formats, whose copies land in staging buffers (default {DEFAULT_DEPTH}).")
    plan.add_argument("--layout", default="auto", choices=list(LAYOUTS), help=LAYOUT_HELP)
    plan.add_argument(
        "--dtype", default=DEFAULT_DTYPE, metavar="D",
        help=f"weight dtype to size the model in: {DEFAULT_DTYPE} (default; auto means it too: what `run` loads on "
        "a GPU), float16, float32, or float8_e4m3fn/int8 to size a 1-byte checkpoint.",
    )
    plan.add_argument(
        "--profile", default=None, choices=sorted(REFERENCE_PROFILES), metavar="NAME",
        help=f"plan for a reference machine: {', '.join(sorted(REFERENCE_PROFILES))} (cpu has no GPU, so "
        "plan refuses it). Default: this machine's cached probe when it has a CUDA GPU, else h100-pcie5.",
    )
    plan.add_argument(
        "--serve", action="store_true",
        help="plan as `overspill serve --max-batch BATCH` does: the largest batch up to --batch whose KV stays "
        f"on the GPU, with activations reserved for one engine pass (a {ENGINE_PREFILL_CHUNK}-token prefill chunk "
        "or one token per sequence) instead of a whole batch of prompts. Default: plan for `generate`.",
    )
    plan.add_argument(
        "--speculate", default=None, metavar="SOURCE",
        help=f"also forecast speculative decoding with SOURCE ({SOURCES}; 'self': the model placed beside "
        "its int4 draft as `load` places it; or 'auto': ngram where the plan streams over the link, else plain "
        "decoding, as `run --speculate auto` chooses) at batch 1: predicted tok/s against "
        "the drafted chain length, from the plan's predicted pass cost (serial verification adds a decode "
        "step's compute per token), and the best chain. Default: off.",
    )
    plan.add_argument(
        "--acceptance", type=float, default=None, metavar="A",
        help="per-token acceptance the --speculate forecast ASSUMES (the chance a drafted token is the "
        f"target's, given the ones before it were), in [0, 1] (default {ASSUMED_ACCEPTANCE}: ngram on text "
        "that quotes its input, or --rank-acceptance's first value; `overspill run --speculate` measures it).",
    )
    plan.add_argument("--max-chain", type=int, default=DEFAULT_MAX_CHAIN, metavar="K",
                      help=f"longest drafted chain the --speculate forecast considers (default {DEFAULT_MAX_CHAIN}).")
    plan.add_argument("--speculate-tree", type=int, default=None, metavar="N",
                      help="with --speculate, also forecast draft trees of up to N tokens a pass (N >= 2), as `run "
                      "--speculate-tree N` drafts them: one verify pass holds the draft's alternatives where its "
                      "first choice may be wrong. Shows the budget between 2 and N the runtime would choose at the "
                      "planned pass cost, its tokens per pass and tok/s beside a chain of as many tokens. Under "
                      "--cuda-graphs trees run as chains (the forecast notes it). Default: chains only.")
    plan.add_argument("--rank-acceptance", default=None, metavar="A0,A1,...",
                      help="with --speculate-tree, the chance the target's token is the draft's 1st, 2nd, 3rd ... "
                      "choice, which the tree forecast ASSUMES (each in [0, 1], summing to at most 1; the first is "
                      "the chain's --acceptance too). Default: --acceptance for the 1st, and each further choice "
                      f"catching {ASSUMED_SIBLING_SHARE * 100:g}%% of what the ones before it missed, over "
                      f"{ASSUMED_RANKS} choices; `overspill run --speculate-tree` measures them.")
    plan.add_argument("--cuda-graphs", action="store_true",
                      help="plan as a load with --cuda-graphs does: graphed decode steps run transformers' batched_mm "
                      "experts, which copy each sequence's routed experts' weights, so MoE models reserve that "
                      "workspace per sequence. Default: off (eager decoding).")
    _add_stream_format_arg(plan)
    _add_moe_streaming_arg(plan)
    _add_cpu_experts_arg(plan)
    _add_cpu_compute_arg(plan)
    plan.add_argument("--json", action="store_true", help="print one JSON object (model, profile, spec totals, plan, "
                      "and with --speculate its forecast) instead of the table.")
    plan.add_argument("--gpus", type=int, default=None, metavar="N",
                      help="also show the pipeline over N GPUs that `run --gpus N` would start: each GPU's span of "
                      "layers under its own --gpu-memory, bytes over its link and predicted time (balanced on the "
                      "slowest GPU). Default: one GPU.")
    plan.set_defaults(func=_plan_with_gpus)


def _plan_with_gpus(args: argparse.Namespace) -> int:
    """`plan`, then with --gpus N > 1 the pipeline split (`planning.pipeline.comparison_lines`) for the same
    workload, every GPU with the same budget and the profile's link."""
    gpus = 1 if args.gpus is None else args.gpus  # not `or`: 0 is refused, not read as 1
    if gpus < 1:
        raise OverspillError(f"--gpus must be at least 1, got {gpus}")
    if gpus > 1 and args.json:
        raise OverspillError("--gpus with --json is not supported yet: drop one of them")
    if gpus > 1:  # before the one-GPU plan is printed
        _refuse_more_ranks_than_layers(args.model, gpus, "--gpus")
    code = commands.plan_main(args)
    if gpus > 1:
        from .planning.pipeline import comparison_lines
        from .planning.placement import serving_pass_tokens
        from .planning.plan import Workload

        spec = commands._plan_spec(args.model, args.dtype)
        profile, _ = commands._plan_profile(args.profile)
        # each GPU's own budget: "auto" is its free memory less the margin, as each rank of `run --gpus` resolves it
        budget = commands._auto_budget(commands._plan_budget(args.gpu_memory, profile), profile)
        workload = Workload(args.context, args.batch, pass_tokens=serving_pass_tokens(args.batch) if args.serve else 0,
                            graphs=args.cuda_graphs)
        lines = comparison_lines(spec, budget, gpus, workload, args.depth, profile)
        from .planning.moe import MoeLayers

        if MoeLayers.from_spec(spec).is_moe and args.moe_streaming != "dense":  # `load(pipeline=True)` refuses experts
            lines.append("  note: the ranks and 'one GPU' here stream whole MoE layers, as a pipeline does (it does "
                         "not stream routed experts); the one-GPU plan above may stream experts instead: compare "
                         "its predicted decode")
        print()
        print("\n".join(lines))
    return code


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader gone early shows here, not as a traceback ignored at exit
        return code
    except OverspillError as exc:
        if args.traceback:
            raise
        print(f"overspill: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("overspill: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader left (`overspill plan MODEL | head`): stop quietly, as `cat` does
        _discard_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a writer the closed pipe stopped


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is still buffered at exit raises nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
