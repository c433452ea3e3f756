"""Typed results of the bertrec API, and their conversion from the protobuf messages."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from bertrec.client.retry import RetryPolicy  # re-exported: it lived here before
from bertrec.explanation import Contribution, ExplainedItem, Explanation
from bertrec.results import (
    Embeddings,
    ModelInfo,
    ModelRef,
    RankedItem,
    Recommendations,
    ScoredItem,
    Scores,
    SimilarItem,
    SimilarItems,
)
from bertrec.v1 import recommender_pb2 as pb

__all__ = [
    "Contribution",
    "Embeddings",
    "ExplainedItem",
    "Explanation",
    "ModelInfo",
    "ModelRef",
    "RankedItem",
    "Recommendations",
    "RecommenderError",
    "RetryPolicy",
    "ScoredItem",
    "Scores",
    "SimilarItem",
    "SimilarItems",
    "UserRecommendations",
]


class RecommenderError(Exception):
    """A failed call: the gRPC status `code` and the server's `details` message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def of(cls, error: grpc.RpcError) -> RecommenderError:
        """The error of a failed grpc call (its code and details)."""
        code: grpc.StatusCode = error.code()
        return cls(code, error.details() or "")


def recommend_request(
    user_id: str,
    k: int,
    exclude_rated: bool,
    include_item_ids: Sequence[str],
    exclude_item_ids: Sequence[str],
    explain: bool = False,
) -> pb.RecommendRequest:
    return pb.RecommendRequest(
        explain=explain,
        user_id=user_id,
        k=k,
        exclude_rated=exclude_rated,
        include_item_ids=list(include_item_ids),
        exclude_item_ids=list(exclude_item_ids),
    )


def model_ref(msg: pb.ModelRef) -> ModelRef:
    return ModelRef(msg.name, msg.version)


def recommendations(msg: pb.RecommendResponse | pb.RecommendForTextResponse) -> Recommendations:
    """Ranked items; `ExplainedItem`s (with `.explanation`) where the server explained them."""
    items = [
        ExplainedItem(i.item_id, i.score, i.predicted_rating, i.rank, explanation(i.explanation))
        if i.HasField("explanation")
        else RankedItem(i.item_id, i.score, i.predicted_rating, i.rank)
        for i in msg.items
    ]
    return Recommendations(items, model_ref(msg.model))


def explanation(msg: pb.Explanation) -> Explanation:
    contributions = tuple(Contribution(c.item_id, c.contribution) for c in msg.contributions)
    total = msg.contributions_total if msg.HasField("contributions_total") else None
    return Explanation(msg.bias_part, msg.collaborative_part, msg.text_part, contributions, total)


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


@dataclass(frozen=True)
class UserRecommendations:
    """One user's top-k items from `recommend_batch` or `stream_recommendations`.

    `found` is False (and `items` empty) for a user the model does not know, never seen or
    forgotten: bulk jobs get an answer for every id instead of failing on the first stranger.
    """

    user_id: str
    found: bool
    items: tuple[RankedItem, ...]
    model: ModelRef

    @property
    def item_ids(self) -> list[str]:
        return [i.item_id for i in self.items]


def bulk_request(user_ids: Sequence[str], k: int, exclude_rated: bool) -> pb.RecommendBatchRequest:
    return pb.RecommendBatchRequest(user_ids=list(user_ids), k=k, exclude_rated=exclude_rated)


def stream_request(
    user_ids: Sequence[str], k: int, exclude_rated: bool
) -> pb.StreamRecommendationsRequest:
    return pb.StreamRecommendationsRequest(
        user_ids=list(user_ids), k=k, exclude_rated=exclude_rated
    )


def user_recommendations(
    msg: pb.RecommendBatchResponse | pb.StreamRecommendationsResponse,
) -> Iterator[UserRecommendations]:
    """The users of one bulk response (or stream message), in the request's order."""
    ref = model_ref(msg.model)
    for one in msg.results:
        items = tuple(RankedItem(i.item_id, i.score, i.predicted_rating, i.rank) for i in one.items)
        yield UserRecommendations(one.user_id, one.found, items, ref)
