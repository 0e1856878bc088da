"""`check_architecture`: the one refusal `plan` (config alone, no torch) and `load` share."""

from __future__ import annotations

import pytest

from overspill.errors import OverspillError
from overspill.runtime.sources import ENCODER_MODEL_TYPES, check_architecture

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
