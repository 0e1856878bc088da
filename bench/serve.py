"""Aggregate throughput of the OpenAI-compatible server under 1..N concurrent streaming clients.

One process: `overspill.load` the model (random weights of a shipped config, planned for context
`--context` and batch `--plan-batch`, see below), serve it with `overspill.serving.server.create_app` under
uvicorn on 127.0.0.1 (a background thread, a free port), then for each client count C run a phase of
C asyncio clients (httpx), each sending `--requests-per-client` streaming `/v1/completions` requests
back to back (temperature 0, `max_tokens` fixed, a random-token prompt of `--prompt-len` tokens,
`stream_options.include_usage`). A short warm-up (one request, then a few concurrent ones) comes first. Writes JSON + PNG under --out.

What is measured, per phase:
  - aggregate tok/s: completion tokens received by all clients / phase wall time (first request sent
    to last byte received). Tokens are the server's `usage.completion_tokens` of finished requests
    (the model may stop early at EOS: real counts, not max_tokens), plus the text chunks received by
    requests cut off at --phase-timeout (they are then closed, which cancels them server-side).
  - TTFT: request sent -> first chunk carrying text (includes queueing and prefill).
  - ITL: gaps between consecutive text chunks of one request, pooled over the phase. The random
    weights have no tokenizer, so the server gets an "id tokenizer" whose text is the token ids in
    decimal (" 123 4567 ..."): every token decodes to new text and the server sends exactly one SSE
    chunk per token (nothing is held back), so chunk gaps are token gaps as the client sees them
    (network and event-loop delays included; TCP may coalesce two events, giving a ~0 gap).
  - the server's /metrics sampled every 0.25 s: overspill_active_batch_size (mean, max),
    overspill_queue_depth and the link GB/s of the last step; and over the phase the increase of the
    generated-tokens counter (a cross-check) and of the decode-step histograms (steps, mean step
    time, mean batch per step, fraction of the wall time spent in decode steps).
  - speedup_vs_1 = tok/s(C) / tok/s(1); target_32_ge_20x: tok/s(32) >= 20 x tok/s(1).

The plan's batch: the engine cannot batch sequences whose cache has host-tier KV layers (it then runs
one at a time), and at 6 GiB a plan for 64 x 256 tokens moves 4 layers' KV to the host. So by default
the model is planned for the largest batch <= the most clients that keeps all KV on the GPU (63 for
llama-3-8b, 6 GiB, context 256: all 32 layers streamed), while the server's max_batch is the most
clients; the KV actually held (clients x (prompt + max_tokens)) is checked against what the plan
reserved. The context defaults to a multiple of 256, the engine's KV admission block: a shorter one
would admit fewer sequences than clients.

    python bench/serve.py                                  # llama-3-8b shape, 6 GiB, 1 8 32 64 clients
    python bench/serve.py --clients 1 8 32 --max-tokens 32
    python bench/serve.py --smoke                          # embedded SmolLM2 on CPU: checks the script

Set OVERSPILL_GIT_COMMIT when the working tree has no .git (the JSON records the commit).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# bench/decode.py imports only the standard library at module level
import provenance

SERVED_NAME = "bench"
METRICS_INTERVAL_S = 0.25


class IdTokenizer:
    """A tokenizer whose text is the token ids in decimal, one space before each: " 12 907 3".

    The random-weight shapes have no tokenizer, and with this one every generated token adds text,
    so the server streams one chunk per token. `decode(..., skip_special_tokens=True)` drops EOS ids.
    """

    chat_template = None
    pad_token_id = 0

    def __init__(self, vocab_size: int, eos_ids: set[int]):
        self.vocab_size = vocab_size
        self.eos_ids = set(eos_ids)
        self.eos_token_id = min(eos_ids) if eos_ids else None

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text, **_):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [int(t) for t in text.split()]}

    def encode(self, text, **_) -> list[int]:
        return self(text)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return "".join(f" {int(i)}" for i in ids if not (skip_special_tokens and int(i) in self.eos_ids))

    def batch_decode(self, seqs, **kw) -> list[str]:
        return [self.decode(s, **kw) for s in seqs]


def _eos_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


class Running:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; `port` is the one the OS picked."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# --- clients ---------------------------------------------------------------------------------


async def _request(http, prompt: str, max_tokens: int, timeout: float) -> dict:
    """One streaming completion; returns its timings and token counts (partial if cut off)."""
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    rec = {"sent": time.perf_counter(), "chunk_times": [], "usage_tokens": None, "finish": None,
           "error": None, "cut_off": False}

    async def go():
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    rec["error"] = obj["error"].get("message")
                    return
                if obj.get("usage"):
                    rec["usage_tokens"] = obj["usage"]["completion_tokens"]
                for choice in obj.get("choices") or []:
                    if choice.get("text"):
                        rec["chunk_times"].append(now)
                    if choice.get("finish_reason"):
                        rec["finish"] = choice["finish_reason"]

    try:
        await asyncio.wait_for(go(), timeout=max(timeout, 0.001))
    except TimeoutError:
        rec["cut_off"] = True  # leaving the `stream` context closed the connection: the server cancels it
    except Exception as exc:  # noqa: BLE001  (recorded, the phase goes on)
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["done"] = time.perf_counter()
    complete = rec["usage_tokens"] is not None and not rec["cut_off"]
    rec["tokens"] = rec["usage_tokens"] if complete else len(rec["chunk_times"])
    return rec


async def _client(http, prompts: list[str], max_tokens: int, deadline: float) -> list[dict]:
    out = []
    for prompt in prompts:
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        out.append(await _request(http, prompt, max_tokens, left))
    return out


def _parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        if "{" not in name:
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


async def _sample_metrics(http, stop: asyncio.Event, samples: list[dict]) -> None:
    while not stop.is_set():
        try:
            m = _parse_metrics((await http.get("/metrics")).text)
            samples.append({"t": time.perf_counter(), "active": m.get("overspill_active_batch_size"),
                            "queue": m.get("overspill_queue_depth"), "link": m.get("overspill_link_bytes_per_second")})
        except Exception as exc:  # noqa: BLE001  (sampling is best effort)
            samples.append({"t": time.perf_counter(), "active": None, "queue": None, "link": None, "error": repr(exc)})
        try:
            await asyncio.wait_for(stop.wait(), METRICS_INTERVAL_S)
        except TimeoutError:
            pass


async def _snapshot(http) -> dict[str, float]:
    try:
        return _parse_metrics((await http.get("/metrics")).text)
    except Exception:  # noqa: BLE001
        return {}


def _delta(before: dict, after: dict, name: str) -> float | None:
    return after[name] - before[name] if name in before and name in after else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


async def run_phase(base: str, clients: int, prompts: list[list[str]], max_tokens: int, timeout: float) -> dict:
    """`clients` concurrent clients, client i sending prompts[i] back to back; then the statistics."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(None), limits=limits) as http, \
            httpx.AsyncClient(base_url=base, timeout=10) as side:
        before = await _snapshot(side)
        stop, samples = asyncio.Event(), []
        sampler = asyncio.create_task(_sample_metrics(side, stop, samples))
        start = time.perf_counter()
        deadline = start + timeout
        per_client = await asyncio.gather(*(_client(http, prompts[i], max_tokens, deadline) for i in range(clients)))
        stop.set()
        await sampler
        after = await _snapshot(side)
    reqs = [r for rs in per_client for r in rs]
    end = max((r["done"] for r in reqs), default=start)
    wall = end - start
    tokens = sum(r["tokens"] for r in reqs)
    ttft = [r["chunk_times"][0] - r["sent"] for r in reqs if r["chunk_times"]]
    itl = [b - a for r in reqs for a, b in zip(r["chunk_times"], r["chunk_times"][1:])]
    finished = [r for r in reqs if r["usage_tokens"] is not None and not r["cut_off"]]
    busy = [s for s in samples if s["active"] is not None]
    decode_rates = [(len(r["chunk_times"]) - 1) / (r["chunk_times"][-1] - r["chunk_times"][0])
                    for r in reqs if len(r["chunk_times"]) > 1 and r["chunk_times"][-1] > r["chunk_times"][0]]
    return {
        "clients": clients,
        "requests": len(reqs),
        "requests_finished": len(finished),
        "requests_cut_off": sum(r["cut_off"] for r in reqs),
        "requests_failed": sum(r["error"] is not None for r in reqs),
        "errors": sorted({r["error"] for r in reqs if r["error"]})[:5],
        "finish_reasons": {k: sum(r["finish"] == k for r in finished) for k in sorted({r["finish"] for r in finished}, key=str)},
        "completion_tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall if wall > 0 else None,
        "mean_tokens_per_request": tokens / len(reqs) if reqs else None,
        "chunks_equal_usage_tokens": sum(len(r["chunk_times"]) == r["usage_tokens"] for r in finished),
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
        "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99), "itl_mean_s": sum(itl) / len(itl) if itl else None,
        "itl_samples": len(itl),
        "per_request_decode_tok_s_p50": _pct(decode_rates, 50),
        "server_active_batch_mean": sum(s["active"] for s in busy) / len(busy) if busy else None,
        "server_active_batch_max": max((s["active"] for s in busy), default=None),
        "server_queue_depth_max": max((s["queue"] or 0 for s in busy), default=None),
        "metrics_samples": len(busy),
        "server_link_GB_s_mean": _mean([s["link"] / 1e9 for s in busy if s["active"] and s["link"]]),
        "server_generated_tokens": _delta(before, after, "overspill_generated_tokens_total"),
        **_server_steps(before, after, wall),
    }


def _server_steps(before: dict, after: dict, wall: float) -> dict:
    """The engine's decode steps during the phase, from its Prometheus histograms (absent: None)."""
    steps = _delta(before, after, "overspill_decode_step_seconds_count")
    seconds = _delta(before, after, "overspill_decode_step_seconds_sum")
    rows = _delta(before, after, "overspill_decode_batch_size_sum")
    link = after.get("overspill_link_measured_bytes_per_second")
    return {
        "server_decode_steps": steps,
        "server_decode_step_mean_s": seconds / steps if steps else None,
        "server_decode_batch_mean": rows / steps if steps and rows is not None else None,
        "server_decode_time_fraction": seconds / wall if seconds is not None and wall > 0 else None,
        "server_link_measured_GB_s": link / 1e9 if link else None,
    }


def _wait_idle(engine, seconds: float = 60) -> bool:
    """True once the engine holds no request (cut-off requests are cancelled asynchronously)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if engine.live_requests() == 0:
            return True
        time.sleep(0.05)
    return False


def _engine_alive(engine) -> bool:
    thread = getattr(engine, "_thread", None)
    return thread is None or thread.is_alive()


def _prompts(vocab: int, clients: int, per_client: int, length: int, seed: int) -> list[list[str]]:
    """Distinct random-token prompts (ids 1..vocab-1 as id-tokenizer text), [client][request]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (clients, per_client, length), generator=gen).tolist()
    return [[" ".join(map(str, p)) for p in client] for client in ids]


# --- setup, report -------------------------------------------------------------------------------


def _server_config(context: int, max_clients: int, max_tokens: int):
    from overspill.serving.openai_protocol import DEFAULT_MAX_QUEUE, ServerConfig

    kw = {"max_queue": max(DEFAULT_MAX_QUEUE, 2 * max_clients), "max_new_tokens_limit": max(max_tokens, 16),
          "api_key": None}
    if "max_batch" in {f.name for f in dataclasses.fields(ServerConfig)}:
        kw["max_batch"] = max_clients
    return ServerConfig(SERVED_NAME, context, **kw)


def summarize(phases: list[dict]) -> dict:
    by = {p["clients"]: p for p in phases}
    one = (by.get(1) or {}).get("tok_s")
    for p in phases:
        p["speedup_vs_1"] = p["tok_s"] / one if one and p["tok_s"] else None
    s32 = (by.get(32) or {}).get("speedup_vs_1")
    return {
        "tok_s_by_clients": {str(p["clients"]): p["tok_s"] for p in phases},
        "speedup_vs_1_by_clients": {str(p["clients"]): p["speedup_vs_1"] for p in phases},
        "itl_p50_s_by_clients": {str(p["clients"]): p["itl_p50_s"] for p in phases},
        "itl_p99_s_by_clients": {str(p["clients"]): p["itl_p99_s"] for p in phases},
        "speedup_32_vs_1": s32,
        "target_32_ge_20x": None if s32 is None else s32 >= 20,
        "any_phase_cut_off": any(p["requests_cut_off"] for p in phases),
        "requests_failed": sum(p["requests_failed"] for p in phases),
    }


def _log_axes(ax, xs: list[int], ylabel: str) -> None:
    """Log-log axes over the client counts, with plain-number tick labels."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(c) for c in xs])
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel(ylabel)


def plot(phases: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in phases if p["tok_s"]]
    xs = [p["clients"] for p in phases]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    if not phases:
        fig.suptitle(title, fontsize=10)
        ax.text(0.5, 0.5, "no tokens received in any phase", ha="center", transform=ax.transAxes)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    ax.plot(xs, [p["tok_s"] for p in phases], "o-", label="measured")
    one = next((p["tok_s"] for p in phases if p["clients"] == 1), None)
    if one:
        ax.plot(xs, [one * c for c in xs], "--", color="gray", label="linear in clients (1-client tok/s x C)")
        if 32 in xs:
            ax.plot([32], [20 * one], "r^", label="target: 20x at 32 clients")
    for p in phases:
        label = f"{p['tok_s']:.1f}" + (f"\n{p['speedup_vs_1']:.1f}x" if p.get("speedup_vs_1") else "")
        ax.annotate(label, (p["clients"], p["tok_s"]), textcoords="offset points", xytext=(4, -18), fontsize=7)
    _log_axes(ax, xs, "aggregate completion tokens/s")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    for key, style, label in (("itl_p50_s", "o-", "ITL p50"), ("itl_p99_s", "s--", "ITL p99"),
                              ("ttft_p50_s", "^:", "TTFT p50")):
        pts = [(p["clients"], p[key] * 1000) for p in phases if p.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), style, label=label)
    if not ax2.get_lines():
        ax2.text(0.5, 0.5, "no latencies (fewer than 2 tokens per request)", ha="center", transform=ax2.transAxes)
    _log_axes(ax2, xs, "latency (ms)")
    if ax2.get_lines():
        ax2.legend(fontsize=8)
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="shipped config name, loaded with random weights")
    p.add_argument("--budget", default="6GiB", help="GPU memory budget passed to overspill.load (gpu_memory); none: no limit")
    p.add_argument("--cuda-graphs", action="store_true", help="load with cuda_graphs=True: the engine decodes through CUDA graphs")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32, 64],
                   help="concurrent client counts, one phase each; the server's max_batch is the largest")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (the model may stop earlier at EOS)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens in each random prompt")
    p.add_argument("--context", type=int, default=None,
                   help="context the model is planned and served for (default: prompt-len + max-tokens rounded up to 256)")
    p.add_argument("--plan-batch", type=int, default=None,
                   help="batch the model is planned (and its KV reserved) for; default: the largest <= the most "
                        "clients whose plan keeps all KV on the GPU (host-tier KV layers make the engine decode one "
                        "sequence at a time); the server's max_batch is still the most clients where supported")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends back to back per phase")
    p.add_argument("--phase-timeout", type=float, default=90.0,
                   help="seconds after which a phase stops: no new requests, open streams closed (cancelled "
                        "server-side) and their tokens so far counted; caps runtime if the engine does not batch")
    p.add_argument("--warmup-tokens", type=int, default=4, help="max_tokens of the warm-up requests (0: no warm-up)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON and PNG")
    p.add_argument("--smoke", action="store_true",
                   help="embedded SmolLM2-135M on the CPU (float32), clients 1 2 4, max-tokens 8: checks the script, "
                        "times nothing useful; files are named serve-smoke-*")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smoke:
        args.clients, args.max_tokens, args.prompt_len = [1, 2, 4], 8, 16
        args.phase_timeout = min(args.phase_timeout, 60.0)
    if min(args.clients) < 1 or args.max_tokens < 1 or args.prompt_len < 1 or args.requests_per_client < 1:
        p.error("--clients, --max-tokens, --prompt-len and --requests-per-client must be at least 1")
    args.clients = sorted(set(args.clients))
    max_clients = max(args.clients)
    context = args.context or -(-(args.prompt_len + args.max_tokens) // 256) * 256
    if context < args.prompt_len + args.max_tokens:
        p.error(f"--context {context} is shorter than prompt-len + max-tokens")

    import torch

    import overspill
    from overspill.api import placement_of
    from overspill.planning.placement import serving_pass_tokens
    from overspill.runtime.hardware import machine_facts
    from overspill.serving.server import create_app

    started = time.perf_counter()
    # default: plan for the largest batch <= the most clients whose KV stays on the GPU (load's
    # fit_batch); host-tier KV layers would make the engine decode one sequence at a time
    fit = args.plan_batch is None
    plan_batch = args.plan_batch or max_clients
    t0 = time.perf_counter()
    if args.smoke:
        model, _ = overspill.load(None, gpu_memory=None, dtype="float32", context=context, batch=plan_batch,
                                  progress=False)
        model_name = "smollm2-135m"
    else:
        model, _ = overspill.load(args.model, gpu_memory=None if args.budget == "none" else args.budget,
                                  random_weights=True, context=context, batch=plan_batch, fit_batch=fit,
                                  progress=False, pass_tokens=serving_pass_tokens(max_clients),
                                  cuda_graphs=args.cuda_graphs)
        model_name = args.model
    load_s = time.perf_counter() - t0
    placement = placement_of(model)
    plan = placement.plan
    print(f"loaded {model_name} in {load_s:.1f} s on {placement.device}: {len(plan.resident_layers)} resident / "
          f"{len(plan.streamed_layers)} streamed layers, {plan.streamed_bytes_per_step / 2**30:.2f} GiB streamed "
          f"per step", flush=True)
    tok = IdTokenizer(model.config.vocab_size, _eos_ids(model))
    served_context = plan.workload.context
    config = _server_config(served_context, max_clients, max(args.max_tokens, args.warmup_tokens))
    app = create_app(model, tok, config)
    engine = app.state.engine
    running = Running(app)
    engine_batch = getattr(engine, "max_batch", getattr(engine, "max_active", None))
    batching_note = getattr(engine, "batching_note", None)
    # the KV the engine may really hold at once vs what the plan reserved (context x plan batch)
    kv_tokens_needed = min(max_clients, engine_batch or 1) * (args.prompt_len + args.max_tokens)
    kv_fits_plan = kv_tokens_needed <= served_context * plan.workload.batch
    print(f"serving at {running.base}: engine max batch {engine_batch}, plan batch {plan.workload.batch} "
          f"at context {served_context}, server config {dataclasses.asdict(config)}", flush=True)
    if batching_note:
        print(f"engine: {batching_note}", flush=True)
    if not kv_fits_plan:
        print(f"warning: up to {kv_tokens_needed} KV tokens at once, more than the {served_context} x "
              f"{plan.workload.batch} the plan reserved: the GPU may run out of memory", flush=True)

    vocab = model.config.vocab_size
    warmup, phases, engine_died = [], [], False
    try:
        if args.warmup_tokens:
            for i, n in enumerate((1, min(8, max_clients))):
                prompts = _prompts(vocab, n, 1, args.prompt_len, 10_000 + i)
                w = asyncio.run(run_phase(running.base, n, prompts, args.warmup_tokens, args.phase_timeout))
                _wait_idle(engine)
                warmup.append({k: w[k] for k in ("clients", "requests_finished", "completion_tokens", "wall_s", "tok_s", "errors")})
                print(f"warm-up {n} client(s): {w['wall_s']:.1f} s", flush=True)
        for c in args.clients:
            if not _engine_alive(engine):
                engine_died = True
                print("the engine thread has died (its traceback is above): stopping", flush=True)
                break
            prompts = _prompts(vocab, c, args.requests_per_client, args.prompt_len, args.seed + c)
            ph = asyncio.run(run_phase(running.base, c, prompts, args.max_tokens, args.phase_timeout))
            ph["engine_idle_after"] = _wait_idle(engine)
            phases.append(ph)
            print(f"{c:3d} clients: {ph['tok_s'] or 0:8.2f} tok/s over {ph['wall_s']:.1f} s, "
                  f"{ph['completion_tokens']} tokens in {ph['requests']} requests ({ph['requests_cut_off']} cut off, "
                  f"{ph['requests_failed']} failed), TTFT p50 {ph['ttft_p50_s'] or 0:.3f} s, ITL p50/p99 "
                  f"{(ph['itl_p50_s'] or 0) * 1e3:.1f}/{(ph['itl_p99_s'] or 0) * 1e3:.1f} ms, server batch mean/max "
                  f"{ph['server_active_batch_mean'] or 0:.1f}/{ph['server_active_batch_max'] or 0:.0f}", flush=True)
    finally:
        engine_died = engine_died or not _engine_alive(engine)
        running.stop()

    summary = summarize(phases)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    machine = machine_facts()
    record = {
        **provenance.header("serve", stamp, machine),
        "smoke": args.smoke,
        "model": model_name,
        "budget": None if args.smoke else args.budget,
        "cuda_graphs": args.cuda_graphs,
        "device": str(placement.device),
        "context": served_context,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "phase_timeout_s": args.phase_timeout,
        "clients": args.clients,
        "tokenizer": "id tokenizer: text is decimal token ids, one SSE chunk per token",
        "server_config": dataclasses.asdict(config),
        "plan_batch": plan.workload.batch,
        "plan_batch_fitted": fit,
        "engine_max_batch": engine_batch,
        "engine_batching_note": batching_note,
        "kv_tokens_needed": kv_tokens_needed,
        "kv_fits_plan": kv_fits_plan,
        "load_s": load_s,
        "total_s": time.perf_counter() - started,
        "resident_layers": len(plan.resident_layers),
        "streamed_layers": len(plan.streamed_layers),
        "streamed_bytes_per_step": plan.streamed_bytes_per_step,
        "plan": json.loads(plan.to_json()),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "engine_died": engine_died,
        "summary": summary,
        "warmup": warmup,
        "phases": phases,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"serve-{'smoke-' if args.smoke else ''}{model_name}-{stamp}"
    Path(f"{stem}.json").write_text(json.dumps(record, indent=2))
    where = machine.get("gpu") or f"CPU ({machine.get('cpu_count')} cores)"
    budget = "no budget" if args.smoke else f"{args.budget} GPU budget"
    plot(phases, Path(f"{stem}.png"),
         f"overspill serve, {model_name} ({'smoke, ' if args.smoke else ''}{budget}, {len(plan.streamed_layers)} of "
         f"{len(plan.layer_tiers)} layers streamed), {where}\nprompt {args.prompt_len}, max_tokens {args.max_tokens}, "
         f"{args.requests_per_client} requests/client, engine max batch {engine_batch}, plan batch {plan.workload.batch}")
    print(json.dumps(summary, indent=2))
    print(f"wrote {stem}.json and .png ({record['total_s']:.0f} s in all)")
    if engine_died or summary["requests_failed"]:
        print(f"FAILED: {summary['requests_failed']} requests failed, engine died: {engine_died} (see 'errors' per phase)")
        sys.exit(1)


if __name__ == "__main__":
    main()
