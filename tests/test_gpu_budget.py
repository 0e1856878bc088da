"""Budget truth on the GPU: plain `generate` on the workload a plan was made for (a prompt filling the
context, prefilled in several chunks) peaks inside the plan's device total, and near it."""

from __future__ import annotations

import gc
import json

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.gpu, cuda]

CONFIG = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
              num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=32768)

# Llama-4's MoE block runs every expert on every token at once (a bmm over [experts, tokens, ...]):
# a 2048-token prefill chunk's expert intermediates are 16x those of one expert.
LLAMA4 = dict(model_type="llama4_text", hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048,
              num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=32000,
              num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=8192,
              max_position_embeddings=8192)


@pytest.mark.parametrize("config,context,batch,resident",
                         [(CONFIG, 16384, 1, 8), (CONFIG, 4096, 4, 12), (LLAMA4, 4096, 1, 4)],
                         ids=["llama-16k", "llama-batch4", "llama4-moe"])
def test_generate_peaks_inside_the_plan(tmp_path, config, context, batch, resident) -> None:
    import overspill
    from overspill.api import placement_of
    from overspill.planning.placement import budget_for
    from overspill.planning.plan import Workload
    from overspill.runtime.loader import build_skeleton, decoder_layers, footprint

    (tmp_path / "config.json").write_text(json.dumps(config))
    from transformers import AutoConfig

    skeleton = build_skeleton(AutoConfig.from_pretrained(tmp_path), torch.bfloat16)
    fp = footprint(skeleton, decoder_layers(skeleton)[1], torch.bfloat16)
    budget = budget_for(fp, Workload(context, batch), resident)
    gc.collect()  # models of earlier tests must not be freed during this one's measurement
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model, _ = overspill.load(str(tmp_path), gpu_memory=budget, context=context, batch=batch,
                              random_weights=True, progress=False)
    plan = placement_of(model).plan
    assert len(plan.resident_layers) == resident and plan.streamed_layers
    ids = torch.randint(2, config["vocab_size"], (batch, context - 8), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, pad_token_id=0)
    peak = torch.cuda.max_memory_allocated() - before
    assert out.shape == (batch, context)
    assert peak <= plan.device_bytes <= budget
    assert peak >= 0.75 * plan.device_bytes  # the plan reserves what the workload uses, not far more
