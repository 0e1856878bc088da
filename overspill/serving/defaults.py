"""Defaults of the serving commands, in one place that imports nothing: the CLI (which must start
without torch or pydantic) and the serving modules (which need both) read the same numbers here."""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"  # this machine only
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 16  # sequences decoded together in one pass over the layers
DEFAULT_MAX_QUEUE = 64  # requests waiting for the engine before 429
DEFAULT_MAX_NEW_TOKENS_LIMIT = 2048  # largest max_tokens a request may ask for
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# A 128k-token prompt is ~0.5 MB of text, ~3 MB at worst when a client escapes every character as \uXXXX.
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_MAX_BODY = "4MiB"  # the same, as the CLI writes it
DEFAULT_MAX_CHAIN = 16  # most drafted tokens one speculative pass verifies
# Why `serve` and `batch` refuse --cpu-compute on or a fraction, and `plan --serve` predicts without it
SERVING_CPU_RANK = ("serve and batch do not run the CPU rank yet (the engine selects and reorders KV rows, which "
                    "the CPU heads' host KV does not follow)")


def host_format_refusal(host_format: str) -> str:
    """Why `serve`, `batch` and `plan --serve` refuse --cpu-compute-format other than bf16."""
    return (f"--cpu-compute-format {host_format}: {SERVING_CPU_RANK}, so there are no host weights to quantize; "
            "drop --cpu-compute-format")
