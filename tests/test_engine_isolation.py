"""One bad request must never hurt another: out-of-range fields are refused at `submit`, and whatever
still fails (sampling, detokenizing, admitting) ends only its own request while the engine thread lives on.

Every wait is bounded (`Collect.wait`), so a dead or stuck engine thread fails a test instead of hanging it.
Tiny float32 random-weight llama (conftest), as in test_engine.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

import overspill.serving.sampling as sampling
import overspill.serving.scheduler as scheduler_module
from overspill.serving.detok import TextStream
from overspill.serving.engine import Engine, Event, GenerationRequest

from test_engine import IdsTokenizer, _engine
from test_placement import load_tiny

TIMEOUT = 30.0
GOOD = [
    GenerationRequest((5, 9, 14, 3), 10),
    GenerationRequest(tuple(range(30, 40)), 8),
    GenerationRequest((60,) * 6, 8, temperature=0.9, top_k=20, seed=11),  # seeded: keeps its draws in any batch
]
BAD_PROMPT = (8, 200, 17)
LATER = GenerationRequest((100, 101, 102), 5)


class Collect:
    """A sink gathering one request's events; `wait` is bounded, so a hung engine fails the test."""

    def __init__(self):
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish is not None:
            self.done.set()

    def wait(self) -> list[Event]:
        assert self.done.wait(TIMEOUT), "the request never ended: the engine thread is dead or stuck"
        return self.events

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.wait())

    @property
    def finish(self) -> str | None:
        return self.wait()[-1].finish


def submit(engine: Engine, request: GenerationRequest) -> Collect:
    sink = Collect()
    engine.submit(request, sink)
    return sink


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_tiny(tiny_checkpoint("llama"), resident=4)


@pytest.fixture(scope="module")
def alone(model):
    """Each request's output run alone on a healthy engine: request -> text."""
    engine = _engine(model, max_batch=4)
    refs = GOOD + [LATER, GenerationRequest(BAD_PROMPT, 6), GenerationRequest(BAD_PROMPT, 6, temperature=0.8, seed=3)]
    try:
        return {r: submit(engine, r).text for r in refs}
    finally:
        engine.close()


def raise_in_detok(monkeypatch):
    """Make detokenizing raise for sequences whose stop strings include "BOOM" (also used by test_batch)."""
    push = TextStream.push

    def failing(self, token, eos):
        if "BOOM" in self.stops:
            raise RuntimeError("tokenizer exploded")
        return push(self, token, eos)

    monkeypatch.setattr(TextStream, "push", failing)


def _raise_in_text_stream(monkeypatch):
    class Failing(TextStream):
        def __init__(self, tokenizer, lock, stops, max_tokens):
            if "CTOR" in stops:
                raise RuntimeError("no text stream for you")
            super().__init__(tokenizer, lock, stops, max_tokens)

    monkeypatch.setattr(scheduler_module, "TextStream", Failing)


def _raise_in_batched_sampling(monkeypatch):
    pick = sampling.pick_tokens

    def failing(logits, params, uniforms):  # like a kernel that fails on one row's parameters
        if any(p.top_p == 0.25 for p in params):
            raise RuntimeError("index 49152 is out of bounds")
        return pick(logits, params, uniforms)

    monkeypatch.setattr(sampling, "pick_tokens", failing)


# (bad request, what it does to the engine before it runs, how it must end: "rejected" at submit or a finish)
BAD = {
    "seed 2**70": (GenerationRequest(BAD_PROMPT, 6, temperature=0.8, seed=2**70), None, "rejected"),
    "temperature 1e-300": (GenerationRequest(BAD_PROMPT, 6, temperature=1e-300, seed=1), None, "greedy"),
    "top_k 2**63": (GenerationRequest(BAD_PROMPT, 6, temperature=0.8, top_k=2**63, seed=3), None, "uncut"),
    "detokenizing raises": (GenerationRequest(BAD_PROMPT, 6, stop=("BOOM",)), raise_in_detok, "error"),
    "TextStream raises": (GenerationRequest(BAD_PROMPT, 6, stop=("CTOR",)), _raise_in_text_stream, "error"),
    "sampling raises": (GenerationRequest(BAD_PROMPT, 6, temperature=0.8, top_p=0.25), _raise_in_batched_sampling,
                        "error"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_fails_alone_and_the_engine_serves_on(model, alone, monkeypatch, case):
    bad, sabotage, outcome = BAD[case]
    if sabotage is not None:
        sabotage(monkeypatch)
    engine = _engine(model, max_batch=4)
    try:
        engine.hold(True)  # all four are admitted together: the bad one shares the good ones' batch
        good = [submit(engine, r) for r in GOOD[:2]]
        if outcome == "rejected":
            with pytest.raises(ValueError, match="seed"):
                submit(engine, bad)
            victim = None
        else:
            victim = submit(engine, bad)
        good.append(submit(engine, GOOD[2]))
        engine.hold(False)
        assert [g.text for g in good] == [alone[r] for r in GOOD]
        assert all(g.finish == "length" for g in good)
        if outcome == "error":
            assert victim.finish == "error" and victim.wait()[-1].error
        elif outcome == "greedy":  # below the temperature floor a row is greedy
            assert victim.finish == "length" and victim.text == alone[GenerationRequest(BAD_PROMPT, 6)]
        elif outcome == "uncut":  # top_k past the vocabulary is no cut at all
            assert victim.finish == "length"
            assert victim.text == alone[GenerationRequest(BAD_PROMPT, 6, temperature=0.8, seed=3)]
        assert engine._thread.is_alive() and engine.alive
        monkeypatch.undo()
        assert submit(engine, LATER).text == alone[LATER]
        assert engine.live_requests() == 0 and engine.kv_stats().reserved_blocks == 0
    finally:
        engine.close()


BASE = GenerationRequest((5, 6, 7), 4, temperature=0.8, seed=1)


@pytest.mark.parametrize("field, bad", [
    ("seed", 2**64), ("seed", -2**63 - 1), ("seed", 2**70), ("seed", 1.5), ("seed", True),
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.1), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")),
    ("top_k", 2.5), ("top_k", True),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0),
    ("max_new_tokens", 0), ("max_new_tokens", 3.0),
    ("prompt_ids", ()), ("prompt_ids", (5, 256)), ("prompt_ids", (-1, 5)), ("prompt_ids", (5, 2**70)),
    ("stop", ("ok", 3)),
])
def test_submit_rejects_what_the_kernels_cannot_take_naming_the_field(model, field, bad):
    engine = Engine(model, IdsTokenizer(), kv_capacity_tokens=64)  # never started: submit checks alone
    with pytest.raises(ValueError, match=field) as info:
        engine.submit(replace(BASE, **{field: bad}))
    assert info.value.field == field and "\n" not in str(info.value)
    assert engine.queue_depth == 0


def test_submit_accepts_the_whole_range_the_kernels_take(model):
    engine = _engine(model, max_batch=4)
    edges = [{"seed": 2**64 - 1}, {"seed": -2**63}, {"top_k": 2**63}, {"top_k": -2**70}, {"temperature": 1e-300},
             {"temperature": 0.0}, {"top_p": 1e-9}, {"logprobs": 20}, {"logprobs": 0}]
    try:
        sinks = [submit(engine, replace(BASE, **edge)) for edge in edges]
        assert [s.finish for s in sinks] == ["length"] * len(edges)
        assert len(sinks[7].wait()[0].logprobs[0].top) == 20
    finally:
        engine.close()


class Fatal(BaseException):
    """Escapes `except Exception`, as KeyboardInterrupt or SystemExit would."""


def test_a_dead_engine_thread_ends_every_request_and_says_why(model, monkeypatch):
    engine = _engine(model, max_batch=1)
    try:
        assert engine.alive and engine.health()["error"] is None
        engine.hold(True)
        running, queued = submit(engine, GOOD[0]), submit(engine, GOOD[1])

        def fatal():
            raise Fatal("simulated interpreter shutdown")

        monkeypatch.setattr(engine, "_iterate", fatal)
        engine.hold(False)
        assert running.finish == "error" and queued.finish == "error"  # neither waits forever
        assert "Fatal" in queued.wait()[-1].error
        engine._thread.join(TIMEOUT)
        assert not engine._thread.is_alive() and not engine.alive
        health = engine.health()
        assert health["alive"] is False and "Fatal: simulated interpreter shutdown" in health["error"]
        assert (health["queue_depth"], health["active"]) == (0, 0)
        with pytest.raises(RuntimeError, match="the engine thread died: Fatal"):
            engine.submit(LATER)
    finally:
        engine.close()


def test_alive_only_while_the_loop_runs_and_makes_progress(model):
    engine = _engine(model, max_batch=1, stall_seconds=0.3)
    unstarted = Engine(model, IdsTokenizer(), kv_capacity_tokens=64)
    assert not unstarted.alive and unstarted.health()["alive"] is False
    entered, release = threading.Event(), threading.Event()

    def stuck(module, args):  # one pass that takes far longer than stall_seconds
        entered.set()
        assert release.wait(TIMEOUT)

    hook = None
    try:
        time.sleep(0.6)  # an idle engine is alive however long nothing happens
        assert engine.alive and engine.health()["alive"] is True
        hook = model.register_forward_pre_hook(stuck)  # the model is the module's: removed in any case
        sink = submit(engine, GOOD[0])
        assert entered.wait(TIMEOUT)
        time.sleep(0.5)
        health = engine.health()
        assert not engine.alive and health["alive"] is False and health["error"] is None
        assert health["last_progress_s_ago"] >= 0.3 and health["active"] == 1
        release.set()
        assert sink.finish == "length" and engine.alive
    finally:
        release.set()
        if hook is not None:
            hook.remove()
        engine.close()
    assert not engine.alive  # closed: the thread has ended
