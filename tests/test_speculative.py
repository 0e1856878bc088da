"""Speculative decoding: greedy output is plain greedy's, token for token, for every tiny architecture
and draft source, streamed or resident, with device or host-tier KV; sampling keeps plain sampling's
distribution; the planner's arithmetic."""

from __future__ import annotations

import dataclasses
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import overspill
from overspill.planning.speculation import AcceptanceTracker, PassCost, best_chain, expected_tokens, forecast
from overspill.runtime import speculative
from overspill.runtime.drafts import ModelDrafter, NgramDrafter, OracleDrafter
from overspill.runtime.speculative import _accept, _residual

from conftest import ARCHS, VOCAB

NEW = 24
GEN = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)


def _prompt(seed: int = 0, length: int = 18) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1, length), generator=gen)
    return torch.cat([ids, ids[:, :9]], dim=1)  # a repeat, so prompt lookup finds something


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[arch] = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch), dtype=torch.float32).eval()
        return cache[arch]

    return get


def _drafters(source: str, want: torch.Tensor, prompt: int, tiny_checkpoint):
    if source == "ngram":
        return NgramDrafter()
    if source == "draft":  # another tiny model with the same vocabulary
        return speculative.make_drafter(f"draft:{tiny_checkpoint('llama')}", _Target())
    return OracleDrafter(want[0, prompt:], prompt, float(source.split(":")[1]), VOCAB, seed=1)


class _Target:
    """The bits of a target `make_drafter` reads."""

    dtype = torch.float32
    device = torch.device("cpu")

    class config:  # noqa: N801 - mimics a transformers config
        @staticmethod
        def get_text_config():
            return type("C", (), {"vocab_size": VOCAB})

    def parameters(self):
        yield torch.zeros(1)


@pytest.mark.parametrize("source", ["ngram", "draft", "oracle:0.7", "oracle:1.0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_plain_resident(arch, source, reference, tiny_checkpoint) -> None:
    model = reference(arch)
    ids = _prompt()
    speculative.enable(model, None)
    want = model.generate(ids, **GEN)
    try:
        speculative.enable(model, _drafters(source, want, ids.shape[1], tiny_checkpoint), chain=6)
        got = model.generate(ids, **GEN)
        stats = model.speculation_stats
    finally:
        speculative.enable(model, None)
    assert torch.equal(got, want)
    assert stats.emitted == NEW and stats.passes < NEW or source == "ngram" and stats.passes <= NEW
    if source == "oracle:1.0":
        assert stats.tokens_per_pass > 5  # chains of 6 all accepted: 7 tokens a pass, less the last short one


@pytest.mark.parametrize("source", ["ngram", "draft", "oracle:0.75"])
@pytest.mark.parametrize("kv_host", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_plain_streamed(arch, kv_host, source, reference, tiny_checkpoint) -> None:
    # Layers streamed through the ring (and KV partly in host memory): verify passes of several
    # tokens and crops of rejected drafts go through the same executor and cache tiers, for every
    # tiny architecture and every draft source (issue 14's must-show).
    from test_placement import load_tiny

    ids = _prompt(3)
    want = reference(arch).generate(ids, **GEN)
    extra = {"kv_gpu_memory": "96KiB"} if kv_host else {}
    model = load_tiny(tiny_checkpoint(arch), resident=3, **extra)
    from overspill.api import placement_of

    assert placement_of(model).plan.streamed_layers
    if kv_host:
        assert placement_of(model).plan.kv_host_layers
    speculative.enable(model, _drafters(source, want, ids.shape[1], tiny_checkpoint), chain=5)
    got = model.generate(ids, **GEN)
    assert torch.equal(got, want)
    stats = model.speculation_stats
    assert stats.emitted == NEW and (stats.passes < NEW or source == "ngram" and stats.passes <= NEW)


def test_serial_verification_is_plain_greedy_in_bf16() -> None:
    # In bf16 a k-token pass rounds differently from k one-token steps (on this model the batched
    # verify of a 6-layer, 256-wide model parted from plain greedy after 17 tokens, and after 3 on the
    # H200's 8B/70B shapes);
    # verifying one token at a time inside each layer repeats plain decoding's arithmetic exactly.
    from transformers import AutoConfig

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=8000)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 8000, (1, 64))
    gen = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **gen)
    speculative.enable(model, OracleDrafter(want[0, 64:], 64, 0.8, 8000), chain=8)
    got = model.generate(ids, **gen)
    assert model.speculation_stats.serial
    assert torch.equal(got, want)
    assert model.speculation_stats.tokens_per_pass > 2


def test_eos_inside_an_accepted_chain_stops_where_plain_stops(reference) -> None:
    model = reference("llama")
    ids = _prompt(5)
    free = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 7])  # a token plain greedy emits 8th
    want = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert want.shape[1] < free.shape[1]
    speculative.enable(model, OracleDrafter(free[0, ids.shape[1]:], ids.shape[1], 1.0, VOCAB), chain=12)
    try:
        got = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=eos)
    finally:
        speculative.enable(model, None)
    assert torch.equal(got, want)


def test_streamer_sees_every_token_once(reference) -> None:
    class Collect:
        def __init__(self):
            self.tokens: list[int] = []
            self.ended = False

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            self.ended = True

    model = reference("llama")
    ids = _prompt(6)
    want = model.generate(ids, **GEN)
    streamer = Collect()
    speculative.enable(model, OracleDrafter(want[0, ids.shape[1]:], ids.shape[1], 0.8, VOCAB), chain=4)
    try:
        got = model.generate(ids, streamer=streamer, **GEN)
    finally:
        speculative.enable(model, None)
    assert torch.equal(got, want)
    assert streamer.tokens == ids[0].tolist() + want[0, ids.shape[1]:].tolist() and streamer.ended


def test_calls_it_cannot_serve_run_plain(reference) -> None:
    # Batch 2 with padding and beam search fall back to transformers' own loops, same tokens.
    model = reference("llama")
    ids = torch.cat([_prompt(1), _prompt(2)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    want = model.generate(ids, attention_mask=mask, **GEN)
    beams = model.generate(ids[:1], num_beams=2, **GEN)
    speculative.enable(model, NgramDrafter(), chain=4)
    try:
        assert torch.equal(model.generate(ids, attention_mask=mask, **GEN), want)
        assert torch.equal(model.generate(ids[:1], num_beams=2, **GEN), beams)
    finally:
        speculative.enable(model, None)


def test_ngram_drafter_proposes_what_followed_the_last_match() -> None:
    seq = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6]])
    assert NgramDrafter().propose(seq, 3).tokens.tolist() == [7, 1, 2]  # latest "5 6" is followed by 7 1 2
    assert NgramDrafter().propose(torch.tensor([[1, 2, 3]]), 4).tokens.numel() == 0


def test_model_drafter_reuses_its_cache_across_rejections(reference) -> None:
    drafter = ModelDrafter(reference("llama"), VOCAB)
    ids = _prompt(7)
    first = drafter.propose(ids, 4).tokens
    fed = []
    drafter.model.get_input_embeddings().register_forward_hook(lambda m, a, o: fed.append(a[0].shape[-1]))
    # the target kept two drafts and chose its own third token: only the new tail is fed again
    longer = torch.cat([ids, first[:2].view(1, 2), torch.tensor([[7]])], dim=1)
    again = drafter.propose(longer, 3).tokens
    assert fed[0] == 1  # only the target's own token: the kept drafts' KV is still cached, not the prompt
    plain = reference("llama").generate(longer, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert again.tolist() == plain[0, longer.shape[1]:].tolist()


def test_acceptance_rule_keeps_the_target_distribution() -> None:
    # Emitted-token frequencies after accept-or-residual equal p, for a one-hot and a soft draft q.
    torch.manual_seed(0)
    p_logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, -1.0]])
    p = torch.softmax(p_logits[0], dim=-1)
    q_soft = torch.softmax(torch.tensor([0.1, 1.5, 0.3, -0.2, 0.0]), dim=-1)
    n = 20000
    one_hot = torch.nn.functional.one_hot(torch.tensor(1), 5).float()
    for q in (one_hot, q_soft):
        counts = torch.zeros(5)
        for _ in range(n):
            token = torch.multinomial(q, 1)[0]
            if _accept(p_logits, token, q):
                counts[token] += 1
            else:
                counts[_residual(p_logits, token, q)] += 1
        assert torch.allclose(counts / n, p, atol=0.012), (counts / n, p)


def test_seeded_speculative_sampling_matches_plain_sampling(reference) -> None:
    # End to end on a tiny model: the joint distribution of the first two sampled tokens (top-2, so
    # 4 outcomes) from speculative sampling with a half-wrong oracle matches plain sampling's.
    model = reference("llama")
    ids = _prompt(8)
    gen = dict(max_new_tokens=2, min_new_tokens=2, do_sample=True, top_k=2, temperature=1.5, pad_token_id=0)
    greedy = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)

    def histogram(runs: int, seed: int) -> dict[tuple[int, int], int]:
        torch.manual_seed(seed)
        out: dict[tuple[int, int], int] = {}
        for _ in range(runs):
            pair = tuple(model.generate(ids, **gen)[0, -2:].tolist())
            out[pair] = out.get(pair, 0) + 1
        return out

    runs = 150
    plain = histogram(runs, 1)
    speculative.enable(model, OracleDrafter(greedy[0, ids.shape[1]:], ids.shape[1], 0.5, VOCAB), chain=2)
    try:
        spec = histogram(runs, 2)
    finally:
        speculative.enable(model, None)
    keys = set(plain) | set(spec)
    assert len(keys) >= 3
    chi2 = sum((plain.get(k, 0) - spec.get(k, 0)) ** 2 / (plain.get(k, 0) + spec.get(k, 0)) for k in keys)
    assert chi2 < 25, (chi2, plain, spec)  # ~chi-square with <= 3 dof: p < 0.0001 at 25


def test_expected_tokens_and_best_chain() -> None:
    assert expected_tokens(0.0, 8) == 1.0
    assert expected_tokens(1.0, 8) == 9.0
    assert expected_tokens(0.8, 8) == pytest.approx((1 - 0.8**9) / 0.2)
    flat = PassCost(base_s=1.0)
    assert best_chain(flat, 0.9, 16) == 16  # a free, flat pass: draft as far as allowed
    costly = PassCost(base_s=1.0, per_token_s=0.0, draft_per_token_s=0.2)
    assert best_chain(costly, 0.5, 16) < best_chain(costly, 0.9, 16)
    f = forecast(flat, 0.8, 8)
    assert f.speedup == pytest.approx(expected_tokens(0.8, 8))


def test_adaptive_chain_starts_from_the_plans_verify_pass_and_refits_on_measured_passes(
        reference, tiny_checkpoint, monkeypatch) -> None:
    # generate and the server choose chain lengths from one cost: the plan's predicted verify pass
    # (serial: a decode step's GPU compute per extra token), then the passes this call measured.
    from test_placement import load_tiny

    from overspill.api import placement_of
    from overspill.planning.speculation import verify_pass_cost

    ids = _prompt(5)
    want = reference("llama").generate(ids, **GEN)
    model = load_tiny(tiny_checkpoint("llama"), resident=2)
    placement = placement_of(model)
    assert speculative.prior_pass_cost(model, serial=True) == PassCost(1.0)  # no probed machine, no prediction
    prediction = SimpleNamespace(decode_step_s=0.2, gpu_s=0.004, host_s=0.02, overlapped_gpu_s=0.003,  # 8B, 6 GiB
                                 expand_s=0.0)
    monkeypatch.setattr(placement, "plan", dataclasses.replace(placement.plan, prediction=prediction))
    prior = speculative.prior_pass_cost(model, serial=True)
    assert prior == verify_pass_cost(0.2, 0.004, 0.02, 0.0, True, hidden_token_s=0.003)
    assert prior.dispatch_per_token_s == 0.02 and prior.per_token_s == pytest.approx(0.001)
    assert speculative.prior_pass_cost(torch.nn.Linear(1, 1), serial=True) == PassCost(1.0)
    seen = []
    monkeypatch.setattr(speculative, "best_chain", lambda cost, rate, top: seen.append(cost) or 4)
    speculative.enable(model, OracleDrafter(want[0, ids.shape[1]:], ids.shape[1], 0.75, VOCAB))
    assert torch.equal(model.generate(ids, **GEN), want)
    assert seen[0] == prior
    passes = model.speculation_stats.passes
    assert len(seen) == passes and seen[-1] != prior and seen[-1].draft_per_token_s > 0


def test_a_draft_models_bytes_come_out_of_the_targets_budget(reference, tiny_checkpoint) -> None:
    # issue 14: a draft:PATH model is resident beside the target, so the planner counts it: the target is
    # placed under the budget less the draft's weights and KV, and the plan says so in a note.
    from test_placement import CONTEXT, load_tiny, resident_budget

    from overspill.api import placement_of
    from overspill.planning.spec import spec_from_config
    from overspill.planning.speculation import draft_model_bytes
    from overspill.runtime.sources import resolve

    path = tiny_checkpoint("llama")
    draft = draft_model_bytes(spec_from_config(resolve(str(path), config_only=True).config(), "float32"), CONTEXT)
    budget = draft + resident_budget(path, 4, torch.float32, 2)  # the draft, and room for 4 of the target's layers
    load = dict(gpu_memory=budget, context=CONTEXT, progress=False, dtype=torch.float32, moe_streaming="dense")
    alone = placement_of(overspill.load(path, **load)[0]).plan
    assert len(alone.resident_layers) > 4 and not any("draft model" in n for n in alone.notes)
    model, _ = overspill.load(path, speculate=f"draft:{path}", **load)
    plan = placement_of(model).plan
    # layout auto spreads the streamed layers where drafts are verified
    assert plan.layer_tiers == placement_of(load_tiny(path, resident=4, layout="spread")).plan.layer_tiers
    assert any(n.startswith(f"draft model {path}: ") for n in plan.notes)
    ids = _prompt(2)
    assert torch.equal(model.generate(ids, **GEN), reference("llama").generate(ids, **GEN))
    with pytest.raises(overspill.OverspillError, match="needs .* on the device, more than the"):
        overspill.load(path, gpu_memory=draft, context=CONTEXT, progress=False, speculate=f"draft:{path}",
                       dtype=torch.float32)


def test_acceptance_tracker_counts_only_offered_tokens() -> None:
    t = AcceptanceTracker(prior=0.5, weight=1.0)
    t.update(drafted=8, accepted=3)  # 3 hits, then 1 miss; the 4 after it were never offered
    assert (t.offered, t.accepted, t.rate) == (4, 3, 0.0)
    t.update(drafted=4, accepted=4)
    assert t.rate == 1.0


def test_unknown_source_is_one_clear_error(reference) -> None:
    with pytest.raises(overspill.OverspillError, match="ngram"):
        speculative.enable(reference("llama"), "magic")



def test_load_speculate_ngram_through_pipeline_on_smollm2(default_model_dir) -> None:
    # The real model: a pipeline built on `load(..., speculate="ngram")` answers exactly what the plain
    # one does, and prompt lookup really drafts accepted tokens when the answer quotes its input.
    from transformers import pipeline

    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "bench" / "data" / "declaration.txt").read_text()
    chat = [{"role": "user", "content": f"Copy the first sentence of this text exactly:\n\n{text}"}]
    plain, tok = overspill.load(default_model_dir, gpu_memory=None, dtype="float32", progress=False)
    want = pipeline("text-generation", model=plain, tokenizer=tok)(chat, max_new_tokens=40, do_sample=False)
    model, tok = overspill.load(default_model_dir, gpu_memory=None, dtype="float32", progress=False,
                                speculate="ngram")
    got = pipeline("text-generation", model=model, tokenizer=tok)(chat, max_new_tokens=40, do_sample=False)
    assert got[0]["generated_text"][-1] == want[0]["generated_text"][-1]
    stats = model.speculation_stats
    assert stats.accepted > 10 and stats.tokens_per_pass > 1.5, stats


def test_auto_drafts_with_ngram_only_where_the_plan_streams(reference, tiny_checkpoint) -> None:
    # speculate="auto": a streamed plan decodes with prompt lookup (greedy still plain greedy's); a
    # resident plan, where a k-token serial verify costs k steps, decodes plainly.
    from test_placement import N_LAYERS, load_tiny

    ids = _prompt(5)
    want = reference("llama").generate(ids, **GEN)
    streamed = load_tiny(tiny_checkpoint("llama"), resident=2, speculate="auto")
    assert streamed.speculation_source == "ngram"
    assert torch.equal(streamed.generate(ids, **GEN), want)
    assert streamed.speculation_stats.passes < NEW
    resident = load_tiny(tiny_checkpoint("llama"), resident=N_LAYERS, speculate="auto")
    assert "generate" not in resident.__dict__ and not hasattr(resident, "speculation_source")


def test_auto_source_follows_the_link() -> None:
    from overspill.planning.plan import Plan, Tier
    from dataclasses import replace

    from overspill.planning.speculation import auto_source

    base = dict(embed_tier=Tier.DEVICE, head_tier=Tier.DEVICE, depth=2, slots=0, slot_bytes=0, budget_bytes=None,
                workspace_bytes=0, device_weight_bytes=0, streamed_bytes_per_step=0)
    streamed = Plan(layer_tiers=(Tier.DEVICE, Tier.PINNED), **base)
    resident = Plan(layer_tiers=(Tier.DEVICE, Tier.DEVICE), **base)
    kv_host = Plan(layer_tiers=(Tier.DEVICE,), kv_host_layers=(0,), **base)
    assert auto_source(streamed) == "ngram" and auto_source(kv_host) == "ngram"
    assert auto_source(resident) is None
    assert auto_source(replace(streamed, moe_streaming="experts")) is None
