"""Typed results of the bertrec API, and their conversion from the protobuf messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from bertrec.v1 import recommender_pb2 as pb


class RecommenderError(Exception):
    """A failed call: the gRPC status `code` and the server's `details` message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE (the only status retried: nothing ran).

    Attempt n (n >= 1) waits `min(initial_backoff_s * multiplier**(n-1), max_backoff_s)`
    scaled by a random factor in [1 - jitter, 1], and never past the call's deadline.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def backoff_s(self, attempt: int, rand: float) -> float:
        base = min(self.initial_backoff_s * self.multiplier ** (attempt - 1), self.max_backoff_s)
        return base * (1.0 - self.jitter * rand)


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


def recommend_request(
    user_id: str,
    k: int,
    exclude_rated: bool,
    include_item_ids: Sequence[str],
    exclude_item_ids: Sequence[str],
) -> pb.RecommendRequest:
    return pb.RecommendRequest(
        user_id=user_id,
        k=k,
        exclude_rated=exclude_rated,
        include_item_ids=list(include_item_ids),
        exclude_item_ids=list(exclude_item_ids),
    )


def model_ref(msg: pb.ModelRef) -> ModelRef:
    return ModelRef(msg.name, msg.version)


def recommendations(msg: pb.RecommendResponse | pb.RecommendForTextResponse) -> Recommendations:
    items = [RankedItem(i.item_id, i.score, i.predicted_rating, i.rank) for i in msg.items]
    return Recommendations(items, model_ref(msg.model))


def scores(msg: pb.ScoreItemsResponse) -> Scores:
    items = [ScoredItem(i.item_id, i.predicted_rating) for i in msg.items]
    return Scores(items, model_ref(msg.model))


def similar_items(msg: pb.SimilarItemsResponse) -> SimilarItems:
    items = [SimilarItem(i.item_id, i.similarity, i.rank) for i in msg.items]
    return SimilarItems(items, model_ref(msg.model))


def embeddings(msg: pb.EmbedTextResponse) -> Embeddings:
    vectors = np.array([list(e.values) for e in msg.embeddings], dtype=np.float32)
    return Embeddings(vectors.reshape(len(msg.embeddings), msg.dim), model_ref(msg.model))


def model_info(msg: pb.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model=model_ref(msg.model),
        dim=msg.dim,
        user_count=msg.user_count,
        item_count=msg.item_count,
        execution_provider=msg.execution_provider,
        encoder_file=msg.encoder_file,
        max_seq_len=msg.max_seq_len,
        max_k=msg.max_k,
        max_item_ids=msg.max_item_ids,
        max_texts=msg.max_texts,
        max_text_bytes=msg.max_text_bytes,
        created_at=msg.created_at,
        metrics=dict(msg.metrics),
        scoring=dict(msg.scoring),
    )
