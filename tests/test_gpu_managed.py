"""GPU tests of the managed weight tier (`pytest -m gpu`), always well inside the GPU's free memory."""

from __future__ import annotations

import pytest
import torch
from test_gpu import save_tiny

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]


@pytest.mark.parametrize("streaming", ["managed", "mapped"])
def test_managed_streaming_gives_resident_tokens(tmp_path_factory, streaming):
    pytest.importorskip("cuda.bindings")
    from transformers import AutoModelForCausalLM

    import overspill
    from overspill.api import placement_of
    from overspill.planning.placement import budget_for
    from overspill.planning.plan import Workload
    from overspill.runtime.loader import build_skeleton, decoder_layers, footprint

    path, config = save_tiny("llama", tmp_path_factory)
    skeleton = build_skeleton(config, torch.bfloat16)
    fp = footprint(skeleton, decoder_layers(skeleton)[1], torch.bfloat16)
    budget = budget_for(fp, Workload(256, 2), 4)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    model, _ = overspill.load(path, gpu_memory=budget, context=256, batch=2, progress=False, streaming=streaming)
    placement = placement_of(model)
    assert placement.plan.streaming == streaming and len(placement.plan.streamed_layers) == 4
    assert placement.ring.in_place and placement.managed is not None
    ids = torch.randint(0, config.vocab_size, (2, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, **kw)
    assert torch.equal(model.generate(ids, **kw), want)
    assert torch.equal(model.generate(ids, **kw), want)  # a second pass over evicted layers
    assert placement.ring.restarts == 1


def test_managed_streaming_refused_beyond_half_of_free_memory_on_pcie():
    import overspill
    from overspill.errors import OverspillError
    from overspill.runtime.hardware import coherent_platform

    if coherent_platform(0):
        pytest.skip("coherent platform: managed memory may exceed GPU memory")
    with pytest.raises(OverspillError, match="refusing"):
        overspill.load("llama-3-70b", gpu_memory="12GiB", random_weights=True, progress=False, streaming="managed")


def test_mapped_streaming_decodes_through_graphs(tmp_path_factory):
    """Mapped layers issue nothing: a graphed step reads them in place, as the eager step does."""
    pytest.importorskip("cuda.bindings")
    import overspill
    from overspill.api import placement_of
    from overspill.planning.placement import budget_for
    from overspill.planning.plan import Workload
    from overspill.runtime.loader import build_skeleton, decoder_layers, footprint

    path, config = save_tiny("llama", tmp_path_factory)
    skeleton = build_skeleton(config, torch.bfloat16)
    fp = footprint(skeleton, decoder_layers(skeleton)[1], torch.bfloat16)
    budget = budget_for(fp, Workload(128, 1), 4)
    model, _ = overspill.load(path, gpu_memory=budget, context=128, progress=False, streaming="mapped",
                              cuda_graphs=True)
    graphed = placement_of(model).graphs
    assert graphed is not None
    ids = torch.randint(3, config.vocab_size, (1, 20), device="cuda")
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    got = model.generate(ids, **kw)
    assert graphed.capture and graphed.replays > 0
    graphed.capture = False
    assert torch.equal(got, model.generate(ids, **kw))
