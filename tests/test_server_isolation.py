"""One bad request never hurts another: each bad input gets its OpenAI error while good requests
sent before and after it, on the same server, finish with their normal answers.

A uvicorn server on a loopback port (as a user runs `overspill serve`), spoken to with raw httpx.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serving import Running, load_smollm, openai_error, wait_idle  # noqa: E402

NAME = "smollm2-test"
CONTEXT = 1024
BODY_LIMIT = 1 << 20
GOOD = {"model": NAME, "messages": [{"role": "user", "content": "Name three colors."}], "temperature": 0,
        "max_tokens": 16}
HUGE = 20_000_000  # bytes of prompt: far past the body limit


@pytest.fixture(scope="module")
def loaded(default_model_dir):
    return load_smollm(default_model_dir, CONTEXT)


@pytest.fixture(scope="module")
def server(loaded):
    from overspill.serving.openai_protocol import ServerConfig
    from overspill.serving.server import create_app

    model, tok, context = loaded
    app = create_app(model, tok, ServerConfig(NAME, context, max_queue=16, max_new_tokens_limit=64, max_batch=8,
                                              max_body_bytes=BODY_LIMIT))
    running = Running(app)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def solo(server) -> str:
    """The greedy answer to GOOD with nothing else running."""
    r = httpx.post(f"{server.base}/v1/chat/completions", json=GOOD, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _chat_body(**fields) -> dict:
    return {**GOOD, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, **fields}


def _raw(body: dict) -> bytes:
    """JSON bytes as a client that escapes everything sends them (a lone surrogate stays a `\\ud800` escape)."""
    return json.dumps(body).encode("ascii")


def _chunked(total: int):
    piece = b"a" * 65536
    yield b'{"model": "%s", "prompt": "' % NAME.encode()
    for _ in range(total // len(piece)):
        yield piece
    yield b'", "max_tokens": 1}'


# name -> (path, request kwargs for httpx (built when the case runs), expected status, expected param or code)
CASES = {
    "seed past 64 bits": ("/v1/chat/completions", lambda: {"json": _chat_body(seed=2**70)}, 400, "seed"),
    "top_k past int64": ("/v1/chat/completions", lambda: {"json": _chat_body(top_k=2**63, temperature=1)}, 400,
                         "top_k"),
    "tiny temperature": ("/v1/chat/completions", lambda: {"json": _chat_body(temperature=1e-300)}, 200, None),
    "tiny temperature, top_k": ("/v1/completions", lambda: {"json": {"model": NAME, "prompt": "Hi", "max_tokens": 4,
                                                                     "temperature": 1e-300, "top_k": 2**31 - 1}},
                                200, None),
    "lone surrogate": ("/v1/chat/completions",
                       lambda: {"content": _raw(_chat_body(messages=[{"role": "user", "content": "hi \ud800 there"}])),
                                "headers": {"Content-Type": "application/json"}}, 200, None),
    "20 MB prompt": ("/v1/completions", lambda: {"json": {"model": NAME, "prompt": "a" * HUGE, "max_tokens": 1}},
                     413, None),
    "20 MB chunked": ("/v1/completions",
                      lambda: {"content": _chunked(HUGE), "headers": {"Content-Type": "application/json"}}, 413, None),
    "prompt past the context": ("/v1/completions", lambda: {"json": {"model": NAME, "prompt": "hello " * 150_000,
                                                                     "max_tokens": 1}}, 400, "context_length_exceeded"),
}


def _stream_text(base: str, started: threading.Event) -> str:
    """GOOD, streamed; `started` is set once its first token arrived (the engine is decoding it)."""
    parts = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**GOOD, "stream": True}, timeout=20) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            parts.append(chunk["choices"][0]["delta"].get("content") or "")
            if "".join(parts):
                started.set()
    started.set()
    return "".join(parts)


def _timed_post(base: str, path: str, kwargs: dict) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = httpx.post(f"{base}{path}", timeout=20, **kwargs)
    return r, time.monotonic() - start


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_fails_alone(server, solo, case):
    path, make_kwargs, status, expected = CASES[case]
    started = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        before = pool.submit(_stream_text, server.base, started)  # decoding when the bad request arrives
        assert started.wait(20), "the first good request never started"
        bad = pool.submit(_timed_post, server.base, path, make_kwargs())
        time.sleep(0.05)
        after = pool.submit(_timed_post, server.base, "/v1/chat/completions", {"json": GOOD})  # queued behind it
        r, bad_s = bad.result(30)
        good, good_s = after.result(30)
        assert before.result(30) == solo
    if status == 200:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    else:
        err = openai_error(r, status)
        assert expected in (err["param"], err["code"], None), err
        assert bad_s < 5, f"{case}: answered in {bad_s:.1f} s"
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == solo
    assert good_s < 10, f"a good request waited {good_s:.1f} s behind {case}"
    wait_idle(server.app.state.engine)
    assert server.app.state.engine.live_requests() == 0


def test_a_prompt_past_the_context_is_refused_untokenized(server, monkeypatch):
    tokenized: list[int] = []
    cls = type(server.app.state.engine.tokenizer)
    real = cls.__call__

    def spy(self, text, *args, **kwargs):
        tokenized.append(len(text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", spy)
    chat = {**GOOD, "messages": [{"role": "user", "content": "hello " * 150_000}]}
    err = openai_error(httpx.post(f"{server.base}/v1/chat/completions", json=chat, timeout=20), 400, "messages")
    assert err["code"] == "context_length_exceeded" and "at least" in err["message"]
    assert max(tokenized, default=0) < 10_000, tokenized


def test_lone_surrogates_keep_the_connection(server, solo):
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=server.base, timeout=20) as c:
        first = c.post("/v1/chat/completions", headers=headers, content=_raw(
            {**GOOD, "messages": [{"role": "user", "content": "\udfff"}], "stop": ["\ud800"], "user": "\ud801"}))
        assert first.status_code == 200, first.text
        port = first.extensions["network_stream"].get_extra_info("client_addr")[1]
        unknown = c.post("/v1/chat/completions", headers=headers, content=_raw({**GOOD, "model": "x\ud800"}))
        assert openai_error(unknown, 404, "model")["code"] == "model_not_found"
        again = c.post("/v1/chat/completions", json=GOOD)
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == solo
        assert again.extensions["network_stream"].get_extra_info("client_addr")[1] == port, "connection not reused"


def test_an_unexpected_error_is_a_500_body_on_a_live_connection(server, solo, monkeypatch):
    import overspill.serving.server

    def broken(*args):
        raise RuntimeError("tokenizer exploded on \ud800")

    with httpx.Client(base_url=server.base, timeout=20) as c:
        with monkeypatch.context() as patch:
            patch.setattr(overspill.serving.server, "generation_request", broken)
            failed = c.post("/v1/chat/completions", json=GOOD)
        err = openai_error(failed, 500)
        assert err["type"] == "server_error" and "tokenizer exploded" in err["message"]
        port = failed.extensions["network_stream"].get_extra_info("client_addr")[1]
        again = c.post("/v1/chat/completions", json=GOOD)
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == solo
        assert again.extensions["network_stream"].get_extra_info("client_addr")[1] == port, "connection not reused"


def _live_rss_bytes() -> int:
    """This process's resident memory once freed heap pages went back to the OS (client and server both
    live here, so freed buffers of either would otherwise linger in malloc's arenas)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_rejected_giant_prompts_give_their_memory_back(server):
    headers = {"Content-Type": "application/json"}
    big = _raw({"model": NAME, "prompt": "hello " * 150_000, "max_tokens": 1})  # 900 kB: under the body limit
    huge = _raw({"model": NAME, "prompt": "a" * HUGE, "max_tokens": 1})
    openai_error(httpx.post(f"{server.base}/v1/completions", content=big, headers=headers, timeout=20), 400)
    before = _live_rss_bytes()
    for _ in range(5):
        openai_error(httpx.post(f"{server.base}/v1/completions", content=big, headers=headers, timeout=20), 400)
        openai_error(httpx.post(f"{server.base}/v1/completions", content=huge, headers=headers, timeout=20), 413)
    grown = _live_rss_bytes() - before
    assert grown < 32 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB over ten rejected prompts"


def test_health_reports_a_dead_engine(loaded):
    from overspill.serving.openai_protocol import ServerConfig
    from overspill.serving.server import create_app

    model, tok, context = loaded
    running = Running(create_app(model, tok, ServerConfig(NAME, context, max_new_tokens_limit=8)))
    try:
        ok = httpx.get(f"{running.base}/health", timeout=10)
        assert ok.status_code == 200 and ok.json()["status"] == "ok" and ok.json()["alive"] is True
        running.app.state.engine.close()
        dead = httpx.get(f"{running.base}/health", timeout=10)
        assert dead.status_code == 503, dead.text
        body = dead.json()
        assert body["status"] == "unhealthy" and body["alive"] is False
        assert {"queue_depth", "active", "last_progress_s_ago", "error"} <= set(body)
        openai_error(httpx.post(f"{running.base}/v1/chat/completions", json={**GOOD, "max_tokens": 4}, timeout=10), 503)
    finally:
        running.stop()
