"""The OpenAI-compatible server, end to end on CPU with the embedded SmolLM2.

One server per module (uvicorn in a background thread on 127.0.0.1, a free port), spoken to with
the real `openai` client and with raw `httpx` for the bad-input cases.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serving import Running, load_smollm, openai_error as _error, wait_idle as _wait_idle  # noqa: E402

NAME = "smollm2-test"
KEY = "test-key"
CONTEXT = 1024
LIMIT = 64
QUESTION = "What is the highest mountain in the world?"


@pytest.fixture(scope="module")
def server(default_model_dir):
    from overspill.serving.openai_protocol import ServerConfig
    from overspill.serving.server import create_app

    model, tok, context = load_smollm(default_model_dir, CONTEXT)
    app = create_app(model, tok, ServerConfig(NAME, context, max_queue=16, max_new_tokens_limit=LIMIT, api_key=KEY,
                                              max_batch=8, prefix_cache_bytes=64 * 2**20))
    running = Running(app)
    running.tokenizer = tok
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def greedy_answer(client):
    """The greedy non-streaming answer to QUESTION (computed once, compared against by later tests)."""
    return client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=48,
    )


def test_health_models_metrics(server, client, http):
    health = httpx.get(f"{server.base}/health").json()  # no key needed
    assert health["status"] == "ok" and health["alive"] is True and health["error"] is None
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    client.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.base}/metrics").text
    for name in ("overspill_requests_total", "overspill_generated_tokens_total", "overspill_queue_depth",
                 "overspill_active_batch_size", "overspill_time_to_first_token_seconds_bucket",
                 "overspill_inter_token_latency_seconds_bucket", "overspill_streamed_bytes_per_decode_step",
                 "overspill_decode_batch_size_bucket", "overspill_streamed_bytes_per_token",
                 "overspill_link_bytes_per_second", "overspill_link_busy_fraction", 'overspill_kv_blocks{state="used"}',
                 'overspill_kv_bytes{tier="host"}'):
        assert name in text, name
    assert 'endpoint="/v1/completions",status="200"' in text


def test_chat_greedy_answers_everest(server, greedy_answer):
    choice = greedy_answer.choices[0]
    assert "Everest" in choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    ids = server.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_dict=True)["input_ids"]
    u = greedy_answer.usage
    assert u.prompt_tokens == len(ids)
    assert 0 < u.completion_tokens <= 48 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert greedy_answer.object == "chat.completion" and greedy_answer.model == NAME and greedy_answer.id


def test_repeated_system_prompt_is_reused_with_the_same_answer(client, server):
    system = "You are a geography teacher. " * 90  # ~540 tokens: longer than a prefill chunk, so restored
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
    engine = server.app.state.engine
    first = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=12)
    hits = engine.kv_stats().prefix_hit_tokens
    again = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=12)
    assert engine.kv_stats().prefix_hit_tokens - hits >= 8 * 64
    assert again.choices[0].message.content == first.choices[0].message.content
    assert 'overspill_prefix_cache_tokens{kind="hit"}' in httpx.get(f"{server.base}/metrics").text


def test_streaming_chat_equals_non_streaming(client, greedy_answer):
    stream = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=48, stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == greedy_answer.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == greedy_answer.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_completion_stop_sequence_is_cut(client, server, greedy_answer):
    prompt = server.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    out = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=48, stop=["Everest", "K2"])
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert "Everest" not in choice.text and choice.text.strip()
    assert greedy_answer.choices[0].message.content.startswith(choice.text)  # cut exactly before the stop
    # a stop string as a plain string, streamed
    chunks = list(client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=48, stop="Everest", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_chat_and_completion(client, server, greedy_answer):
    import math

    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTION}], temperature=0,
                                       max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content[:8])
    for t in content:  # greedy: the chosen token is the most likely one, first among the alternatives
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert math.isclose(t.top_logprobs[0].logprob, t.logprob) and t.logprob <= 0
        assert t.bytes == list(t.token.encode())
    assert greedy_answer.choices[0].message.content.startswith(r.choices[0].message.content)
    c = client.completions.create(model=NAME, prompt="The capital of France is", temperature=0, max_tokens=4, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert lp.text_offset[0] == 0 and all(len(alts) == 2 for alts in lp.top_logprobs)
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTION}], temperature=0,
                                            max_tokens=8, logprobs=True, stream=True)
    streamed = [t for ch in stream if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    assert r.choices[0].logprobs is not None and greedy_answer.choices[0].logprobs is None  # only when asked


def test_concurrent_requests_match_solo_runs(client, server):
    prompts = [f"Name a {thing}." for thing in ("color", "fruit", "planet", "river", "city", "animal", "metal", "tree")]

    def ask(p: str) -> str:
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=6)
        return r.choices[0].message.content

    registry = server.app.state.metrics.registry
    solo = [ask(p) for p in prompts]
    steps_of_one = registry.get_sample_value("overspill_decode_batch_size_bucket", {"le": "1.0"})
    steps = registry.get_sample_value("overspill_decode_batch_size_count")
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == solo
    # decode steps served several requests at once: fewer steps than tokens, not all of batch 1
    batched_steps = registry.get_sample_value("overspill_decode_batch_size_count") - steps
    assert batched_steps > registry.get_sample_value("overspill_decode_batch_size_bucket", {"le": "1.0"}) - steps_of_one
    _wait_idle(server.app.state.engine)
    assert server.app.state.engine.live_requests() == 0


def test_closing_streams_cancels_requests(client, server):
    engine = server.app.state.engine
    before = engine.cancelled_total
    start = time.monotonic()
    for i in range(200):  # each would take ~16 decode steps if it were not cancelled
        stream = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=16, stream=True)
        next(iter(stream))
        stream.close()
        assert time.monotonic() - start < 90, f"only {i} streams in 90 s: cancellation is not prompt"
    _wait_idle(engine)
    assert engine.live_requests() == 0, "request state leaked"
    assert engine.kv_stats().used_blocks == 0 and engine.kv_stats().reserved_blocks == 0, "KV blocks leaked"
    assert engine.cancelled_total - before >= 150
    # a request already decoding stops within a few tokens of its client leaving
    tokens = server.app.state.metrics.tokens
    generated = tokens._value.get()
    stream = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=LIMIT, temperature=0, stream=True)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    _wait_idle(engine)
    assert engine.live_requests() == 0
    assert tokens._value.get() - generated < LIMIT // 2
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_non_streaming_client_that_leaves_cancels_its_request(server, http):
    engine = server.app.state.engine
    tokens = server.app.state.metrics.tokens
    before, cancelled = tokens._value.get(), engine.cancelled_total
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": LIMIT, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        http.post("/v1/completions", json=body, timeout=0.3)
    _wait_idle(engine)
    assert engine.cancelled_total == cancelled + 1 and engine.live_requests() == 0
    assert tokens._value.get() - before < LIMIT


def test_logprob_tokens_carry_exact_bytes(server):
    from overspill.serving.openai_protocol import TokenTexts
    from overspill.serving.sampling import TokenLogprob

    tok = server.tokenizer
    texts = TokenTexts(tok, threading.Lock())
    ids = tok("Snow 🏔️ on Everest")["input_ids"]
    infos = texts.describe([TokenLogprob(i, -1.0) for i in ids])
    assert bytes(b for t in infos for b in t.bytes).decode() == tok.decode(ids)
    partial = [t for t in infos if t.text.startswith("bytes:")]  # the emoji spans tokens: halves are not UTF-8
    assert partial and all("\\x" in t.text for t in partial)


def test_bad_inputs_get_openai_errors(http, server):
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    post = http.post
    _error(post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    _error(post("/v1/chat/completions", json={"model": NAME}), 400, "messages")
    _error(post("/v1/chat/completions", json={**chat, "messages": []}), 400, "messages")
    _error(post("/v1/chat/completions", json={**chat, "temperature": "hot"}), 400, "temperature")
    _error(post("/v1/completions", json={"model": NAME}), 400, "prompt")
    assert _error(post("/v1/chat/completions", json={**chat, "model": "gpt-9"}), 404, "model")["code"] == "model_not_found"
    _error(post("/v1/chat/completions", json={**chat, "max_tokens": 0}), 400, "max_tokens")
    _error(post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": LIMIT + 1}), 400, "max_tokens")
    _error(post("/v1/chat/completions", json={**chat, "n": 2}), 400, "n")
    _error(post("/v1/chat/completions", json={**chat, "top_logprobs": 3}), 400, "top_logprobs")
    _error(post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 21}), 400, "top_logprobs")
    _error(post("/v1/completions", json={"model": NAME, "prompt": "hi", "logprobs": 6}), 400, "logprobs")
    _error(post("/v1/chat/completions", json={**chat, "stream": True, "stream_options": "yes"}), 400, "stream_options")
    long = {"model": NAME, "prompt": "hello " * (CONTEXT + 10), "max_tokens": 1}
    assert _error(post("/v1/completions", json=long), 400, "prompt")["code"] == "context_length_exceeded"
    _error(httpx.post(f"{server.base}/v1/chat/completions", json=chat), 401)
    _error(httpx.post(f"{server.base}/v1/chat/completions", json=chat, headers={"Authorization": "Bearer nope"}), 401)
    _error(http.get("/v1/nothing-here"), 404)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0).models.list()
    # the server is still up and answers
    ok = post("/v1/chat/completions", json={**chat, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_the_bearer_scheme_is_case_insensitive(server):
    # RFC 7235: auth schemes are case-insensitive; the key itself is not.
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert httpx.get(f"{server.base}/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    assert httpx.get(f"{server.base}/v1/models", headers={"Authorization": f"bearer {KEY.upper()}"}).status_code == 401
    assert httpx.get(f"{server.base}/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401


@pytest.mark.parametrize("key", ["", "   "], ids=["empty", "blank"])
def test_serve_refuses_an_empty_api_key_before_loading(capsys, monkeypatch, key: str):
    # No client can send an empty Bearer token: such a server would answer every /v1 request 401.
    from overspill import cli
    from overspill.serving import server as server_module

    monkeypatch.setattr(server_module, "load_for_serving", lambda args: pytest.fail("loaded before checking --api-key"))
    with socket.socket() as sock:  # a free port, so only the key can stop the command
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert cli.main(["serve", "--api-key", key, "--port", str(port)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("overspill: error: --api-key is empty"), err


def test_full_queue_answers_429(server, http):
    engine = server.app.state.engine
    queued: list[httpx.Response] = []
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    engine.hold(True)
    old, engine.max_queue = engine.max_queue, 1
    waiter = threading.Thread(target=lambda: queued.append(http.post("/v1/completions", json=body)))
    try:
        waiter.start()
        deadline = time.monotonic() + 10
        while engine.queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = http.post("/v1/completions", json=body)
        _error(r, 429)
        assert r.headers["Retry-After"] == "1"
    finally:
        engine.max_queue = old
        engine.hold(False)
        waiter.join(30)
    assert queued and queued[0].status_code == 200  # the queued request still ran
