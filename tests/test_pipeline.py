"""A pipeline over layers (issue 18) on the CPU: 2 and 4 gloo ranks in processes give one process's tokens.

Each rank is a process started by `overspill.runtime.launch.spawn` with torchrun's variables; it loads the
same checkpoint with `overspill.load(pipeline=True)` under its own budget, places its own span of
decoder layers (streaming some of them through its own ring), and runs `generate` like the others.
The checkpoints are 16-layer versions of conftest's tiny architectures, so that 4 ranks of 4 layers
each stream through a ring of 2 slots (depth 1) with a resident layer beside.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import overspill
from overspill.runtime.launch import _free_port, spawn
from pipeline_ranks import generate_rank
from overspill.runtime.loader import placement_of

from conftest import TINY_CONFIGS, VOCAB

LAYERS = 16
CONTEXT = 64
GEN = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
# Budgets (bytes) under which every rank keeps 1 layer resident and streams the rest of its span at depth 1
# (float32, context 64): found with `planning.pipeline.split_layers` on the 16-layer tiny llama.
BUDGET = {2: 760_000, 4: 700_000}


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """`deep_checkpoint(arch) -> Path`: conftest's tiny architecture with 16 decoder layers, saved once."""
    built = {}

    def make(arch: str):
        if arch not in built:
            from transformers import AutoConfig, AutoModelForCausalLM

            d = {**TINY_CONFIGS[arch], "num_hidden_layers": LAYERS}
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = AutoConfig.for_model(d.pop("model_type"), **d)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            path = tmp_path_factory.mktemp(f"deep-{arch}")
            model.save_pretrained(str(path))
            built[arch] = path
        return built[arch]

    return make


def prompt(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompt ids [batch, 12]; with batch 2 the first row is left-padded by 3."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, VOCAB, (batch, 12), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


def one_process(path, ids: torch.Tensor, mask: torch.Tensor, **load_kwargs) -> list[list[int]]:
    model, _ = overspill.load(path, dtype="float32", context=CONTEXT, progress=False, **load_kwargs)
    return model.generate(ids, attention_mask=mask, **GEN).tolist()


def pipeline(path, ranks: int, ids: torch.Tensor, mask: torch.Tensor, **load_kwargs) -> list[dict]:
    kwargs = dict(model=str(path), dtype="float32", context=CONTEXT, **load_kwargs)
    return spawn(generate_rank, ranks, (kwargs, ids.tolist(), GEN, 0, mask.tolist()), backend_name="gloo",
                 timeout_s=240)


def check_spans(results: list[dict], layers: int) -> None:
    """Contiguous spans covering every layer once, rank 0 first."""
    assert [r["rank"] for r in results] == list(range(len(results)))
    assert results[0]["start"] == 0 and results[-1]["stop"] == layers
    assert all(a["stop"] == b["start"] for a, b in zip(results, results[1:]))


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_streaming_their_spans_give_one_process_tokens(ranks: int, deep_checkpoint) -> None:
    path = deep_checkpoint("llama")
    ids, mask = prompt()
    want = one_process(path, ids, mask, gpu_memory=None)
    streamed_alone = one_process(path, ids, mask, gpu_memory=BUDGET[ranks], depth=1)
    assert streamed_alone == want  # one process under the same budget streams and agrees

    results = pipeline(path, ranks, ids, mask, gpu_memory=BUDGET[ranks], depth=1)
    check_spans(results, LAYERS)
    for r in results:
        assert r["tokens"] == want, f"rank {r['rank']}"
        # each rank streams the first layers of its own span through its own ring and keeps the last resident
        assert r["streamed_layers"] == list(range(r["start"], r["stop"] - 1)), r["summary"]
        assert r["resident_layers"] == 1
    hidden = 64 * 4  # float32 hidden state per token
    tokens = ids.shape[1] + GEN["max_new_tokens"] - 1  # the prompt's pass, then one token per decode pass
    assert [r["sent_bytes"] for r in results] == [hidden * tokens] * ranks  # one hop per rank per pass
    assert "pipeline rank 1: decoder layers" in results[1]["summary"]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_left_padded_batch(arch: str, deep_checkpoint) -> None:
    # The padded row's masks come from the cache's lengths, which other ranks' layers keep with one-element KV
    # (transformers 5.17 takes zero-width KV for an empty layer: the padded row then diverged from step 2).
    # gemma2: tied head (one copy, on rank 0), sliding-window layers, logit soft-capping after the broadcast.
    path = deep_checkpoint(arch)
    ids, mask = prompt(batch=2)
    want = one_process(path, ids, mask, gpu_memory=None)
    results = pipeline(path, 2, ids, mask, gpu_memory=None)
    check_spans(results, LAYERS)
    assert all(r["tokens"] == want for r in results)


def test_embedded_smollm2_two_ranks(default_model_dir) -> None:
    # the real SmolLM2-135M (30 layers, tied embeddings: the head on rank 0 reads the embedding's table)
    ids = torch.tensor([[1, 504, 3458, 282, 253, 1789, 28, 30, 476, 1015, 314, 4049]])
    mask = torch.ones_like(ids)
    want = one_process(str(default_model_dir), ids, mask, gpu_memory=None)
    results = pipeline(default_model_dir, 2, ids, mask, gpu_memory=None)
    check_spans(results, 30)
    assert all(r["tokens"] == want for r in results)


def test_pipeline_refuses_what_it_does_not_combine_with() -> None:
    from overspill.errors import OverspillError
    from overspill.runtime.pipeline import join

    for kwargs in (dict(speculate="ngram"), dict(cuda_graphs=True), dict(cpu_compute="auto"),
                   dict(stream_format="int8"), dict(moe_streaming="experts")):
        args = dict(device=None, plan=None, cuda_graphs=False, speculate=None, cpu_compute="off",
                    stream_format="auto", moe_streaming="auto") | kwargs
        with pytest.raises(OverspillError, match="does not combine"):
            join(**args)


def test_a_single_rank_pipeline_is_the_plain_model(deep_checkpoint, monkeypatch) -> None:
    # world 1 (torchrun --nproc-per-node 1): the rank owns everything and sends nothing
    import torch.distributed as dist

    monkeypatch.setenv("OVERSPILL_BACKEND", "gloo")
    path = deep_checkpoint("llama")
    ids, mask = prompt()
    want = one_process(path, ids, mask, gpu_memory=None)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    try:
        model, _ = overspill.load(path, dtype="float32", context=CONTEXT, progress=False, pipeline=True)
        assert model.generate(ids, attention_mask=mask, **GEN).tolist() == want
        assert model.pipeline_stage.links.sent == 0 and placement_of(model).device.type == "cpu"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_host_tier_kv_and_host_embedding_on_ranks(deep_checkpoint) -> None:
    # --kv-gpu-memory applies to each rank's own KV: every layer's KV of a span in pinned host memory, read with
    # its layer; rank 0's budget also moves the (untied) input embedding to the host
    path = deep_checkpoint("llama")
    ids, mask = prompt()
    want = one_process(path, ids, mask, gpu_memory=None)
    results = pipeline(path, 2, ids, mask, gpu_memory=900_000, depth=1, kv_gpu_memory=40_000)
    assert all(r["tokens"] == want for r in results)
    assert f"in pinned host memory (layers {results[1]['start']}-15" in results[1]["summary"]
    assert "embeddings: host" in results[0]["summary"]
