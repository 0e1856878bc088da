"""GPU tests of the serving engine (`pytest -m gpu`): continuous batching over streamed layers on CUDA.

float32, so a batched step and a solo step agree to rounding and greedy tokens must be equal; the
ring streams half the layers through the copy stream while rows join and leave the batch.
"""

from __future__ import annotations

import pytest
import torch

from overspill.serving.engine import Engine, GenerationRequest

from test_engine import NEW, PROMPTS, IdsTokenizer, Steps, _outputs, _requests

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral", "mistral", "gemma2"])
def test_batched_greedy_equals_solo_on_cuda(tiny_checkpoint, arch):
    from transformers import AutoConfig

    import overspill
    from overspill.api import placement_of
    from overspill.planning.placement import budget_for
    from overspill.planning.plan import Workload
    from overspill.runtime.loader import build_skeleton, decoder_layers, footprint

    path = tiny_checkpoint(arch)
    skeleton = build_skeleton(AutoConfig.from_pretrained(str(path)), torch.float32)
    # on CUDA the budget includes the activation floor the planner keeps free
    budget = budget_for(footprint(skeleton, decoder_layers(skeleton)[1], torch.float32), Workload(64, 4), 4)
    model, _ = overspill.load(path, gpu_memory=budget, dtype="float32", context=64, batch=4, progress=False)
    assert len(placement_of(model).plan.streamed_layers) == 4
    assert placement_of(model).ring is not None
    model.generation_config.eos_token_id = None
    engine = Engine(model, IdsTokenizer(), metrics=Steps(), max_batch=4, prefill_chunk=8)
    engine.start()
    try:
        solo = _outputs(engine, _requests(), together=False)
        batched = _outputs(engine, _requests(), together=True)
        assert batched == solo and [len(s.split()) for s in solo] == NEW
        assert max(engine.metrics.sizes) == 4
        seeded = [GenerationRequest(p, 6, temperature=0.9, top_k=20, seed=i) for i, p in enumerate(PROMPTS)]
        assert _outputs(engine, seeded, together=True) == _outputs(engine, seeded, together=False)
        assert engine.live_requests() == 0 and engine.kv_stats().used_blocks == 0
        assert engine.runner.new_generator(3).device.type == "cuda"  # drawn where the logits are, as generate draws
    finally:
        engine.close()


def test_a_sampled_row_draws_what_generate_draws_on_cuda():
    """A served row's draw (the exponential noise of torch's single-draw multinomial, filled from the request's
    CUDA generator) is `torch.multinomial` after `torch.manual_seed(S)`, as `generate` draws, draw after draw
    and in a batch of rows with other generators."""
    from types import SimpleNamespace

    from overspill.serving.sampling import new_generator, pick_tokens, sampling_scores

    logits = torch.randn(3, 1000, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 3
    p = SimpleNamespace(temperature=0.8, top_k=50, top_p=0.9, logprobs=None)
    for seed in range(4):
        gen = new_generator(seed, "cuda")
        picked = [int(pick_tokens(logits[r : r + 1], [p], [gen])) for r in range(3)]
        torch.manual_seed(seed)
        want = [int(torch.multinomial(torch.softmax(sampling_scores(logits[r : r + 1], p), -1), 1)) for r in range(3)]
        assert picked == want
    together = pick_tokens(logits, [p] * 3, [new_generator(s, "cuda") for s in range(3)]).tolist()
    assert together == [int(pick_tokens(logits[r : r + 1], [p], [new_generator(r, "cuda")])) for r in range(3)]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral"])
def test_graphed_engine_equals_solo_on_cuda(tiny_checkpoint, arch):
    """The engine's batch through captured CUDA graphs (static KV, one graph per batch bucket and ring
    phase, copies of the streamed half of the layers inside) gives the tokens of each request alone."""
    from transformers import AutoConfig

    import overspill
    from overspill.api import placement_of
    from overspill.planning.placement import budget_for
    from overspill.planning.plan import Workload
    from overspill.runtime.loader import build_skeleton, decoder_layers, footprint
    from overspill.serving.graph_batch import GraphedBatch

    path = tiny_checkpoint(arch)
    skeleton = build_skeleton(AutoConfig.from_pretrained(str(path)), torch.float32)
    budget = budget_for(footprint(skeleton, decoder_layers(skeleton)[1], torch.float32), Workload(64, 4), 4)
    model, _ = overspill.load(path, gpu_memory=budget, dtype="float32", context=64, batch=4, progress=False,
                              cuda_graphs=True)
    assert len(placement_of(model).plan.streamed_layers) == 4
    model.generation_config.eos_token_id = None
    engine = Engine(model, IdsTokenizer(), metrics=Steps(), max_batch=4, prefill_chunk=8, kv_capacity_tokens=256)
    engine.start()
    try:
        batch = engine._batch
        assert isinstance(batch, GraphedBatch)
        solo = _outputs(engine, _requests(), together=False)
        batched = _outputs(engine, _requests(), together=True)
        assert batch.capture, "capture fell back to eager"
        assert batch.replays > 0 and {key[0] for key in batch.graphs} >= {(1,), (4,)}
        assert batched == solo and [len(s.split()) for s in solo] == NEW
        batch.capture = False  # the same fixed-buffer steps, eagerly
        assert _outputs(engine, _requests(), together=True) == batched
        assert engine.live_requests() == 0 and engine.kv_stats().used_blocks == 0
    finally:
        engine.close()
