"""`overspill` command line: one dispatcher over each action's `main(args)`."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import OverspillError

DEFAULT_PROMPT = "What is the highest mountain in the world?"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", default=None,
        help="checkpoint directory, Hugging Face id already in the local cache, .gguf file, or shipped "
        "config name (llama-3-8b, llama-3-70b, mixtral-8x7b, qwen2.5-7b, ...; needs --random-weights). "
        "Default: the embedded SmolLM2-135M-Instruct.",
    )
    p.add_argument(
        "--gpu-memory", default="auto",
        help="GPU memory the model may use, e.g. 6GiB, 12GB, a byte count, or 'auto' (free memory minus "
        "a margin). Layers that do not fit stream from pinned host memory. Default: auto.",
    )
    p.add_argument("--dtype", default="bfloat16", help="weight/compute dtype: bfloat16 (default), float16 or float32.")
    p.add_argument(
        "--random-weights", action="store_true",
        help="build the model from its config with seeded random weights (benchmark full-size shapes without a checkpoint).",
    )
    p.add_argument("--depth", type=int, default=2, help="how many layers ahead the copy stream prefetches (default 2).")
    p.add_argument(
        "--context", type=int, default=4096,
        help="longest sequence (prompt + new tokens) to reserve KV-cache room for in the GPU budget (default 4096).",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:1 (default: cuda:0 if present, else cpu).")


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
    run.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64).")
    run.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text, without the chat template.")
    run.add_argument("--seed", type=int, default=0, help="seed for --random-weights (default 0).")
    run.set_defaults(func=_run_main)
    return parser


def _run_main(args: argparse.Namespace) -> int:
    from .run import run

    run(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except OverspillError as exc:
        if args.traceback:
            raise
        print(f"overspill: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("overspill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
