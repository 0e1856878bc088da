"""Random request bodies against a live server: every answer is a 200 or a 4xx in OpenAI's error
shape, never a 5xx, an error inside a stream, or a hang; and the server still answers afterwards.

`hypothesis` is not a dependency, so bodies come from a seeded, bounded generator: each field is
left out, valid, at a limit, past it, of the wrong type, or a string with lone surrogates.
"""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serving import ERROR_KEYS, Running, load_smollm  # noqa: E402

NAME = "smollm2-test"
BODIES = 200
SEED = 20240601
LIMIT = 4  # max_new_tokens_limit: valid bodies finish in a few decode steps

ODD = [None, True, -1, 0, 2**63, -(2**64), 2**70, 1e308, -1e-300, "", "x", "\ud800", [], {}, [1, "a"], {"a": None}]
STRINGS = ["hi", "", " ", "\ud800", "a\udfffb", "\U0001f3d4\ufe0f", "\x00", "<|im_end|>", "é" * 50, "hello " * 300]
FIELDS = {  # name -> values worth trying besides ODD
    "temperature": [0, 0.7, 1e-300, 1e-45, 2, 2.0001, -0.0, 5e-324],
    "top_p": [1, 0.5, 1e-12, 0, 1.5],
    "top_k": [0, -1, 1, 5, 2**31 - 1, 2**31, 2**63, -2],
    "seed": [0, 1, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 2**70],
    "max_tokens": [1, 2, LIMIT, LIMIT + 1, 0, -5, 10**30],
    "n": [1, 2, 0, 128],
    "stop": ["\n", ["a", "b"], ["x"] * 5, [""], "\ud800", [None]],
    "stream": [True, False],
    "stream_options": [{"include_usage": True}, {}, None, "yes"],
    "presence_penalty": [0, 0.0, 1.5, -2.5],
    "logit_bias": [{}, {"1": -100}, {"1": "a"}],
    "tools": [[], [{"type": "function", "function": {"name": "f"}}]],
    "response_format": [{"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {}}],
    "user": ["u", "\ud800"],
    "metadata": [{"k": "v"}, {"k": "\udfff"}],
    "unknown_field": [1, "x"],
}
CHAT_FIELDS = {
    "logprobs": [True, False], "top_logprobs": [0, 3, 20, 21, -1], "max_completion_tokens": [1, 3, 0, LIMIT + 1],
    "tool_choice": ["none", "auto", {"type": "function"}],
}
TEXT_FIELDS = {"logprobs": [0, 2, 5, 6, -1], "echo": [False, True], "best_of": [1, 2], "suffix": [None, "x"]}
VALID = {  # values that must be served: half the bodies draw only from these, so many reach the engine
    "temperature": [0, 0.7, 1e-300, 1e-45, 2, 5e-324], "top_p": [1, 0.5, 1e-12], "top_k": [0, -1, 1, 5, 2**31 - 1],
    "seed": [0, 2**64 - 1, -(2**63)], "stop": ["\n", ["a", "b"], [""], "\ud800"], "stream": [True, False],
    "stream_options": [{"include_usage": True}, None], "presence_penalty": [0], "logit_bias": [{}],
    "user": ["u", "\ud800"], "metadata": [{"k": "\udfff"}],
}


def _value(rng: random.Random, choices: list):
    return rng.choice(choices) if rng.random() < 0.8 else rng.choice(ODD)


def _content(rng: random.Random):
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(STRINGS)
    if roll < 0.8:
        return [{"type": "text", "text": rng.choice(STRINGS)},
                rng.choice([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "u"}},
                            {"type": "text"}, {"text": "no type"}, "bare string"])]
    return rng.choice(ODD)


def _messages(rng: random.Random, wild: bool):
    if not wild:
        return [{"role": "user", "content": rng.choice(STRINGS[:-1])}]
    if rng.random() < 0.1:
        return rng.choice(ODD)
    roles = ["system", "user", "assistant", "developer", "tool", "robot", None]
    return [{"role": rng.choice(roles) if rng.random() < 0.2 else "user", "content": _content(rng)}
            | ({"name": rng.choice(STRINGS)} if rng.random() < 0.1 else {})
            for _ in range(rng.randint(0, 3))]


def _body(rng: random.Random) -> tuple[str, bytes]:
    """(path, raw JSON bytes): half plausible bodies (valid values only), half with fields drawn wild."""
    chat, wild = rng.random() < 0.6, rng.random() < 0.5
    body: dict = {"model": NAME if not wild or rng.random() < 0.9 else _value(rng, ["other", "\ud800"]),
                  "max_tokens": rng.randint(1, LIMIT)}
    if chat:
        body["messages"] = _messages(rng, wild)
    elif wild:
        body["prompt"] = rng.choice([rng.choice(STRINGS), [rng.choice(STRINGS)], ["a", "b"], [1, 2], rng.choice(ODD)])
    else:
        body["prompt"] = rng.choice(STRINGS[1:])
    fields = (FIELDS | (CHAT_FIELDS if chat else TEXT_FIELDS)) if wild else VALID
    for name, values in fields.items():
        if rng.random() < 0.15:
            body[name] = _value(rng, values) if wild else rng.choice(values)
    for required in ("model", "messages" if chat else "prompt"):
        if wild and rng.random() < 0.05:
            body.pop(required)
    raw = json.dumps(body).encode("ascii")  # escapes keep lone surrogates as `\ud800`
    roll = rng.random() if wild else 1.0
    if roll < 0.05:
        raw = raw[: rng.randint(0, len(raw))]  # truncated JSON
    elif roll < 0.1:
        raw = json.dumps(rng.choice(ODD)).encode("ascii")  # not an object
    return ("/v1/chat/completions" if chat else "/v1/completions"), raw


@pytest.fixture(scope="module")
def server(default_model_dir):
    from overspill.serving.openai_protocol import ServerConfig
    from overspill.serving.server import create_app

    model, tok, context = load_smollm(default_model_dir, 1024)
    running = Running(create_app(model, tok, ServerConfig(NAME, context, max_new_tokens_limit=LIMIT, max_batch=4)))
    yield running
    running.stop()


def _check(resp: httpx.Response, path: str, raw: bytes) -> None:
    where = f"{path} {raw[:300]!r}"
    assert resp.status_code == 200 or 400 <= resp.status_code < 500, f"{resp.status_code} for {where}: {resp.text}"
    if resp.status_code != 200:
        assert set(resp.json()["error"]) == ERROR_KEYS, f"{where}: {resp.text}"
        return
    if resp.headers["content-type"].startswith("text/event-stream"):
        assert '"error"' not in resp.text and resp.text.endswith("data: [DONE]\n\n"), f"{where}: {resp.text}"
    else:
        assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length"), f"{where}: {resp.text}"


def test_random_bodies_get_a_200_or_an_openai_4xx(server):
    rng = random.Random(SEED)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.base, timeout=15, headers={"Content-Type": "application/json"}) as c:
        for _ in range(BODIES):
            path, raw = _body(rng)
            resp = c.post(path, content=raw)
            _check(resp, path, raw)
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        after = c.post("/v1/completions", json={"model": NAME, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1
    refused = sum(count for status, count in statuses.items() if status >= 400)
    assert statuses.get(200, 0) >= BODIES // 4 and refused >= BODIES // 4, statuses
