"""`check_architecture` and `resolve`: the one refusal and the one name -> model lookup that `plan`
(config alone, no torch) and `load` share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from overspill.errors import OverspillError
from overspill.planning.configs import shipped_config
from overspill.runtime.sources import ENCODER_MODEL_TYPES, check_architecture, default_gguf_path, resolve

SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "falcon", "some_new_decoder"])
def test_decoder_only_configs_pass(model_type: str) -> None:
    check_architecture({"model_type": model_type, **SHAPE}, "m")


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"model_type": "bert", **SHAPE}, ["an encoder", "'bert'", "decoder-only causal LM"]),
        ({"model_type": "bart", "is_encoder_decoder": True}, ["an encoder-decoder model", "'bart'"]),
        (SHAPE, ["no model_type"]),
    ],
    ids=["encoder", "encoder-decoder", "no-model-type"],
)
def test_refusals_are_one_line(config: dict, words: list[str]) -> None:
    with pytest.raises(OverspillError) as info:
        check_architecture(config, "path/to/model")
    assert "\n" not in str(info.value) and "path/to/model" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_encoder_types_are_encoders_to_transformers() -> None:
    # The list lives in overspill because `plan` may not import transformers; each entry must be a
    # model type transformers builds both as a causal LM and as a masked LM (an encoder), so the
    # check never refuses a real decoder. Types this transformers does not know are skipped.
    from transformers.models.auto import modeling_auto

    known = set(modeling_auto.CONFIG_MAPPING_NAMES)
    causal, masked = set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), set(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    assert "bert" in known
    assert {t for t in ENCODER_MODEL_TYPES if t in known} <= causal & masked


# ---------------------------------------------------------------- `resolve`: the one name -> model lookup

TINY = {"model_type": "llama", **SHAPE}


def hub_cache(monkeypatch, tmp_path: Path, repo: str = "me/tiny") -> Path:
    """A fake local Hugging Face cache holding `repo`'s snapshot (config.json only)."""
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text(json.dumps(TINY))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, name: str(snapshot / name) if repo_id == repo else None)
    return snapshot


def test_plan_and_load_find_the_same_model(tmp_path, monkeypatch) -> None:
    # `plan` asks for the config alone, `load` for config and weights: the same lookup answers both.
    snapshot = hub_cache(monkeypatch, tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(TINY))
    for name, where in ((str(tmp_path / "ckpt"), tmp_path / "ckpt"), ("me/tiny", snapshot)):
        plan, load = resolve(name, config_only=True), resolve(name)
        assert plan.config_dir == load.config_dir == load.weights_dir == where and plan.weights_dir is None
        assert plan.config() == load.config() == TINY
    plan, load = resolve("llama-3-8b", config_only=True), resolve("llama-3-8b", random_weights=True)
    assert plan.config() == load.config() == shipped_config("llama-3-8b") and load.weights_dir is None


def test_config_only_accepts_a_config_file(tmp_path) -> None:
    (tmp_path / "my.json").write_text(json.dumps(TINY))
    assert resolve(str(tmp_path / "my.json"), config_only=True).config() == TINY
    with pytest.raises(OverspillError, match="not a .gguf"):
        resolve(str(tmp_path / "my.json"))  # `load` needs weights beside a config


@pytest.mark.parametrize("config_only", [False, True], ids=["load", "plan"])
def test_unknown_names_are_one_line(tmp_path, monkeypatch, config_only: bool) -> None:
    hub_cache(monkeypatch, tmp_path)
    cases = [("no-such-model", ["not found", "llama-3-8b", "owner/name"]),
             ("owner/absent", ["local Hugging Face cache", "hf download owner/absent"]),
             (str(tmp_path), ["no config.json"]),
             ("Llama-3-8B", ["did you mean llama-3-8b?"]), ("llama3-70b", ["did you mean llama-3-70b?"]),
             ("", ["the model name is empty"]), ("  ", ["the model name is empty"])]  # not the current directory
    for name, words in cases:
        with pytest.raises(OverspillError) as info:
            resolve(name, config_only=config_only)
        assert "\n" not in str(info.value)
        for word in words:
            assert word in str(info.value), (name, str(info.value))
    with pytest.raises(OverspillError) as far:
        resolve("xyz", config_only=config_only)
    assert "did you mean" not in str(far.value)


def test_config_problems_name_the_file(tmp_path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(OverspillError, match="broken.json as a JSON config"):
        resolve(str(tmp_path / "broken.json"), config_only=True)
    with pytest.raises(OverspillError, match="holds a JSON list"):
        resolve(str(tmp_path / "list.json"), config_only=True)


def test_a_gguf_is_planned_only_once_converted(tmp_path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(OverspillError, match="overspill run .*m.gguf"):
        resolve(str(tmp_path / "m.gguf"), config_only=True)  # converting would import torch


def _damaged_gguf(kind: str) -> bytes:
    """A .gguf as a cut-short download or a wrong file leaves it."""
    if kind == "empty":
        return b""
    if kind == "not-gguf":
        return bytes(range(256)) * 4
    try:
        good = default_gguf_path()
    except OverspillError:
        pytest.skip("the embedded GGUF is not installed")
    with open(good, "rb") as f:
        return f.read(3_000_000)  # the header whole, the tensor data cut short


@pytest.mark.parametrize("kind", ["truncated", "not-gguf", "empty"])
def test_a_damaged_gguf_is_one_line_and_leaves_no_cache(tmp_path, monkeypatch, kind: str) -> None:
    # The gguf library's ValueError/IndexError become the message a truncated safetensors gets.
    monkeypatch.setenv("OVERSPILL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(_damaged_gguf(kind))
    with pytest.raises(OverspillError) as info:
        resolve(str(path))
    msg = str(info.value)
    assert "\n" not in msg and f"{path} is truncated or not a GGUF file (" in msg and "download it again" in msg
    left = tmp_path / "cache" / "gguf"
    assert not left.exists() or not any(left.iterdir())  # no half-written conversion
