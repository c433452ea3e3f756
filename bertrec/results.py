"""Typed results of the bertrec API, shared by the server's engine and the Python client.

The server builds them from the model and turns them into protobuf messages; the client builds
them from those messages. One definition keeps both sides describing the same answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int


@dataclass(frozen=True)
class RankedItem:
    item_id: str
    score: float  # ranking score (orders the list)
    predicted_rating: float
    rank: int  # 1-based


@dataclass(frozen=True)
class Recommendations:
    items: list[RankedItem]
    model: ModelRef

    @property
    def item_ids(self) -> list[str]:
        return [i.item_id for i in self.items]


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    predicted_rating: float


@dataclass(frozen=True)
class Scores:
    items: list[ScoredItem]
    model: ModelRef


@dataclass(frozen=True)
class SimilarItem:
    item_id: str
    similarity: float  # cosine of item factors
    rank: int


@dataclass(frozen=True)
class SimilarItems:
    items: list[SimilarItem]
    model: ModelRef


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # float32 (n_texts, dim)
    model: ModelRef


@dataclass(frozen=True)
class ModelInfo:
    model: ModelRef
    dim: int
    user_count: int
    item_count: int
    execution_provider: str
    encoder_file: str
    max_seq_len: int
    max_k: int
    max_item_ids: int
    max_texts: int
    max_text_bytes: int
    created_at: str
    metrics: dict[str, float] = field(default_factory=dict)
    scoring: dict[str, str] = field(default_factory=dict)
