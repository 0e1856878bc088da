"""Weight sources: random weights are a function of (seed, name) only, wherever the tensor lives;
safetensors checkpoints are read under the model's names and fail in one line when broken."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from overspill.errors import OverspillError
from overspill.runtime import checkpoint
from overspill.runtime.checkpoint import CheckpointReader, RandomWeights


def test_random_weights_same_for_any_destination_and_chunked(monkeypatch) -> None:
    source = RandomWeights(seed=3, std=0.02, device=torch.device("cpu"))
    whole = torch.empty(64, 48)
    source.fill("model.layers.0.mlp.up_proj.weight", whole)
    # A view into a flat buffer (how streamed layers are stored) gets the same values.
    flat = torch.empty(64 * 48 + 100)
    view = flat[100:].view(64, 48)
    source.fill("model.layers.0.mlp.up_proj.weight", view)
    assert torch.equal(whole, view)
    # Small chunks (many seeds) stay deterministic and keep the requested scale.
    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", 100)
    a, b = torch.empty(64, 48), torch.empty(64, 48)
    source.fill("w.weight", a)
    source.fill("w.weight", b)
    assert torch.equal(a, b) and 0.015 < a.std().item() < 0.025
    # Norms start at one and biases at zero, like transformers' initialisation.
    norm, bias = torch.empty(8), torch.empty(8)
    source.fill("model.norm.weight", norm)
    source.fill("model.layers.0.self_attn.q_proj.bias", bias)
    assert torch.equal(norm, torch.ones(8)) and torch.equal(bias, torch.zeros(8))


def test_random_expert_weights_draw_at_most_one_chunk_at_a_time(monkeypatch) -> None:
    """A [experts, rows, cols] tensor is drawn in chunks of rows of its last dimension: drawing a whole
    expert at once took one of Mixtral's 470 MB of float32 scratch on a full GPU."""
    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", 64)
    drawn = []
    randn = torch.randn

    def counted(*args, **kwargs):
        out = randn(*args, **kwargs)
        drawn.append(out.numel())
        return out

    monkeypatch.setattr(torch, "randn", counted)
    experts = torch.empty(2, 16, 32)  # one expert is 512 elements, eight chunks
    RandomWeights(seed=1, device=torch.device("cpu")).fill("model.layers.0.mlp.experts.gate_up_proj", experts)
    assert max(drawn) <= 64 and sum(drawn) == experts.numel()
    assert 0.015 < experts.std().item() < 0.025


# --- safetensors checkpoints: names through transformers' conversion mapping, broken files as one line --


def tiny_model(model_type: str, **sizes):
    """A tiny random model of `model_type` and its meta-device skeleton (what the loader binds)."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    from overspill.runtime.loader import build_skeleton

    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
             "vocab_size": 64, **sizes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(model_type, **shape)
        return AutoModelForCausalLM.from_config(config).eval(), build_skeleton(config, torch.float32)


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """(model, skeleton, directory): GPT-NeoX, whose save_pretrained writes the head as `embed_out`."""
    model, skeleton = tiny_model("gpt_neox")
    path = tmp_path_factory.mktemp("neox")
    model.save_pretrained(str(path))
    return model, skeleton, path


def test_gpt_neox_head_found_through_transformers_conversion(neox) -> None:
    model, skeleton, path = neox
    reader = CheckpointReader(path)
    # The file and the model disagree on the head's name; transformers' own mapping bridges them.
    assert "embed_out.weight" in reader.key_to_file and "lm_head.weight" in dict(skeleton.named_parameters())
    reader.bind(skeleton)
    head = torch.empty(model.lm_head.weight.shape)
    reader.fill("lm_head.weight", head)
    assert torch.equal(head, model.lm_head.weight)
    reader.close()


def test_without_transformers_conversion_mapping_names_pass_through(neox, monkeypatch) -> None:
    # transformers before 5.0 has no conversion module: binding then renames nothing, and a missing
    # name is still a one-line error rather than an ImportError.
    monkeypatch.setitem(sys.modules, "transformers.conversion_mapping", None)
    model, skeleton, path = neox
    reader = CheckpointReader(path)
    reader.bind(skeleton)
    norm = torch.empty(model.gpt_neox.final_layer_norm.weight.shape)
    reader.fill("gpt_neox.final_layer_norm.weight", norm)
    assert torch.equal(norm, model.gpt_neox.final_layer_norm.weight)
    with pytest.raises(OverspillError, match="no tensor for lm_head.weight"):
        reader.fill("lm_head.weight", torch.empty(model.lm_head.weight.shape))
    reader.close()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A tiny Llama saved in several shards with an index."""
    model, _ = tiny_model("llama")
    path = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(str(path), max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    return path


def broken_copy(src: Path, dst: Path, break_it) -> Path:
    shutil.copytree(src, dst)
    break_it(dst)
    return dst


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def first_shard(directory: Path) -> Path:
    return sorted(directory.glob("model-*.safetensors"))[0]


# (case, how to break a copy of the sharded checkpoint, words the error must contain)
BROKEN_SHARDS = [
    ("truncated-shard", lambda d: truncate(first_shard(d)), ["model-00001", "truncated or corrupt"]),
    ("garbage-shard", lambda d: first_shard(d).write_bytes(b"\x00" * 4096), ["truncated or corrupt"]),
    ("missing-shard", lambda d: first_shard(d).unlink(), ["model-00001", "missing"]),
    ("index-not-json", lambda d: (d / "model.safetensors.index.json").write_text("{"), ["index.json", "not a valid"]),
]


@pytest.mark.parametrize(("case", "break_it", "words"), BROKEN_SHARDS, ids=[c[0] for c in BROKEN_SHARDS])
def test_broken_shards_fail_at_open_with_one_line(sharded, tmp_path, case: str, break_it, words: list[str]) -> None:
    # Every shard is opened up front, so a broken one fails before any weight is placed.
    directory = broken_copy(sharded, tmp_path / case, break_it)
    with pytest.raises(OverspillError) as info:
        CheckpointReader(directory)
    message = str(info.value)
    assert "\n" not in message and "download it again" in message
    for word in words:
        assert word in message, (word, message)


def test_mixtral_experts_fused_as_transformers_does_and_a_missing_one_named(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    model, skeleton = tiny_model("mixtral", num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2)
    model.save_pretrained(str(tmp_path / "whole"))
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    want = dict(model.named_parameters())[fused]
    # Per-expert w1/w3 in the file, one [E, 2I, H] tensor in the model: transformers' converter says how.
    reader = CheckpointReader(tmp_path / "whole")
    reader.bind(skeleton)
    got = torch.empty(want.shape)
    reader.fill(fused, got)
    assert torch.equal(got, want)
    reader.close()

    # One expert's w3 lost: the error names what is missing instead of filling part of the tensor.
    tensors = load_file(str(tmp_path / "whole" / "model.safetensors"))
    del tensors["model.layers.0.block_sparse_moe.experts.1.w3.weight"]
    (tmp_path / "partial").mkdir()
    save_file(tensors, str(tmp_path / "partial" / "model.safetensors"), metadata={"format": "pt"})
    reader = CheckpointReader(tmp_path / "partial")
    reader.bind(skeleton)
    with pytest.raises(OverspillError, match=r"lacks \.experts\.\*\.w3\.weight for some of its 3 experts"):
        reader.fill(fused, torch.empty(want.shape))
    reader.close()
