"""A lower bound on a text's token count, read from its length: too long a prompt is refused
without tokenizing it (megabytes of text take the tokenizer seconds, and gigabytes of memory).

Why the bound holds, for a fast (Rust) BPE tokenizer: the tokenizer normalizes the text (NFC,
Replace, Prepend, Lowercase, ... -- any of which may shrink it, so the bound measures the text
after this tokenizer's own normalizer); the pre-tokenizer only splits it, except that ByteLevel maps
each UTF-8 byte to one character and Metaspace writes spaces as one "▁"; then BPE covers every piece
with vocabulary entries whose strings, concatenated, spell the piece. So no token covers more than
`longest` units -- characters, or bytes under ByteLevel -- where `longest` is the longest entry of
the vocabulary (added tokens included, measured the same way), and

    tokens >= ceil(units(normalized text) / longest).

Two cases break the spelling and get no bound (`min_tokens` answers 0, and the prompt is tokenized
whole as before): an unknown character that a BPE without byte fallback drops or fuses into one
unknown token, and tokenizers that are not BPE (WordPiece, Unigram) or not fast. A Strip normalizer
also disables it: the tokenizer strips each stretch between added tokens, more than the whole text.
"""

from __future__ import annotations

import json
import math


class PromptBound:
    """`min_tokens(text)` for one tokenizer; built once (it reads the whole vocabulary)."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._normalizer = None
        self._byte_level = False
        self.longest = 0  # units one token covers at most; 0: no bound for this tokenizer
        if backend is None:
            return
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or _has_type(spec.get("normalizer"), "Strip"):
            return
        self._byte_level = _has_type(spec.get("pre_tokenizer"), "ByteLevel")
        unknown_is_one_char = model.get("unk_token") and not model.get("fuse_unk")
        if not (self._byte_level or model.get("byte_fallback") or unknown_is_one_char):
            return
        self._normalizer = backend.normalizer
        # model entries spell one unit per character (ByteLevel ones one byte per character already);
        # added tokens are matched in the raw text, so they count in the text's units
        spelled = [len(entry) for entry in model.get("vocab") or {}]
        added = [self._units(token["content"]) for token in spec.get("added_tokens") or ()]
        self.longest = max(spelled + added, default=0)

    def min_tokens(self, text: str) -> int:
        """Tokens the tokenizer makes of `text` at least (special tokens it adds not counted).

        Costs one pass of the normalizer over `text`: milliseconds for megabytes."""
        if not self.longest or not text:
            return 0
        normalized = self._normalizer.normalize_str(text) if self._normalizer is not None else text
        return math.ceil(self._units(normalized) / self.longest)

    def _units(self, text: str) -> int:
        return len(text.encode("utf-8")) if self._byte_level else len(text)


def _has_type(component: dict | None, name: str) -> bool:
    """Whether a tokenizer.json component (a normalizer, a pre-tokenizer) is or holds a `name`."""
    if not isinstance(component, dict):
        return False
    if component.get("type") == name:
        return True
    parts = component.get("normalizers") or component.get("pretokenizers") or ()
    return any(_has_type(p, name) for p in parts)
