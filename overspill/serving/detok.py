"""`TextStream`: one sequence's generated text, decoded incrementally and cut at stop strings.

Decoding the whole output at every token costs O(length) per token (quadratic per request, and
the engine thread waits for it). As in TGI and vLLM, only a short window is decoded: the text of
ids[prefix:] minus the text of ids[prefix:read], where `prefix` trails a few tokens behind so
that tokenizers whose output depends on the previous token (leading-space handling, byte
fallback) decode the same as the full text. Text is released only when it can no longer change:
an incomplete UTF-8 tail ("\\ufffd") and a possible start of a stop string are held back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """What one token released: new `text`, and `finish` ("stop" or "length") when the sequence ended."""

    text: str
    finish: str | None


class TextStream:
    """Args: tokenizer (anything with `decode(ids, skip_special_tokens=...)`), a lock shared with
    other users of the tokenizer, the request's stop strings and its token limit."""

    def __init__(self, tokenizer, lock: threading.Lock, stops: tuple[str, ...], max_tokens: int):
        self.tokenizer, self.lock, self.stops, self.max_tokens = tokenizer, lock, stops, max_tokens
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.emitted = 0  # characters of `text` released
        self._prefix = self._read = 0

    def push(self, token: int, eos: bool) -> Piece:
        """Add one generated token; returns the text that became final and whether the sequence ended."""
        self.ids.append(token)
        with self.lock:
            before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
            after = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(eos)

    def _release(self, eos: bool) -> Piece:
        finish, cut = None, len(self.text)
        for stop in self.stops:  # search a little before the released part: a stop may span the boundary
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1 and at < cut:
                cut, finish = at, "stop"
        if finish is None and eos:
            finish = "stop"
        if finish is None and len(self.ids) >= self.max_tokens:
            finish = "length"
        safe = cut if finish is not None else _stable_prefix(self.text, self.stops)
        delta = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return Piece(delta, finish)


def _stable_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of `text` safe to send: hold back any start of a stop string at its end.

    Only the places where a stop's first character occurs are tried, earliest first (the longest
    start): a client's stop string of a million characters costs the engine thread no more per token
    than a short one (slicing every length of it cost O(text length) copies of the text per token)."""
    safe = len(text)
    for stop in stops:
        if not stop:
            continue
        at = text.find(stop[0], max(0, len(text) - len(stop) + 1))
        while at != -1 and at < safe:
            if stop.startswith(text[at:]):
                safe = at
                break
            at = text.find(stop[0], at + 1)
    return safe
