"""PromptBound never claims more tokens than the tokenizer makes, and gives up where it cannot know."""

from __future__ import annotations

import random
import time

import pytest

tokenizers = pytest.importorskip("tokenizers")

from overspill.serving.prompt_bound import PromptBound  # noqa: E402

PIECES = ["a", "b", "ab", " ", "  ", "\n", "\t", "é", "e\u0301", "\u1100\u1161\u11a8", "中", "🏔\ufe0f", "#", "=",
          "<|im_start|>", "hello ", "\x00", "\ufffd"]


def _texts(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        yield "".join(rng.choice(PIECES) * rng.randint(1, 90) for _ in range(rng.randint(1, 25)))


def _sentencepiece_like(**bpe):
    """A Llama-2-style tokenizer: NFC, spaces as "▁", BPE with the given options."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "▁", "a", "b", "▁a", "ab", "▁ab", "é", "▁" * 12] + [f"<0x{i:02X}>" for i in range(256)]
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b")]
    t = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>", **bpe))
    t.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Prepend("▁"),
                                         normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=t)


@pytest.fixture(scope="module")
def smollm_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def _assert_sound(tokenizer, seed: int) -> PromptBound:
    bound = PromptBound(tokenizer)
    assert bound.longest > 0
    for text in _texts(seed, 400):
        made = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert bound.min_tokens(text) <= made, (text, bound.min_tokens(text), made)
    return bound


def test_byte_level_bound_is_sound_and_counts_bytes(smollm_tokenizer):
    bound = _assert_sound(smollm_tokenizer, 0)
    assert bound.min_tokens("#" * bound.longest) == 1 and bound.min_tokens("中" * bound.longest) == 3
    assert bound.min_tokens("hello " * 150_000) > 1024  # the isolation test's 900 kB prompt: refused unread


def test_sentencepiece_like_bound_is_sound_through_normalization():
    _assert_sound(_sentencepiece_like(byte_fallback=True, fuse_unk=True), 1)
    _assert_sound(_sentencepiece_like(byte_fallback=False, fuse_unk=False), 2)  # each <unk> covers one character


def test_no_bound_where_one_token_can_cover_any_length(smollm_tokenizer):
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    fused = PromptBound(_sentencepiece_like(byte_fallback=False, fuse_unk=True))  # a run of unknowns: one token
    assert fused.longest == 0 and fused.min_tokens("中" * 10_000) == 0
    word = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert PromptBound(PreTrainedTokenizerFast(tokenizer_object=word)).longest == 0
    stripped = _sentencepiece_like(byte_fallback=True)
    stripped.backend_tokenizer.normalizer = normalizers.Strip()
    assert PromptBound(stripped).longest == 0


def test_bound_is_fast_on_megabytes(smollm_tokenizer):
    bound = PromptBound(smollm_tokenizer)
    text = "Ünïcode and ASCII, mixed. " * 160_000  # ~4 MB
    start = time.perf_counter()
    assert bound.min_tokens(text) > 32_768
    assert time.perf_counter() - start < 0.5
