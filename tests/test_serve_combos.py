"""`overspill serve` and `batch` with load options combined, and how they end: in a subprocess on the CPU
with the embedded SmolLM2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

# the child takes Python's own SIGINT handling even where this process was started with SIGINT ignored
_CLI = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from overspill.cli import main; sys.exit(main(sys.argv[1:]))")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, base: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the server did not start")


def test_force_quit_with_host_tier_kv_mid_generation_stops_the_engine_before_exiting(default_model_dir):
    """Ctrl+C twice (uvicorn's force quit skips the app's shutdown, where the engine thread stops) while a
    request decodes with host-tier KV: the process exited by abort ('terminate called without an active
    exception', status 134) with the engine thread still inside a step; it must stop the engine and exit
    as uvicorn's force quit does (status 0: `uvicorn.run` swallows the KeyboardInterrupt)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLI, "serve", "--port", str(port), "--context", "2048", "--kv-gpu-memory", "40MiB"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        _wait_healthy(proc, base)
        body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
        answers: list = []

        def ask():
            try:
                answers.append(httpx.post(f"{base}/v1/completions", json=body, timeout=120).status_code)
            except httpx.HTTPError as exc:
                answers.append(exc)

        client = threading.Thread(target=ask)
        client.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/health", timeout=5).json()["active"] < 1:  # decoding
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # force quit
        out, _ = proc.communicate(timeout=60)
        client.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "terminate called" not in out, out[-2000:]
    assert proc.returncode == 0, (proc.returncode, out[-2000:])
    assert answers, "the client got no answer"


def test_the_kv_line_says_requests_run_one_at_a_time_with_host_tier_kv() -> None:
    """With --max-batch 4 and host-tier KV the plan's line said 'up to 4 requests share it' just before the
    engine's 'requests run one at a time'."""
    from overspill.planning.plan import Workload
    from overspill.serving.openai_protocol import kv_sharing_note

    line = kv_sharing_note(Workload(2048, 1), 4, host_kv=True)
    assert line == ("KV reserved for 1 sequence of 2048 tokens, some layers' KV in host memory: requests run one at "
                    "a time")
    assert "up to 4 requests share it" in kv_sharing_note(Workload(2048, 2), 4)
