"""`overspill batch`: OpenAI Batch files through one engine, on CPU with the embedded SmolLM2.

One float32 model and engine per module. The engine's queue holds 2 requests and it decodes up to
4 sequences together, so a batch of 6 exercises both the queue-full wait and the batched decode.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from overspill import cli  # noqa: E402

NAME = "smollm2-test"
CONTEXT = 1024
LIMIT = 32
QUEUE = 2
MAX_BATCH = 4
CHAT, COMPLETION = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def served(default_model_dir):
    import overspill
    from overspill.serving.engine import Engine
    from overspill.serving.openai_protocol import ServerConfig

    # float32: batched and lone decodes then agree exactly; in bf16 their rounding differs (batch
    # shapes change the matmul reductions) and greedy texts can part after a dozen tokens.
    model, tok = overspill.load(default_model_dir, gpu_memory=None, dtype="float32", progress=False,
                                context=CONTEXT, batch=MAX_BATCH)
    context = overspill.api.placement_of(model).plan.workload.context
    engine = Engine(model, tok, max_queue=QUEUE, max_batch=MAX_BATCH)
    engine.start()
    yield engine, ServerConfig(NAME, context, max_queue=QUEUE, max_new_tokens_limit=LIMIT)
    engine.close()


def run(served, inp: Path, out: Path, timeout: float = 120.0):
    """`run_batch` on `served` = (engine, config), failing instead of hanging if the engine thread dies or stalls."""
    from overspill.serving.batch import run_batch

    engine, config = served
    done: dict = {}

    def target():
        try:
            done["summary"] = run_batch(engine, inp, out, config, progress=False)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            done["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the batch never finished: the engine thread is dead or stuck"
    if "error" in done:
        raise done["error"]
    return done["summary"]


def chat(cid: str, content: str, **body) -> dict:
    body = {"model": NAME, "messages": [{"role": "user", "content": content}], "temperature": 0, **body}
    return {"custom_id": cid, "method": "POST", "url": CHAT, "body": body}


def completion(cid: str, prompt: str, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": COMPLETION, "body": {"model": NAME, "prompt": prompt, "temperature": 0, **body}}


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_id(path: Path) -> dict[str, dict]:
    rows = results(path)
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == len(set(ids)), f"a custom_id is written twice: {ids}"
    return dict(zip(ids, rows))


MIXED = [
    chat("c1", "What is the highest mountain in the world?", max_tokens=12),
    completion("p1", "The capital of France is", max_tokens=6),
    chat("c2", "Name a fruit.", max_completion_tokens=5),
    completion("p2", ["Once upon a time"], max_tokens=7),
    chat("c3", "Count to three.", max_tokens=6),
    completion("p3", "1, 2, 3,", max_tokens=5),
]


@pytest.fixture(scope="module")
def mixed(served, tmp_path_factory):
    """The MIXED batch run once: (summary, results by custom_id)."""
    tmp = tmp_path_factory.mktemp("mixed")
    out = tmp / "out.jsonl"
    summary = run(served, write_jsonl(tmp / "in.jsonl", MIXED), out)
    return summary, by_id(out)


def test_mixed_chat_and_completion_lines(mixed):
    summary, rows = mixed
    assert (summary.total, summary.skipped, summary.ok, summary.failed, summary.unfinished) == (6, 0, 6, 0, 0)
    assert set(rows) == {line["custom_id"] for line in MIXED}
    for line in MIXED:
        row = rows[line["custom_id"]]
        assert row["id"].startswith("batch_req_") and row["error"] is None
        resp = row["response"]
        assert resp["status_code"] == 200 and resp["request_id"].startswith("req_")
        body = resp["body"]
        assert body["model"] == NAME
        asked = line["body"].get("max_tokens") or line["body"].get("max_completion_tokens")
        assert 0 < body["usage"]["completion_tokens"] <= asked
        choice = body["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        if line["url"] == CHAT:
            assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
        else:
            assert body["object"] == "text_completion" and isinstance(choice["text"], str)
    assert "Everest" in rows["c1"]["response"]["body"]["choices"][0]["message"]["content"]
    assert summary.generated_tokens == sum(r["response"]["body"]["usage"]["completion_tokens"] for r in rows.values())
    assert summary.tokens_per_second > 0 and "6 ok, 0 failed" in summary.report()


def test_greedy_batch_equals_each_request_alone(served, mixed):
    from overspill.serving.engine import GenerationRequest
    from overspill.serving.openai_protocol import _chat_ids

    engine, _ = served
    _, rows = mixed
    for line in MIXED:
        body = line["body"]
        if line["url"] == CHAT:
            ids = _chat_ids(engine.tokenizer, body["messages"])
        else:
            prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
            ids = engine.tokenizer(prompt)["input_ids"]
        wanted = body.get("max_tokens") or body.get("max_completion_tokens")
        events = list(engine.submit(GenerationRequest(tuple(ids), wanted, temperature=0.0)))
        alone = "".join(e.text for e in events)
        choice = rows[line["custom_id"]]["response"]["body"]["choices"][0]
        assert (choice["message"]["content"] if line["url"] == CHAT else choice["text"]) == alone, line["custom_id"]
        assert choice["finish_reason"] == events[-1].finish


def test_bad_lines_get_error_lines_and_the_rest_runs(served, tmp_path):
    lines = [
        "{not json",
        chat("ok1", "Hi", max_tokens=3),
        {**chat("url", "Hi"), "url": "/v1/embeddings"},
        {**chat("method", "Hi"), "method": "GET"},
        {"method": "POST", "url": CHAT, "body": chat("x", "Hi")["body"]},  # no custom_id
        chat("temp", "Hi", temperature="hot"),
        {"custom_id": "nomsg", "method": "POST", "url": CHAT, "body": {"model": NAME}},
        {"custom_id": "nobody", "method": "POST", "url": COMPLETION},
        chat("model", "Hi", model="gpt-9"),
        completion("toomany", "Hi", max_tokens=LIMIT + 1),
        completion("long", "hello " * (CONTEXT + 10), max_tokens=1),
        chat("stream", "Hi", stream=True),
        completion("ok2", "Hello", max_tokens=3),
    ]
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    summary = run(served, inp, out)
    assert (summary.total, summary.ok, summary.failed) == (13, 2, 11)
    rows = results(out)
    named = {r["custom_id"]: r["response"] for r in rows if r["custom_id"] is not None}
    anonymous = [r["response"] for r in rows if r["custom_id"] is None]
    for resp in [*named.values(), *anonymous]:
        if resp["status_code"] != 200:
            assert set(resp["body"]["error"]) == {"message", "type", "param", "code"} and resp["body"]["error"]["message"]

    def err(cid: str, status: int) -> dict:
        assert named[cid]["status_code"] == status, named[cid]
        return named[cid]["body"]["error"]

    assert named["ok1"]["status_code"] == named["ok2"]["status_code"] == 200
    assert err("url", 404)["param"] == "url"
    assert err("method", 405)["param"] == "method"
    assert err("temp", 400)["param"] == "temperature"
    assert err("nomsg", 400)["param"] == "messages"
    assert err("nobody", 400)["message"]
    assert err("model", 404)["code"] == "model_not_found"
    assert err("toomany", 400)["param"] == "max_tokens"
    assert err("long", 400)["code"] == "context_length_exceeded"  # OpenAI answers a too-long prompt 400
    assert err("stream", 400)["param"] == "stream"
    assert sorted(r["status_code"] for r in anonymous) == [400, 400]
    messages = " ".join(r["body"]["error"]["message"] for r in anonymous)
    assert "input line 1 is not valid JSON" in messages and "input line 5 has no custom_id" in messages
    # A rerun recognizes every line it wrote, the anonymous error lines included: nothing is added.
    before = out.read_text()
    again = run(served, inp, out)
    assert (again.skipped, again.ok, again.failed) == (13, 0, 0)
    assert out.read_text() == before


def test_resume_runs_only_missing_custom_ids(served, tmp_path, monkeypatch):
    lines = [completion(f"r{i}", f"Item {i}:", max_tokens=3) for i in range(5)]
    out = tmp_path / "out.jsonl"
    first = run(served, write_jsonl(tmp_path / "first.jsonl", lines[:2]), out)
    assert first.ok == 2
    kept = out.read_text()
    with open(out, "a") as f:  # a run killed in the middle of writing a line
        f.write('{"id": "batch_req_x", "custom_id": "r2", "resp')
    engine, _ = served
    submitted = []
    real_submit = engine.submit

    def spy(req, sink=None):
        handle = real_submit(req, sink)  # QueueFull passes through before anything is recorded
        submitted.append(req.prompt_ids)
        return handle

    monkeypatch.setattr(engine, "submit", spy)
    second = run(served, write_jsonl(tmp_path / "all.jsonl", lines), out)
    assert (second.total, second.skipped, second.ok, second.failed) == (5, 2, 3, 0)
    assert len(submitted) == 3
    assert out.read_text().startswith(kept)  # earlier results untouched; the cut-off line is gone
    assert set(by_id(out)) == {f"r{i}" for i in range(5)}


def alone(engine, prompt: str, max_tokens: int, **sampling) -> str:
    """A completion prompt's text generated alone on the engine."""
    from overspill.serving.engine import GenerationRequest

    ids = tuple(engine.tokenizer(prompt)["input_ids"])
    return "".join(e.text for e in engine.submit(GenerationRequest(ids, max_tokens, **sampling)))


def test_bad_lines_fail_alone_and_resume_reruns_server_errors(served, tmp_path, monkeypatch):
    """Lines that once killed the engine (seed 2**70) or failed every row of their batch (temperature
    1e-300, top_k 2**63), and one whose detokenizing raises: each gets its own row, every good line its
    normal answer. A rerun runs again only the row that failed with a server error (5xx)."""
    from test_engine_isolation import raise_in_detok

    engine, _ = served
    raise_in_detok(monkeypatch)
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,", "Water boils at"]
    good = [completion(f"g{i}", p, max_tokens=6) for i, p in enumerate(prompts)]
    lines = [good[0], completion("seed", "Hi there", max_tokens=4, seed=2**70), good[1],
             completion("tiny-temp", "The sky is", max_tokens=5, temperature=1e-300), good[2],
             completion("huge-top-k", "Hello", max_tokens=4, temperature=0.7, top_k=2**63, seed=5),
             completion("boom", "Tell me", max_tokens=4, stop=["BOOM"]), good[3]]
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    summary = run(served, inp, out)
    assert (summary.total, summary.ok, summary.failed) == (8, 5, 3)
    rows = {cid: row["response"] for cid, row in by_id(out).items()}
    assert set(rows) == {line["custom_id"] for line in lines}
    expected = {f"g{i}": alone(engine, p, 6) for i, p in enumerate(prompts)}
    expected["tiny-temp"] = alone(engine, "The sky is", 5)  # below the temperature floor: greedy
    for cid, text in expected.items():
        assert rows[cid]["status_code"] == 200 and rows[cid]["body"]["choices"][0]["text"] == text, cid
    assert rows["seed"]["status_code"] == 400 and rows["seed"]["body"]["error"]["param"] == "seed"
    assert rows["huge-top-k"]["status_code"] == 400 and rows["huge-top-k"]["body"]["error"]["param"] == "top_k"
    assert rows["boom"]["status_code"] == 500 and "tokenizer exploded" in rows["boom"]["body"]["error"]["message"]
    assert engine.alive and engine.live_requests() == 0

    monkeypatch.undo()  # the fault is fixed; the rerun retries the 500 row only
    submitted = []
    real_submit = engine.submit

    def spy(req, sink=None):
        handle = real_submit(req, sink)
        submitted.append(req)
        return handle

    monkeypatch.setattr(engine, "submit", spy)
    again = run(served, inp, out)
    assert (again.skipped, again.rerun, again.ok, again.failed) == (7, 1, 1, 0) and len(submitted) == 1
    assert "1 run again after a server error" in again.report()
    after = {cid: row["response"] for cid, row in by_id(out).items()}  # one row per custom_id still
    assert after["boom"]["status_code"] == 200
    assert {cid: r for cid, r in after.items() if cid != "boom"} == {cid: r for cid, r in rows.items() if cid != "boom"}
    assert run(served, inp, out).skipped == 8  # nothing left to run


def test_a_dead_engine_stops_the_batch_and_a_rerun_finishes_it(served, tmp_path, monkeypatch):
    from overspill.errors import OverspillError
    from overspill.serving.engine import Engine

    engine, config = served
    doomed = Engine(engine.model, engine.tokenizer, max_queue=QUEUE, max_batch=MAX_BATCH)

    class Fatal(BaseException):
        pass

    def fatal():
        raise Fatal("simulated")

    monkeypatch.setattr(doomed, "_iterate", fatal)
    doomed.start()
    lines = [completion(f"d{i}", f"Item {i}:", max_tokens=3) for i in range(8)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    try:
        with pytest.raises(OverspillError, match="the engine thread died: Fatal: simulated"):
            run((doomed, config), inp, out)
    finally:
        doomed.close()
    failed = results(out)
    assert failed and all(r["response"]["status_code"] == 500 for r in failed)
    summary = run(served, inp, out)
    assert (summary.rerun, summary.ok, summary.failed) == (len(failed), 8, 0)
    assert set(by_id(out)) == {f"d{i}" for i in range(8)}


def test_duplicate_custom_id_gets_an_error_line(served, tmp_path):
    lines = [completion("a", "One", max_tokens=2), completion("b", "Two", max_tokens=2), completion("a", "Three", max_tokens=2)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    summary = run(served, inp, out)
    assert (summary.ok, summary.failed) == (2, 1)
    rows = results(out)
    assert sorted(r["custom_id"] for r in rows) == ["a", "a", "b"]
    dup = [r for r in rows if r["response"]["status_code"] != 200]
    assert len(dup) == 1 and dup[0]["custom_id"] == "a" and dup[0]["response"]["status_code"] == 400
    error = dup[0]["response"]["body"]["error"]
    assert error["code"] == "duplicate_custom_id" and "input line 3 repeats input line 1" in error["message"]
    before = out.read_text()
    again = run(served, inp, out)
    assert (again.skipped, again.ok, again.failed) == (3, 0, 0) and out.read_text() == before


def test_existing_output_that_is_not_results_is_refused(served, tmp_path):
    from overspill.errors import OverspillError

    out = tmp_path / "out.jsonl"
    out.write_text("not a result\n")
    with pytest.raises(OverspillError, match="line 1 of existing output"):
        run(served, write_jsonl(tmp_path / "in.jsonl", [completion("a", "Hi", max_tokens=1)]), out)


def one_line_error(capsys, argv: list[str], *words: str) -> None:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("overspill: error:"), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_cli_bad_paths_give_one_line_errors(capsys, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [completion("a", "Hi")])
    one_line_error(capsys, ["batch", str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl")], "missing.jsonl", "does not exist")
    one_line_error(capsys, ["batch", str(inp), str(tmp_path / "nodir" / "out.jsonl")], "nodir", "does not exist")
    one_line_error(capsys, ["batch", str(inp), str(tmp_path)], "is a directory")
    one_line_error(capsys, ["batch", str(inp), str(tmp_path / "out.jsonl"), "--max-batch", "0"], "--max-batch")


def test_cli_bad_files_are_refused_before_loading(capsys, tmp_path, monkeypatch):
    # A 70B model takes minutes to load: a file the run would refuse must be found first.
    from overspill.serving import batch

    monkeypatch.setattr(batch, "load_for_serving", lambda args: pytest.fail("loaded the model before checking the files"))
    good = write_jsonl(tmp_path / "in.jsonl", [completion("a", "Hi")])
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"custom_id": "caf\xe9"}\n')
    one_line_error(capsys, ["batch", str(latin1), str(tmp_path / "out.jsonl")], "latin1.jsonl", "not UTF-8")
    out = tmp_path / "notes.jsonl"
    out.write_text("my notes\n")
    one_line_error(capsys, ["batch", str(good), str(out)], "line 1 of existing output", "notes.jsonl")
    assert out.read_text() == "my notes\n"  # checked, not rewritten
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    one_line_error(capsys, ["batch", str(empty), str(tmp_path / "out.jsonl")], "empty.jsonl", "has no requests")


def test_cli_a_finished_batch_resumed_does_not_load_the_model(capsys, tmp_path, monkeypatch):
    from overspill.serving import batch

    monkeypatch.setattr(batch, "load_for_serving", lambda args: pytest.fail("loaded the model with nothing to run"))
    good = write_jsonl(tmp_path / "in.jsonl", [completion("a", "Hi"), completion("b", "Ho")])
    done = {"id": "batch_req_1", "error": None, "response": {"status_code": 200, "request_id": "r", "body": {}}}
    out = write_jsonl(tmp_path / "out.jsonl", [{**done, "custom_id": "a"}, {**done, "custom_id": "b"}])
    assert cli.main(["batch", str(good), str(out)]) == 0
    assert "all 2 requests of" in capsys.readouterr().out and len(results(out)) == 2


def test_cli_batch_and_serve_document_every_flag(capsys):
    parser = cli._build_parser()
    choices = next(a for a in parser._subparsers._group_actions).choices
    for name in ("batch", "serve"):
        sub = choices[name]
        assert "--max-batch" in sub.format_help()
        for action in sub._actions:
            assert action.help, (name, action.dest)
    args = parser.parse_args(["batch", "in.jsonl", "out.jsonl", "--model", "m"])
    assert (args.input, args.output, args.model, args.max_batch) == ("in.jsonl", "out.jsonl", "m", 16)
    assert parser.parse_args(["serve", "--max-batch", "8"]).max_batch == 8


def test_cli_batch_end_to_end(default_model_dir, tmp_path, capsys):
    lines = [chat("q", "What is the highest mountain in the world?", max_tokens=6, model="SmolLM2-135M-Instruct"),
             completion("p", "Hello", max_tokens=3, model="SmolLM2-135M-Instruct"),
             completion("wrong-model", "Hello", max_tokens=3)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    code = cli.main(["batch", str(inp), str(out), "--context", "512", "--max-batch", "2"])
    text = capsys.readouterr().out
    assert code == 0
    rows = by_id(out)
    assert rows["q"]["response"]["status_code"] == rows["p"]["response"]["status_code"] == 200
    assert rows["wrong-model"]["response"]["status_code"] == 404
    assert "2 ok, 1 failed of 3 requests (0 skipped" in text and "tok/s" in text


def test_a_custom_id_with_a_lone_surrogate_escape_does_not_stop_the_batch(served, tmp_path):
    """JSON allows a "\\ud800" escape, which json.loads turns into a str UTF-8 cannot encode: the
    output line must still be written (as an escape), the rest of the file run, and a rerun skip it."""
    lines = [completion("before", "One", max_tokens=2), completion("bad\ud800id", "Two", max_tokens=2),
             completion("after", "Three", max_tokens=2)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))  # ensure_ascii: the escape as written
    out = tmp_path / "out.jsonl"
    summary = run(served, inp, out)
    assert (summary.ok, summary.failed) == (3, 0)
    assert sorted(r["custom_id"] for r in results(out)) == ["after", "bad\ud800id", "before"]
    again = run(served, inp, out)
    assert (again.skipped, again.ok, again.failed) == (3, 0, 0)


def test_an_input_file_saved_with_a_utf8_bom_runs_every_line(served, tmp_path):
    """Editors on Windows save UTF-8 with a byte-order mark; it is not part of the first request."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [completion("first", "One", max_tokens=2), completion("second", "Two", max_tokens=2)]
    inp.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(line) + "\r\n" for line in lines).encode())
    summary = run(served, inp, out)
    assert (summary.ok, summary.failed) == (2, 0)
    assert sorted(by_id(out)) == ["first", "second"]
