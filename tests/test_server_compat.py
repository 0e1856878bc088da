"""Where OpenAI answers a request in a particular way, the server answers the same way: sampling
ranges, unsupported fields named in a 400, context overflow, `GET /v1/models/{id}`; and `serve`
checks its address before it loads a model.
"""

from __future__ import annotations

import json
import socket

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serving import Running, load_smollm, openai_error  # noqa: E402

NAME = "smollm2-test"
CONTEXT = 1024
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
TEXT = {"model": NAME, "prompt": "Hi", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server(default_model_dir):
    from overspill.serving.openai_protocol import ServerConfig
    from overspill.serving.server import create_app

    model, tok, context = load_smollm(default_model_dir, CONTEXT)
    running = Running(create_app(model, tok, ServerConfig(NAME, context, max_new_tokens_limit=64, max_batch=4)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base, timeout=30) as c:
        yield c


OUT_OF_RANGE = [
    ("seed", 2**64), ("seed", -(2**63) - 1), ("temperature", 2.01), ("temperature", -0.1), ("top_p", 0),
    ("top_p", 1.01), ("top_k", 2**31), ("top_k", -2), ("n", 0), ("n", 2), ("max_tokens", 0), ("max_tokens", -1),
    ("max_tokens", 10**30), ("stop", ["a", "b", "c", "d", "e"]), ("top_logprobs", 21),
]


@pytest.mark.parametrize("param,value", OUT_OF_RANGE)
def test_sampling_fields_out_of_range_are_named(http, param, value):
    openai_error(http.post("/v1/chat/completions", json={**CHAT, "logprobs": True, param: value}), 400, param)


def test_non_finite_numbers_are_named(http):
    raw = '{"model": "%s", "prompt": "Hi", "max_tokens": 2, "temperature": NaN}' % NAME
    openai_error(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}),
                 400, "temperature")
    raw = raw.replace('"temperature": NaN', '"top_p": Infinity')
    openai_error(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400, "top_p")


@pytest.mark.parametrize("fields", [
    {"seed": 2**64 - 1}, {"seed": -(2**63)}, {"temperature": 2, "seed": 1}, {"temperature": 1e-300},
    {"top_k": 2**31 - 1, "temperature": 1}, {"top_p": 1e-9, "temperature": 1}, {"top_k": -1},
])
def test_sampling_fields_at_their_limits_are_served(http, fields):
    r = http.post("/v1/completions", json={**TEXT, **fields})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


UNSUPPORTED = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("response_format", {"type": "json_object"}), ("logit_bias", {"50256": -100}), ("presence_penalty", 0.5),
    ("frequency_penalty", -1.0), ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "high"), ("min_p", 0.1),
]


@pytest.mark.parametrize("param,value", UNSUPPORTED)
def test_unsupported_chat_fields_are_rejected_by_name(http, param, value):
    err = openai_error(http.post("/v1/chat/completions", json={**CHAT, param: value}), 400, param)
    assert param in err["message"]


@pytest.mark.parametrize("param,value", [("best_of", 2), ("suffix", "end"), ("echo", True), ("logit_bias", {"1": 5})])
def test_unsupported_completion_fields_are_rejected_by_name(http, param, value):
    openai_error(http.post("/v1/completions", json={**TEXT, param: value}), 400, param)


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
])
def test_non_text_content_parts_are_rejected(http, part):
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]}
    err = openai_error(http.post("/v1/chat/completions", json=body), 400, "messages.0.content")
    assert part["type"] in err["message"]


@pytest.mark.parametrize("depth", [500, 100_000])
def test_deeply_nested_json_is_a_400(http, depth):
    raw = '{"model": "%s", "prompt": "Hi", "user": %s}' % (NAME, "[" * depth + "]" * depth)
    openai_error(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    assert http.post("/v1/completions", json=TEXT).status_code == 200


def test_harmless_fields_are_accepted(http):
    harmless = {"user": "u1", "metadata": {"k": "v"}, "store": False, "stream_options": None,
                "parallel_tool_calls": True, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
                "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "modalities": ["text"],
                "service_tier": "auto", "n": 1}
    r = http.post("/v1/chat/completions", json={**CHAT, **harmless})
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={**TEXT, "user": "u1", "best_of": 1, "echo": False, "suffix": None})
    assert r.status_code == 200, r.text
    named = {**CHAT, "messages": [{"role": "system", "content": "Be brief.", "name": "rules"},
                                  {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "ann"}]}
    assert http.post("/v1/chat/completions", json=named).status_code == 200


def test_context_overflow_is_a_400_as_at_openai(http):
    long = {**TEXT, "prompt": "hello " * (CONTEXT + 10)}
    err = openai_error(http.post("/v1/completions", json=long), 400, "prompt")
    assert err["code"] == "context_length_exceeded" and str(CONTEXT) in err["message"]
    chat = {**CHAT, "messages": [{"role": "user", "content": "hello " * (CONTEXT + 10)}]}
    err = openai_error(http.post("/v1/chat/completions", json=chat), 400, "messages")
    assert err["code"] == "context_length_exceeded"


def test_asking_for_more_tokens_than_the_context_holds_is_a_400_as_at_openai(http):
    """A prompt that fits, with max_tokens that would run past the context: OpenAI and vLLM answer 400
    (it was served, cut short with finish_reason 'length')."""
    words = "hello " * (CONTEXT - 40)  # a prompt that fits, leaving fewer than 60 tokens
    text = {**TEXT, "prompt": words}
    chat = {**CHAT, "messages": [{"role": "user", "content": words}]}
    for path, body, key in (("/v1/completions", text, "max_tokens"), ("/v1/chat/completions", chat, "max_tokens"),
                            ("/v1/chat/completions", chat, "max_completion_tokens")):
        err = openai_error(http.post(path, json={**body, key: 60}), 400, key)
        assert err["code"] == "context_length_exceeded" and "in the completion" in err["message"]
        assert http.post(path, json={**body, key: 2}).status_code == 200


def test_wrong_types_and_empty_user_messages_are_400(http):
    """As at OpenAI: a string or boolean where a number or flag goes is refused, not coerced ("5" was 5 tokens,
    true was 1, "yes" streamed), and so is a user message without content; an int still passes for a float."""
    for field, value in (("max_tokens", "5"), ("max_tokens", True), ("stream", "yes"), ("temperature", "0")):
        assert http.post("/v1/completions", json={**TEXT, field: value}).status_code == 400, (field, value)
    for message in ({"role": "user", "content": None}, {"role": "user"}):
        assert http.post("/v1/chat/completions", json={**CHAT, "messages": [message]}).status_code == 400, message
    assert http.post("/v1/completions", json={**TEXT, "temperature": 0, "top_p": 1}).status_code == 200


def test_retrieve_model(http):
    r = http.get(f"/v1/models/{NAME}")
    assert r.status_code == 200 and r.json() == {"id": NAME, "object": "model", "created": 0, "owned_by": "overspill"}
    assert openai_error(http.get("/v1/models/gpt-9"), 404, "model")["code"] == "model_not_found"


def _serve_fails(capsys, monkeypatch, *argv: str) -> str:
    """`overspill serve ARGV`'s one-line error; the model must not have been loaded by then."""
    import overspill.serving.server
    from overspill.cli import main

    def no_load(args):
        raise AssertionError("serve loaded the model before checking its address")

    monkeypatch.setattr(overspill.serving.server, "load_for_serving", no_load)
    assert main(["serve", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("overspill: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_serve_rejects_a_port_out_of_range_before_loading(capsys, monkeypatch, port):
    assert "1..65535" in _serve_fails(capsys, monkeypatch, "--port", port)


def test_serve_rejects_a_port_in_use_before_loading(capsys, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = _serve_fails(capsys, monkeypatch, "--port", str(port))
    assert "in use" in err and str(port) in err and "--port" in err


def test_serve_rejects_an_unknown_host_before_loading(capsys, monkeypatch):
    assert "no-such-host.invalid" in _serve_fails(capsys, monkeypatch, "--host", "no-such-host.invalid")


def test_a_chat_template_that_refuses_the_messages_is_a_400(default_model_dir):
    import threading

    from transformers import AutoTokenizer

    from overspill.serving.openai_protocol import ApiError, ServerConfig, generation_request
    from overspill.serving.schemas import ChatCompletionRequest

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(ApiError) as caught:
        body = ChatCompletionRequest.model_validate(CHAT)
        generation_request(body, tok, threading.Lock(), ServerConfig(NAME, CONTEXT))
    err = caught.value
    assert (err.status, err.param) == (400, "messages") and "roles must alternate" in err.message


def test_requests_sample_with_the_generation_configs_settings_unless_they_name_their_own(default_model_dir):
    """As `generate` and `pipeline` (and vLLM's server) do: the model's generation_config.json sets the
    temperature, top_p and top_k a request leaves out; OpenAI's 1, 1 and no top-k stand in where it sets none."""
    import threading

    from transformers import AutoTokenizer, GenerationConfig

    from overspill.serving.openai_protocol import ServerConfig, generation_request, sampling_defaults
    from overspill.serving.schemas import ChatCompletionRequest

    class Model:
        generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9)

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    config = ServerConfig(NAME, CONTEXT, sampling=sampling_defaults(Model()))
    assert config.sampling == {"temperature": 0.6, "top_p": 0.9}
    unset = {k: v for k, v in CHAT.items() if k != "temperature"}
    req = generation_request(ChatCompletionRequest.model_validate(unset), tok, threading.Lock(), config)
    assert (req.temperature, req.top_p, req.top_k) == (0.6, 0.9, 0)
    body = ChatCompletionRequest.model_validate({**CHAT, "temperature": 0, "top_p": 1, "top_k": 5})
    req = generation_request(body, tok, threading.Lock(), config)
    assert (req.temperature, req.top_p, req.top_k) == (0, 1, 5)
    plain = generation_request(ChatCompletionRequest.model_validate(unset), tok, threading.Lock(), ServerConfig(NAME, CONTEXT))
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)


def test_sampling_defaults_keep_only_values_a_request_could_ask_for():
    from transformers import GenerationConfig

    from overspill.serving.openai_protocol import sampling_defaults

    class Model:
        generation_config = GenerationConfig(temperature=0.7, top_p=0.0, top_k=20)

    assert sampling_defaults(Model()) == {"temperature": 0.7, "top_k": 20}  # a top_p of 0 would refuse every request
    assert sampling_defaults(object()) == {}


def test_completion_text_offsets_count_characters_of_the_text(http):
    """A token holding part of a UTF-8 character shows as "bytes:\\xNN...", but its text_offset counts
    characters of the completion: offsets stay within the text, and a stream counts them as the answer does."""
    body = {**TEXT, "prompt": "日本語で答えて: こんにちは", "max_tokens": 8, "logprobs": 1}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    assert any(t.startswith("bytes:") for t in lp["tokens"]), lp["tokens"]  # the case this test is about
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text), (offsets, text)
    streamed = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])["choices"][0]
                streamed += (chunk["logprobs"] or {}).get("text_offset", [])
    assert streamed == offsets


def test_text_offsets_of_split_characters():
    from overspill.serving.schemas import TextOffsets, TokenInfo, completion_logprobs

    def token(raw: bytes) -> TokenInfo:
        return TokenInfo(raw.decode("utf-8", "replace"), list(raw), -1.0)

    a, ne = "ア".encode(), "ネ".encode()
    tokens = [token(b" x"), token(a[:2]), token(a[2:] + ne[:1]), token(ne[1:]), token(b"!")]
    assert completion_logprobs(tokens)["text_offset"] == [0, 2, 2, 3, 4]  # " x" "ア" "ネ" "!"
    offsets = TextOffsets()  # a stream's chunks count on from the earlier ones
    assert [completion_logprobs([t], offsets)["text_offset"] for t in tokens] == [[0], [2], [2], [3], [4]]


@pytest.mark.parametrize("headers,content,says", [
    ({"Content-Type": "application/x-www-form-urlencoded"}, json.dumps(TEXT), "Content-Type: application/json"),
    ({"Content-Type": "application/json"}, "[1, 2]", "JSON object"),
    ({"Content-Type": "application/json"}, "", "empty"),
], ids=["form", "array", "empty"])
def test_a_body_that_is_not_a_json_object_says_what_to_send(http, headers, content, says):
    err = openai_error(http.post("/v1/completions", content=content, headers=headers), 400)
    assert says in err["message"], err


def test_a_client_that_leaves_before_its_answer_is_not_counted_as_a_server_error(server):
    """A non-streamed client that disconnects cancels its request; /metrics counts that 499 (as nginx
    logs it), not a 503, which alerts on server errors would fire on."""
    import time

    engine, metrics = server.app.state.engine, server.app.state.metrics

    def count(status: str) -> float:
        return metrics.requests.labels("/v1/completions", status)._value.get()

    server_errors, left = count("503"), count("499")
    body = json.dumps({**TEXT, "max_tokens": 32}).encode()
    engine.hold(True)  # it waits in the queue while its client leaves
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 30
            while engine.queue_depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        deadline = time.monotonic() + 30
        while count("499") == left and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        engine.hold(False)
    assert (count("499"), count("503")) == (left + 1, server_errors)
    assert engine.live_requests() == 0


def test_a_developer_message_is_the_system_prompt(http):
    """OpenAI's "developer" role replaces "system" (its newer clients send it); chat templates know only
    "system", and SmolLM2's would put its default system prompt before a turn it does not know."""
    def answer(role: str) -> dict:
        messages = [{"role": role, "content": "Answer in French."}, {"role": "user", "content": "Say hi"}]
        r = http.post("/v1/chat/completions", json={**CHAT, "messages": messages, "max_tokens": 6})
        assert r.status_code == 200, r.text
        return r.json()

    developer, system = answer("developer"), answer("system")
    assert developer["usage"] == system["usage"]
    assert developer["choices"][0]["message"] == system["choices"][0]["message"]


def test_a_wrong_url_or_method_says_what_this_server_answers(http):
    err = openai_error(http.post("/v1/chat/completion", json=CHAT), 404)  # a typo of the endpoint
    assert "/v1/chat/completions" in err["message"] and "/v1/chat/completion" in err["message"], err
    err = openai_error(http.get("/v1/completions"), 405)
    assert "GET" in err["message"] and "POST" in err["message"], err
