"""Tokenisation shared by training and serving, so both see exactly the same token ids.

Only `tokenizers` and numpy: the server imports this without torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass(frozen=True)
class TokenBatch:
    """Model inputs for one batch, padded to the batch's longest sequence (int64, (B, T))."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def as_feed(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }


class TextTokenizer:
    """A `tokenizers.Tokenizer` configured to truncate at `max_length` and pad per batch."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self.max_length = max_length
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)

    @classmethod
    def from_file(cls, path: Path, max_length: int) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)), max_length)

    def save(self, path: Path) -> None:
        self._tokenizer.save(str(path))

    def lengths(self, texts: list[str]) -> list[int]:
        """Token counts after truncation (used to sort batches by length)."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts)]

    def __call__(self, texts: list[str]) -> TokenBatch:
        encodings = self._tokenizer.encode_batch(texts)
        width = max((len(e.ids) for e in encodings), default=1)
        batch = len(encodings)
        input_ids = np.zeros((batch, width), dtype=np.int64)
        attention = np.zeros((batch, width), dtype=np.int64)
        types = np.zeros((batch, width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            input_ids[row, :n] = enc.ids
            attention[row, :n] = 1
            types[row, :n] = enc.type_ids
        return TokenBatch(input_ids, attention, types)
