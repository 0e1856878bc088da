"""`overspill.load`'s model answers `generate` exactly as the same model loaded by plain transformers does,
with streamed layers and with `speculate="ngram"`, for the calls that once differed: a positional
`generation_config`, decoding modes the speculative loop does not serve, seeded sampling, classifier-free
guidance, prompts given as embeddings, `stop_strings`; and `load` refuses arguments of the wrong type in one line."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

import overspill
from overspill.errors import OverspillError

from conftest import VOCAB
from test_placement import CONTEXT, resident_budget

NEW = 16


def _prompt(seed: int = 1234) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, ids[:, :6]], dim=1)  # a repeat, so prompt lookup drafts


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint("llama")), dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["plain", "ngram"])
def placed(request, tiny_checkpoint):
    """The tiny llama with half its layers streamed, decoding plainly or with prompt lookup."""
    path = tiny_checkpoint("llama")
    extra = {"speculate": "ngram"} if request.param == "ngram" else {}
    model, _ = overspill.load(str(path), gpu_memory=resident_budget(path, 4), dtype="float32", context=CONTEXT,
                              progress=False, **extra)
    return model


def _same(placed, reference, *args, **kwargs) -> None:
    """Both models' `generate(*args, **kwargs)`, from the same seed, give the same tokens."""
    out = []
    for model in (reference, placed):
        torch.manual_seed(0)
        with torch.no_grad():
            out.append(model.generate(*args, pad_token_id=0, **kwargs))
    assert out[1].shape == out[0].shape and torch.equal(out[1], out[0]), (out[0].tolist(), out[1].tolist())


def test_a_positional_generation_config_asking_for_beams_runs_beam_search(placed, reference) -> None:
    # The speculative wrapper read beams from keyword arguments only: a config passed by position ran
    # greedy over three copies of the prompt instead.
    config = GenerationConfig(num_beams=3, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = reference.generate(_prompt(), config)
    got = placed.generate(_prompt(), config)
    assert got.shape == want.shape == (1, 18 + 8) and torch.equal(got, want)


def test_modes_the_loop_does_not_serve_are_refused_as_plain_transformers_refuses_them(placed, reference) -> None:
    # DoLa decoding moved to a Hub repo in transformers 5: plain generate refuses it without trust_remote_code,
    # where speculation silently decoded greedily.
    with pytest.raises(ValueError, match="trust_remote_code") as want:
        reference.generate(_prompt(), dola_layers="high", max_new_tokens=4, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="trust_remote_code") as got:
        placed.generate(_prompt(), dola_layers="high", max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert str(got.value) == str(want.value)


def test_seeded_sampling_is_plain_seeded_sampling(placed, reference) -> None:
    # With a deterministic draft, each verified position draws the target's token as plain sampling draws it,
    # so the same seed gives the same tokens (the accept-with-p rule drew other random numbers).
    _same(placed, reference, _prompt(), max_new_tokens=NEW, do_sample=True, temperature=0.9, top_k=50, top_p=0.9)
    if placed.__dict__.get("speculation_drafter") is not None:
        assert placed.speculation_stats.drafted > 0  # drafts were verified, not just plain steps


def test_classifier_free_guidance_is_plain(placed, reference) -> None:
    # The guidance processor keeps one step of state per call: verify passes scored a rejected position twice.
    negative = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    _same(placed, reference, _prompt(), max_new_tokens=NEW, do_sample=False, guidance_scale=1.5)
    _same(placed, reference, _prompt(), max_new_tokens=NEW, do_sample=False, guidance_scale=1.5,
          negative_prompt_ids=negative)


def test_a_prompt_given_as_embeddings(placed, reference) -> None:
    # The plan's chunked prefill (transformers' `_prefill`) splits token ids only, so an embedded prompt failed
    # inside attention; the speculative loop found no ids to prefill.
    embeds = reference.get_input_embeddings()(_prompt()).detach()
    _same(placed, reference, inputs_embeds=embeds, max_new_tokens=8, do_sample=False)


def test_stop_strings_with_a_tokenizer_under_speculation(default_model_dir) -> None:
    # transformers 5 drops the tokenizer for a callable `custom_generate` loop, so generate refused the call:
    # calls with stop strings decode plainly.
    plain, tok = overspill.load(default_model_dir, gpu_memory=None, dtype="float32", context=256, progress=False)
    model, _ = overspill.load(default_model_dir, gpu_memory=None, dtype="float32", context=256, progress=False,
                              speculate="ngram")
    chat = [{"role": "user", "content": "Repeat after me: the quick brown fox jumps over the lazy dog. The quick fox"}]
    enc = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = dict(max_new_tokens=40, do_sample=False, stop_strings=["fox"], tokenizer=tok)
    want = plain.generate(**enc, **gen)
    got = model.generate(**enc, **gen)
    assert torch.equal(got, want)
    assert tok.decode(want[0, enc["input_ids"].shape[1]:]).endswith("fox")  # the stop string really stopped it


@pytest.mark.parametrize("kwargs, message", [
    (dict(speculate=True), "speculate .*names a draft source"),
    (dict(speculate=1), "speculate .*names a draft source"),
    (dict(context="64"), "context .*whole number"),
    (dict(batch=1.5), "batch .*whole number"),
    (dict(depth="2"), "depth .*whole number"),
    (dict(speculate="ngram", speculate_tree="4"), "speculate_tree .*whole number"),
    (dict(pass_tokens=-1), "pass_tokens must be 0"),
    (dict(plan="prefix"), "plan must be an overspill Plan"),
])
def test_arguments_of_the_wrong_type_are_one_line_errors(tiny_checkpoint, kwargs, message) -> None:
    with pytest.raises(OverspillError, match=message) as err:
        overspill.load(str(tiny_checkpoint("llama")), gpu_memory=None, progress=False, **kwargs)
    assert "\n" not in str(err.value)
