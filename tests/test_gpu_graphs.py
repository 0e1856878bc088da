"""GPU tests of CUDA-graph decode (`pytest -m gpu`): replayed graphs give the eager step's tokens."""

from __future__ import annotations

import pytest
import torch
from test_gpu import save_tiny

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]

GEN = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mixtral"])
def graphable_checkpoint(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("resident", [0, 4, 8])
def test_graph_decode_equals_eager_on_cuda(graphable_checkpoint, resident, batch):
    import overspill
    from overspill.api import placement_of
    from overspill.planning.placement import budget_for
    from overspill.planning.plan import Workload
    from overspill.runtime.loader import build_skeleton, decoder_layers, footprint

    path, config = graphable_checkpoint
    skeleton = build_skeleton(config, torch.bfloat16)
    fp = footprint(skeleton, decoder_layers(skeleton)[1], torch.bfloat16)
    budget = budget_for(fp, Workload(128, batch), resident)
    model, _ = overspill.load(path, gpu_memory=budget, context=128, batch=batch, progress=False, cuda_graphs=True)
    placement = placement_of(model)
    graphed = placement.graphs
    assert graphed is not None and len(placement.plan.resident_layers) == resident
    ids = torch.randint(3, config.vocab_size, (batch, 20), device="cuda", generator=None)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :5] = 0  # left padding
    got = model.generate(ids, attention_mask=mask, **GEN)
    again = model.generate(ids, attention_mask=mask, **GEN)  # same cache, graphs replayed from the first step
    assert graphed.capture, "capture fell back to eager"
    phases = len(graphed.graphs)
    assert graphed.replays >= 2 * (GEN["max_new_tokens"] - 1) - 2 * phases - 1
    graphed.capture = False  # the very same fixed-buffer step, run eagerly
    want = model.generate(ids, attention_mask=mask, **GEN)
    assert torch.equal(got, want) and torch.equal(again, want)
    if placement.ring is not None:
        assert placement.ring.restarts == 1  # graphs kept the ring's schedule


def test_graphs_refuse_host_kv_and_say_why(graphable_checkpoint, caplog):
    import overspill
    from overspill.api import placement_of

    path, _ = graphable_checkpoint
    model, _ = overspill.load(path, gpu_memory="1GiB", kv_gpu_memory="160KiB", context=128, progress=False,
                              cuda_graphs=True)
    assert placement_of(model).plan.kv_host_layers and placement_of(model).graphs is None
    assert "host memory" in caplog.text


def test_pipeline_decodes_through_graphs(monkeypatch, tmp_path):
    """pipeline() over a model loaded with cuda_graphs: the answer replays captured steps and equals
    the same fixed-buffer steps run eagerly (SmolLM2's config and tokenizer, random weights)."""
    import os

    from transformers import pipeline

    import overspill
    from overspill.api import placement_of

    if not os.environ.get("OVERSPILL_TEST_SMOLLM2_DIR"):
        pytest.skip("OVERSPILL_TEST_SMOLLM2_DIR is not set")
    monkeypatch.setenv("OVERSPILL_CACHE", str(tmp_path))
    model, tok = overspill.load(os.environ["OVERSPILL_TEST_SMOLLM2_DIR"], gpu_memory="400MiB", random_weights=True,
                                context=256, progress=False, cuda_graphs=True)
    graphed = placement_of(model).graphs
    assert graphed is not None
    chat = [{"role": "user", "content": "What is the highest mountain in the world?"}]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    answer = pipe(chat, max_new_tokens=24, do_sample=False)[0]["generated_text"][-1]["content"]
    assert graphed.capture and graphed.replays > 0
    graphed.capture = False
    assert pipe(chat, max_new_tokens=24, do_sample=False)[0]["generated_text"][-1]["content"] == answer


@pytest.mark.parametrize("layout", ["prefix", "spread"])
@pytest.mark.parametrize("chain", [8, None])
@pytest.mark.parametrize("resident", [0, 4])
def test_graphed_speculative_verify_equals_graphed_plain_in_bf16(graphable_checkpoint, resident, chain, layout):
    """Verify passes captured as graphs (`GraphedDecode.verify`): greedy tokens are plain graphed greedy's
    bit for bit in bf16, with streamed layers first or spread among the resident ones, chains fixed and
    adaptive, the static cache reused."""
    import overspill
    from overspill.api import placement_of
    from overspill.planning.placement import budget_for
    from overspill.planning.plan import Workload
    from overspill.planning.speculation import GRAPHED_PASSES
    from overspill.runtime import speculative
    from overspill.runtime.drafts import OracleDrafter
    from overspill.runtime.loader import build_skeleton, decoder_layers, footprint

    if layout == "spread" and resident == 0:
        pytest.skip("every layer streams: spread is the prefix layout")
    path, config = graphable_checkpoint
    skeleton = build_skeleton(config, torch.bfloat16)
    fp = footprint(skeleton, decoder_layers(skeleton)[1], torch.bfloat16)
    model, _ = overspill.load(path, gpu_memory=budget_for(fp, Workload(128, 1), resident), context=128,
                              progress=False, cuda_graphs=True, layout=layout)
    graphed = placement_of(model).graphs
    ids = torch.randint(3, config.vocab_size, (1, 20), device="cuda")
    want = model.generate(ids, **GEN)
    speculative.enable(model, OracleDrafter(want[0, 20:].cpu(), 20, 0.8, config.vocab_size, seed=1), chain=chain)
    try:
        got = model.generate(ids, **GEN)
        again = model.generate(ids, **GEN)
        stats = model.speculation_stats
    finally:
        speculative.enable(model, None)
    assert graphed.capture, "capture fell back to eager"
    assert any(key[0] == ("verify", n) for key in graphed.graphs for n in GRAPHED_PASSES)
    assert torch.equal(got, want) and torch.equal(again, want)
    assert stats.passes < GEN["max_new_tokens"] - 1
