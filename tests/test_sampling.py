"""Batched sampling and logprobs (`overspill.serving.sampling`) and incremental detokenization (`overspill.serving.detok`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch

from overspill.serving import sampling
from overspill.serving.detok import TextStream
from overspill.serving.sampling import MIN_TEMPERATURE, logprob_rows, sample_rows, sample_tokens, token_logprobs


@dataclass
class P:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    logprobs: int | None = None


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_greedy_rows_take_the_argmax_and_cuts_to_one_token_are_greedy():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    best = logits.argmax(-1).tolist()
    params = [P(), P(1.0, top_k=1), P(0.7, top_p=1e-6), P(), P(2.0, top_k=1, top_p=0.5)]
    assert sample_tokens(logits, params, _gens(5)).tolist() == best


def test_seeded_rows_draw_the_same_tokens_in_any_batch():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    params = [P(1.0), P(0.8, top_k=10), P(1.2, top_p=0.9), P(1.0, top_k=5, top_p=0.5)]
    together = sample_tokens(logits, params, _gens(4)).tolist()
    alone = [sample_tokens(logits[i : i + 1], [params[i]], [_gens(4)[i]]).item() for i in range(4)]
    assert together == alone


def test_sampling_follows_the_distribution_inside_the_cuts():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(3)
    draws = [sample_tokens(logits, [P(1.0)], [gen]).item() for _ in range(4000)]
    freq = [draws.count(t) / len(draws) for t in range(4)]
    assert freq == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.03)
    cut = [sample_tokens(logits, [P(1.0, top_k=2)], [gen]).item() for _ in range(2000)]
    assert set(cut) == {0, 1} and cut.count(0) / len(cut) == pytest.approx(0.5 / 0.8, abs=0.04)
    nucleus = [sample_tokens(logits, [P(1.0, top_p=0.7)], [gen]).item() for _ in range(500)]
    assert set(nucleus) == {0, 1}  # 0.5 < 0.7 <= 0.8: the smallest prefix reaching top_p


def test_logprobs_only_for_rows_that_ask():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(4))
    tokens = [3, 7, 11]
    out = token_logprobs(logits, tokens, [P(logprobs=2), P(), P(logprobs=0)])
    logp = torch.log_softmax(logits, -1)
    assert out[1] is None
    assert out[0].token_id == 3 and out[0].logprob == pytest.approx(logp[0, 3].item())
    top = logp[0].topk(2)
    assert [i for i, _ in out[0].top] == top.indices.tolist()
    assert [v for _, v in out[0].top] == pytest.approx(top.values.tolist())
    assert out[2].top == () and out[2].logprob == pytest.approx(logp[2, 11].item())


def test_temperatures_below_the_floor_are_greedy_and_never_nan():
    """1e-300 is 0 in float32: logits / temperature would be inf and its softmax NaN (an index past the vocabulary)."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(5)) * 30
    params = [P(1e-300), P(1e-40), P(MIN_TEMPERATURE / 2), P(float("nan"))]
    assert sample_tokens(logits, params, _gens(4)).tolist() == logits.argmax(-1).tolist()
    gens = _gens(4)
    before = [g.get_state() for g in gens]
    sample_tokens(logits, params, gens)
    assert all(torch.equal(g.get_state(), b) for g, b in zip(gens, before))  # greedy rows draw nothing


def test_top_k_beyond_the_vocabulary_is_no_cut():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(6))
    uncut = sample_tokens(logits, [P(1.0)] * 3, _gens(3)).tolist()
    for huge in (40, 41, 2**31, 2**63, 10**30):
        assert sample_tokens(logits, [P(1.0, top_k=huge)] * 3, _gens(3)).tolist() == uncut


def test_nan_and_inf_logits_rows_pick_in_range_and_leave_other_rows_alone():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(7))
    clean = sample_tokens(logits, [P(0.9)] * 5, _gens(5)).tolist()
    logits[1] = float("nan")
    logits[2, 4] = float("inf")
    logits[3] = float("-inf")
    for _ in range(20):
        picked = sample_tokens(logits, [P(0.9)] * 5, _gens(5)).tolist()
        assert all(0 <= t < 30 for t in picked)
        assert [picked[0], picked[4]] == [clean[0], clean[4]]


def test_sample_rows_fails_only_the_rows_that_fail_alone_with_the_same_draws(monkeypatch):
    logits = torch.randn(4, 60, generator=torch.Generator().manual_seed(8))
    params = [P(0.8), P(0.8, top_p=0.25), P(), P(1.1, top_k=7)]
    want = sample_tokens(logits, params, _gens(4)).tolist()
    pick = sampling.pick_tokens

    def refuses_one_row(logits, params, generators):
        out = pick(logits, params, generators)  # it draws first: the retry row by row must restore the generators
        if any(p.top_p == 0.25 for p in params):
            raise RuntimeError("bad row")
        return out

    monkeypatch.setattr(sampling, "pick_tokens", refuses_one_row)
    got = sample_rows(logits, params, _gens(4))
    assert isinstance(got[1], RuntimeError)
    assert [got[0], got[2], got[3]] == [want[0], want[2], want[3]]  # each seeded row drew from where it was
    scored = logprob_rows(logits, got, [P(logprobs=2)] * 4)
    assert isinstance(scored[1], Exception)
    assert [s.token_id for s in (scored[0], scored[2], scored[3])] == [want[0], want[2], want[3]]


def test_logprobs_alternatives_are_capped_at_the_vocabulary():
    logits = torch.randn(1, 6, generator=torch.Generator().manual_seed(9))
    out = token_logprobs(logits, [2], [P(logprobs=50)])
    assert len(out[0].top) == 6


class Chars:
    """A tokenizer whose tokens are characters; ids >= 1000 are halves of a two-token character."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        out, i = [], 0
        while i < len(ids):
            if ids[i] >= 1000:
                out.append("é" if i + 1 < len(ids) and ids[i + 1] >= 1000 else "\ufffd")
                i += 2
            else:
                out.append(chr(ids[i]))
                i += 1
        return "".join(out)


def _stream(stops=(), limit=100) -> TextStream:
    return TextStream(Chars(), threading.Lock(), tuple(stops), limit)


def test_text_stream_holds_incomplete_characters_and_stop_prefixes():
    s = _stream(stops=["STOP"])
    pieces = [s.push(t, eos=False) for t in map(ord, "ab")]
    assert [p.text for p in pieces] == ["a", "b"]
    assert s.push(1000, eos=False).text == ""  # half a character: held
    assert s.push(1001, eos=False).text == "é"
    assert s.push(ord("S"), eos=False).text == ""  # could start "STOP"
    assert s.push(ord("x"), eos=False).text == "Sx"  # it did not
    for t in map(ord, "STO"):
        assert s.push(t, eos=False).text == ""
    end = s.push(ord("P"), eos=False)
    assert end.finish == "stop" and end.text == ""
    assert s.text.startswith("abéSxSTOP")


def test_text_stream_ends_at_eos_and_at_the_limit_with_all_text_released():
    s = _stream(stops=["zz"], limit=3)
    assert s.push(ord("a"), eos=False).text == "a"
    assert s.push(ord("z"), eos=False).text == ""  # could start "zz"
    last = s.push(ord("b"), eos=False)
    assert last.finish == "length" and last.text == "zb"  # at the end, nothing is held back
    t = _stream()
    t.push(ord("q"), eos=False)
    assert t.push(ord("!"), eos=True).finish == "stop"


def test_text_stream_equals_full_decode_with_a_real_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    text = "Mount Everest — 8,849 m — is Earth's highest mountain above sea level. 🏔️ Ünïcödé ok?"
    ids = tok(text)["input_ids"]
    s = TextStream(tok, threading.Lock(), (), len(ids) + 1)
    released = "".join(s.push(t, eos=False).text for t in ids)
    assert released == tok.decode(ids, skip_special_tokens=True)


def test_text_stream_holds_back_the_same_starts_of_stops_as_a_plain_search():
    from overspill.serving.detok import _stable_prefix

    def plain(text, stops):  # the longest end of `text` that begins some stop, held back
        held = [k for stop in stops for k in range(1, min(len(stop) - 1, len(text)) + 1) if text.endswith(stop[:k])]
        return len(text) - max(held, default=0)

    cases = [("abcab", ["abcabd"]), ("aaaa", ["aab"]), ("xyz", ["zq", "yzq"]), ("hello", ["lo", "low"]),
             ("", ["ab"]), ("ab", ["b"]), ("abab", ["ababab", "bx"]), ("é日本", ["本語", "日本語"]), ("x", [""])]
    for text, stops in cases:
        assert _stable_prefix(text, tuple(stops)) == plain(text, stops), (text, stops)


def test_a_long_stop_string_does_not_slow_the_engine_thread():
    """A stop string is client input (up to the body limit): checking it each token must not cost more
    with its length, or one request slows every decode step of the batch it shares."""
    import time

    s = TextStream(type("Ascii", (), {"decode": lambda self, ids, skip_special_tokens=True: "".join(map(chr, ids))})(),
                   threading.Lock(), ("b" * 10**6,) * 4, 10**6)
    start = time.perf_counter()
    for _ in range(2000):
        assert s.push(ord("a"), eos=False).text == "a"
    assert time.perf_counter() - start < 1.0
