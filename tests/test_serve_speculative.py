"""Speculative decoding in the engine, the server and `overspill batch`, on CPU.

Tiny float32 random-weight models (conftest) with 4 of 8 layers streamed: a request running alone
drafts with prompt lookup and verifies each chain in one pass; its greedy output is the plain
engine's token for token, its KV blocks match its cache at every step, and speculation stops while
two or more requests share the pass. Then the embedded SmolLM2 through the HTTP server.
"""

from __future__ import annotations

import json

import pytest
import torch

from overspill.serving.engine import Engine, GenerationRequest, InvalidRequest
from overspill.serving.requests import NullMetrics
from overspill.serving.sampling import pick_tokens
from overspill.serving.sampling import sampling_scores

from test_engine import IdsTokenizer
from test_placement import load_tiny

# prompts that repeat themselves, so prompt lookup has something to propose
PROMPTS = [(5, 9, 14, 3, 7, 5, 9, 14), tuple(range(30, 44)) * 2, (8, 200, 8, 200, 8), (100, 101, 102, 100, 101)]
NEW = [20, 14, 9, 16]


class Recorder(NullMetrics):
    """Records decode steps and verify passes; `check()`, if set, runs after each pass (engine thread)."""

    def __init__(self):
        self.sizes: list[int] = []
        self.passes: list[tuple[int, int, int]] = []  # (drafted, accepted, running requests)
        self.engine: Engine | None = None
        self.check = None

    def decode_step(self, batch_size, seconds):
        self.sizes.append(batch_size)

    def speculated(self, drafted, accepted, tokens, draft_seconds, verify_seconds):
        assert tokens == accepted + 1 and 0 <= accepted <= drafted and draft_seconds >= 0 <= verify_seconds
        self.passes.append((drafted, accepted, len(self.engine.scheduler.running)))
        if self.check is not None:
            self.check()


def _engine(model, **kwargs) -> Engine:
    model.generation_config.eos_token_id = None  # random weights: every request runs its full length
    kwargs.setdefault("kv_capacity_tokens", 64 * kwargs.get("max_batch", 1))
    metrics = Recorder()
    engine = Engine(model, IdsTokenizer(), metrics=metrics, **kwargs)
    metrics.engine = engine
    engine.start()
    return engine


def _run(engine: Engine, requests: list[GenerationRequest], together: bool = False) -> list[tuple[str, object]]:
    """(text, speculation usage of the last event) per request."""
    if together:
        engine.hold(True)
    handles = [engine.submit(r) for r in requests] if together else []
    if together:
        engine.hold(False)
    out = []
    for i, r in enumerate(requests):
        events = list(handles[i] if together else engine.submit(r))
        out.append(("".join(e.text for e in events), events[-1].speculation))
    return out


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return load_tiny(tiny_checkpoint("llama"), resident=4)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral"])
def test_greedy_with_speculation_equals_the_plain_engine(tiny_checkpoint, arch):
    model = load_tiny(tiny_checkpoint(arch), resident=4)
    plain, spec = _engine(model, max_batch=4), _engine(model, max_batch=4, speculate="ngram")
    try:
        requests = [GenerationRequest(p, n) for p, n in zip(PROMPTS, NEW)]
        want = _run(plain, requests)
        got = _run(spec, requests)
        assert [t for t, _ in got] == [t for t, _ in want]
        assert all(u is None for _, u in want) and not plain.metrics.passes
        usages = [u for _, u in got]
        assert all(u is not None and u.passes for u in usages)
        assert sum(u.accepted for u in usages) > 0  # the repeats were proposed and some accepted
        # the first token comes from the prompt's pass, and a last one left alone from a plain step
        assert sum(NEW) - 2 * len(requests) <= sum(u.tokens for u in usages) <= sum(NEW) - len(requests)
        assert max(spec.metrics.sizes) == 1 and len(spec.metrics.passes) < sum(NEW) - len(requests)
        assert spec.live_requests() == 0 and spec.kv_stats().used_blocks == 0
    finally:
        plain.close()
        spec.close()


def test_kv_blocks_match_the_cache_after_every_verify_pass(llama):
    """Rejected drafts' columns leave the cache and are never counted: blocks hold exactly the kept columns."""
    engine = _engine(llama, speculate="ngram")
    seen = []

    def check():
        seq = engine._batch.rows[0]
        assert engine.blocks.num_tokens(seq.key) == engine._batch.held_tokens()
        assert engine._batch.held_tokens() == len(seq.request.prompt_ids) + len(seq.text.ids) - 1 + seen[-1]

    def record_then_check():
        drafted, accepted, _ = engine.metrics.passes[-1]
        seen.append(accepted + 1)  # the pass's tokens are pushed after it: the batch row lags by them
        check()

    engine.metrics.check = record_then_check
    try:
        _run(engine, [GenerationRequest(p, n) for p, n in zip(PROMPTS, NEW)])
        assert seen and any(d > a for d, a, _ in engine.metrics.passes)  # some drafts were rejected
    finally:
        engine.close()


def test_speculation_turns_off_while_requests_share_the_pass(llama):
    engine = _engine(llama, max_batch=4, speculate="ngram")
    try:
        outputs = _run(engine, [GenerationRequest(p, n) for p, n in zip(PROMPTS, NEW)], together=True)
        assert max(engine.metrics.sizes) == 4
        assert engine.metrics.passes and all(running == 1 for _, _, running in engine.metrics.passes)
        longest = max(range(len(NEW)), key=NEW.__getitem__)
        assert outputs[longest][1] is not None  # the last one running drafted once it was alone
    finally:
        engine.close()
    solo = _engine(llama, max_batch=4)
    try:
        assert [t for t, _ in outputs] == [t for t, _ in _run(solo, [GenerationRequest(p, n) for p, n in zip(PROMPTS, NEW)])]
    finally:
        solo.close()


def test_requests_choose_their_source_or_turn_it_off(llama, tiny_checkpoint):
    engine = _engine(llama)  # no default: only requests that ask draft
    try:
        [(_, none)] = _run(engine, [GenerationRequest(PROMPTS[0], 10)])
        [(_, asked)] = _run(engine, [GenerationRequest(PROMPTS[0], 10, speculate="ngram")])
        assert none is None and asked is not None and asked.passes
        with pytest.raises(InvalidRequest, match="unknown speculate source") as bad:
            engine.submit(GenerationRequest(PROMPTS[0], 4, speculate="medusa"))
        assert bad.value.field == "speculate"
        with pytest.raises(InvalidRequest, match="this server drafts with 'ngram', 'off' only"):
            engine.submit(GenerationRequest(PROMPTS[0], 4, speculate=f"draft:{tiny_checkpoint('llama')}"))
    finally:
        engine.close()
    engine = _engine(llama, speculate="ngram")
    try:
        [(_, off)] = _run(engine, [GenerationRequest(PROMPTS[0], 10, speculate="off")])
        assert off is None and not engine.metrics.passes
    finally:
        engine.close()


def test_logprobs_and_seeded_sampling_with_speculation(llama):
    spec, plain = _engine(llama, speculate="ngram"), _engine(llama)
    try:
        greedy = GenerationRequest(PROMPTS[1], 12, logprobs=2)
        a, b = list(spec.submit(greedy)), list(plain.submit(greedy))
        assert [lp.token_id for e in a for lp in e.logprobs] == [lp.token_id for e in b for lp in e.logprobs]
        for x, y in zip([lp for e in a for lp in e.logprobs], [lp for e in b for lp in e.logprobs]):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
        seeded = [GenerationRequest(PROMPTS[1], 12, temperature=0.8, top_k=40, top_p=0.9, seed=7)] * 2
        first, again = [t for t, _ in _run(spec, seeded)]
        assert first == again and len(first.split()) == 12  # the request's generator decides every draw
        assert spec.metrics.passes
        # an ngram chain keeps a draft where the target's own draw is it: the plain server's very tokens
        repeats = GenerationRequest((5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6), 16, temperature=0.7, seed=3)
        [(drafted, usage)] = _run(spec, [repeats])
        [(plain_tokens, _)] = _run(plain, [repeats])
        assert usage is not None and usage.passes and drafted == plain_tokens
    finally:
        spec.close()
        plain.close()


@pytest.mark.parametrize("top_k, top_p, temperature", [(0, 1.0, 1.0), (5, 1.0, 0.7), (0, 0.6, 1.3), (8, 0.8, 0.5)])
def test_sampling_scores_are_the_distribution_pick_tokens_draws_from(top_k, top_p, temperature):
    """A sampled row's pick is `torch.multinomial` over the softmax of its `sampling_scores` (what the acceptance
    rule reads), draw for draw from the same generator, and never outside the cuts."""
    class P:
        pass

    params = P()
    params.temperature, params.top_k, params.top_p, params.logprobs = temperature, top_k, top_p, None
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3)) * 2
    probs = torch.softmax(sampling_scores(logits, params), -1)
    picks, draws = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    picked = [int(pick_tokens(logits, [params], [picks])) for _ in range(300)]
    assert picked == [int(torch.multinomial(probs, 1, generator=draws)) for _ in range(300)]
    assert all(torch.isfinite(sampling_scores(logits, params)[0, t]) for t in picked)  # nothing drawn outside the cuts


# --- the HTTP server and the CLI ---

NAME = "smollm2-spec"
QUOTE = ("Repeat this sentence exactly: We hold these truths to be self-evident, that all men are created equal, "
         "that they are endowed by their Creator with certain unalienable Rights.")


@pytest.fixture(scope="module")
def server(default_model_dir):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serving import Running, load_smollm

    from overspill.serving.openai_protocol import ServerConfig
    from overspill.serving.server import create_app

    model, tok, context = load_smollm(default_model_dir, 512)
    app = create_app(model, tok, ServerConfig(NAME, context, max_new_tokens_limit=48, max_batch=4), speculate="ngram")
    running = Running(app)
    yield running
    running.stop()


def test_server_greedy_with_speculation_equals_without_and_reports_it(server):
    httpx = pytest.importorskip("httpx")
    body = {"model": NAME, "messages": [{"role": "user", "content": QUOTE}], "temperature": 0, "max_tokens": 40}
    with httpx.Client(base_url=server.base, timeout=120) as c:
        spec = c.post("/v1/chat/completions", json=body).json()
        plain = c.post("/v1/chat/completions", json=body | {"speculate": "off"}).json()
        assert spec["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
        usage = spec["usage"]["speculation"]
        assert "speculation" not in plain["usage"]
        assert usage["passes"] > 0 and usage["accepted_tokens"] > 0 and usage["tokens_per_pass"] > 1
        assert 0 < usage["acceptance_rate"] <= 1 and 0 <= usage["draft_time_share"] < 1
        stream = c.post("/v1/completions", json={"model": NAME, "prompt": QUOTE, "temperature": 0, "max_tokens": 20,
                                                  "stream": True, "stream_options": {"include_usage": True}})
        chunks = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
        assert chunks[-1]["usage"]["speculation"]["passes"] > 0
        metrics = c.get("/metrics").text
        for name in ("overspill_speculative_passes_total", "overspill_speculative_drafted_tokens_total",
                     "overspill_speculative_accepted_tokens_total", "overspill_speculative_tokens_per_pass",
                     "overspill_speculative_acceptance_rate", "overspill_speculative_draft_time_share",
                     'overspill_speculative_seconds_total{phase="draft"}'):
            assert name in metrics, name
        rate = next(line for line in metrics.splitlines() if line.startswith("overspill_speculative_tokens_per_pass "))
        assert float(rate.split()[1]) > 1
        assert "overspill_speculative_tree_budget_count 0.0" in metrics  # chains: no tree pass chose a budget


def test_server_refuses_a_bad_source_in_one_line(server):
    httpx = pytest.importorskip("httpx")
    from serving import openai_error

    body = {"model": NAME, "prompt": "Hi", "max_tokens": 4}
    with httpx.Client(base_url=server.base, timeout=60) as c:
        err = openai_error(c.post("/v1/completions", json=body | {"speculate": "medusa"}), 400, param="speculate")
        assert "'ngram' or 'draft:PATH'" in err["message"] and "\n" not in err["message"]
        err = openai_error(c.post("/v1/completions", json=body | {"speculate": "draft:/elsewhere"}), 400,
                           param="speculate")
        assert "this server drafts with" in err["message"]


@pytest.mark.parametrize("command", [["serve"], ["batch", "in.jsonl", "out.jsonl"]])
def test_cli_refuses_a_bad_speculate_source_before_loading(capsys, command):
    from overspill import cli

    assert cli.main([*command, "--speculate", "medusa"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("overspill: error: --speculate:") and "medusa" in err[0]


def test_serve_counts_its_draft_model_in_the_plan_and_drafts_with_that_one(tiny_checkpoint, monkeypatch, capsys):
    # `serve --speculate draft:PATH` places the model under the budget less the draft (as generate's load does)
    # and the engine drafts with the model load keeps, instead of loading a second copy.
    from overspill import cli
    from overspill.api import placement_of
    from overspill.runtime import drafts, speculative
    from overspill.serving import speculate
    from overspill.serving.openai_protocol import load_for_serving

    path = str(tiny_checkpoint("llama"))
    args = cli._build_parser().parse_args(["serve", path, "--gpu-memory", "4MiB", "--context", "64", "--max-batch", "1",
                                           "--dtype", "float32", "--speculate", f"draft:{path}"])
    loads = []
    real = drafts.make_drafter
    monkeypatch.setattr(drafts, "make_drafter", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(speculate, "make_drafter", drafts.make_drafter)
    monkeypatch.setattr(speculative, "make_drafter", drafts.make_drafter)
    model, _ = load_for_serving(args)
    capsys.readouterr()
    assert any(n.startswith(f"draft model {path}: ") for n in placement_of(model).plan.notes)
    engine = _engine(model, speculate=f"draft:{path}")
    try:
        [(_, usage)] = _run(engine, [GenerationRequest(PROMPTS[0], 10)])
        assert usage is not None and usage.passes
    finally:
        engine.close()
    assert loads == [f"draft:{path}"]  # once, by load


def test_serve_speculation_plans_whole_moe_layers_and_expert_streamed_plans_decode_plainly(tiny_checkpoint, capsys):
    # `serve --speculate ngram` plans as `plan --serve --speculate ngram` shows (expert streaming does not verify
    # drafts: whole layers stream); without it the plan streams experts, and a request naming a source of its
    # own decodes plainly there
    from overspill import cli
    from overspill.api import placement_of
    from overspill.serving.openai_protocol import load_for_serving

    path = str(tiny_checkpoint("mixtral"))
    base = ["serve", path, "--gpu-memory", "4MiB", "--context", "64", "--max-batch", "1", "--dtype", "float32"]
    parse = cli._build_parser().parse_args
    model, _ = load_for_serving(parse([*base, "--speculate", "ngram"]))
    plan = placement_of(model).plan
    assert plan.moe_streaming == "dense" and plan.streamed_layers
    assert any("speculative decoding" in n for n in plan.notes)
    model, _ = load_for_serving(parse(base))
    capsys.readouterr()
    assert placement_of(model).plan.moe_streaming == "experts"
    engine = _engine(model)
    try:
        [(plain, _)] = _run(engine, [GenerationRequest(PROMPTS[0], 10)])
        [(asked, usage)] = _run(engine, [GenerationRequest(PROMPTS[0], 10, speculate="ngram")])
    finally:
        engine.close()
    assert usage is None and asked == plain
    engine = _engine(model, speculate="ngram")  # the library's own default source on such a plan: said, not used
    try:
        assert "streams routed experts" in engine.speculator.note
        [(_, usage)] = _run(engine, [GenerationRequest(PROMPTS[0], 10)])
    finally:
        engine.close()
    assert usage is None
