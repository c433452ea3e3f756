"""The gRPC servicer: proto in, typed call to the `Recommender`, proto out.

Methods stay thin: errors raised below are turned into status codes by the interceptor
(`interceptor.py`). Each call takes a lease on one model version at entry (FAILED_PRECONDITION
until the model is loaded and warmed up) and finishes on it, even if a new version is swapped
in meanwhile. A call may name its version in the `bertrec-model-version` metadata (where the
version policy keeps several loaded); otherwise the serving version answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from typing import Any

import grpc
import numpy as np

from bertrec.explanation import ExplainedItem, Explanation
from bertrec.results import ModelRef, Recommendations
from bertrec.server import errors
from bertrec.server.bulk import BulkRanking, UserResult, check_user_ids
from bertrec.server.config import ServerConfig
from bertrec.server.engine import Call, RankedRows, Recommender, wait
from bertrec.server.errors import InvalidArgument, NotFound
from bertrec.server.feedback import Feedback
from bertrec.server.feedback_events import checked_events
from bertrec.server.model_slot import Lease
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

VERSION_METADATA = "bertrec-model-version"  # a call's version, where the policy keeps several


class RecommenderServicer(pb_grpc.RecommenderServiceServicer):
    """bertrec.v1.RecommenderService over a `Recommender`.

    Args:
        lease: a lease on the serving (or a named) version's `Recommender`; raises
            `NotReady` before the model is loaded, `NotFound` for a version not loaded.
        config: the request limits and the deadline for calls that set none.
        feedback: the feedback store's owner (RecordFeedback, ForgetUser).
    """

    def __init__(
        self,
        lease: Callable[[int | None], Lease[Recommender]],
        config: ServerConfig,
        feedback: Feedback,
    ) -> None:
        self._lease = lease
        self._config = config
        self._timeout_s = config.request_timeout_s
        self._feedback = feedback

    def Recommend(
        self, request: pb.RecommendRequest, context: grpc.ServicerContext
    ) -> pb.RecommendResponse | bytes:
        exclude_rated = request.exclude_rated if request.HasField("exclude_rated") else True
        include, exclude = list(request.include_item_ids), list(request.exclude_item_ids)
        with self._leased(context, request.model) as lease:
            rec, call = lease.value, self._call(context)
            pending = rec.submit_recommend(
                request.user_id, request.k, exclude_rated, include, exclude, call.deadline_s,
                request.explain, wire=True,
            )  # fmt: skip
            ranked = wait(pending.future, call)
            if ranked.wire is not None:  # encoded with the rest of its batch (`server.wire`)
                return ranked.wire
            if request.explain:
                result = rec.ranked(pending, ranked)
                return pb.RecommendResponse(
                    items=ranked_items(result), model=model_ref(result.model)
                )
            # Without explanations, straight from the arrays: no object per item.
            return recommend_response(rec.ranked_rows(pending, ranked))

    def RecommendBatch(
        self, request: pb.RecommendBatchRequest, context: grpc.ServicerContext
    ) -> pb.RecommendBatchResponse:
        with self._leased(context, request.model) as lease:
            rec, c = lease.value, self._config
            bulk = self._bulk(rec, request, context, c.max_batch_users, "max_batch_users")
            response = pb.RecommendBatchResponse(model=model_ref(rec.ref))
            for chunk in bulk.chunks():
                add_user_results(response.results, chunk, rec.model.item_ids_of)
        return response

    def StreamRecommendations(
        self, request: pb.StreamRecommendationsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StreamRecommendationsResponse]:
        with self._leased(context, request.model) as lease:
            rec, c = lease.value, self._config
            bulk = self._bulk(rec, request, context, c.max_stream_users, "max_stream_users")
            ref, ids_of = model_ref(rec.ref), rec.model.item_ids_of
            with closing(bulk.chunks()) as chunks:  # a closed stream withdraws queued work
                for chunk in chunks:
                    message = pb.StreamRecommendationsResponse(model=ref)
                    add_user_results(message.results, chunk, ids_of)
                    yield message

    def RecommendForText(
        self, request: pb.RecommendForTextRequest, context: grpc.ServicerContext
    ) -> pb.RecommendForTextResponse:
        with self._leased(context, request.model) as lease:
            result = lease.value.recommend_for_text(
                request.text, request.k, self._call(context), request.explain
            )
        return pb.RecommendForTextResponse(
            items=ranked_items(result), model=model_ref(result.model)
        )

    def ScoreItems(
        self, request: pb.ScoreItemsRequest, context: grpc.ServicerContext
    ) -> pb.ScoreItemsResponse:
        with self._leased(context, request.model) as lease:
            result = lease.value.score_items(
                request.user_id, list(request.item_ids), self._call(context)
            )
        items = [pb.ScoredItem(item_id=i.item_id, predicted_rating=i.predicted_rating)
                 for i in result.items]  # fmt: skip
        return pb.ScoreItemsResponse(items=items, model=model_ref(result.model))

    def SimilarItems(
        self, request: pb.SimilarItemsRequest, context: grpc.ServicerContext
    ) -> pb.SimilarItemsResponse:
        with self._leased(context, request.model) as lease:
            result = lease.value.similar_items(request.item_id, request.k, self._call(context))
        items = [pb.SimilarItem(item_id=i.item_id, similarity=i.similarity, rank=i.rank)
                 for i in result.items]  # fmt: skip
        return pb.SimilarItemsResponse(items=items, model=model_ref(result.model))

    def EmbedText(
        self, request: pb.EmbedTextRequest, context: grpc.ServicerContext
    ) -> pb.EmbedTextResponse:
        with self._leased(context, request.model) as lease:
            result = lease.value.embed_text(list(request.texts), self._call(context))
        embeddings = [pb.Embedding(values=v) for v in result.vectors.tolist()]
        return pb.EmbedTextResponse(
            embeddings=embeddings, dim=result.vectors.shape[1], model=model_ref(result.model)
        )

    def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetModelInfoResponse:
        with self._leased(context, request.model) as lease:
            info = lease.value.info()
        return pb.GetModelInfoResponse(
            model=model_ref(info.model),
            dim=info.dim,
            user_count=info.user_count,
            item_count=info.item_count,
            execution_provider=info.execution_provider,
            encoder_file=info.encoder_file,
            max_seq_len=info.max_seq_len,
            metrics=info.metrics,
            scoring=info.scoring,
            max_k=info.max_k,
            max_item_ids=info.max_item_ids,
            max_texts=info.max_texts,
            max_text_bytes=info.max_text_bytes,
            created_at=info.created_at,
        )

    def RecordFeedback(
        self, request: pb.RecordFeedbackRequest, context: grpc.ServicerContext
    ) -> pb.RecordFeedbackResponse:
        c = self._config
        with self._lease(None) as lease:
            try:
                events = checked_events(
                    request.events, lease.value.model, c.max_feedback_events,
                    c.feedback_max_clock_skew_s, time.time(),
                )  # fmt: skip
            except InvalidArgument:
                self._feedback.rejected()
                raise
        accepted, duplicates = self._feedback.record(events, self._remaining(context))
        return pb.RecordFeedbackResponse(accepted=accepted, duplicates=duplicates)

    def ForgetUser(
        self, request: pb.ForgetUserRequest, context: grpc.ServicerContext
    ) -> pb.ForgetUserResponse:
        if not request.user_id:
            raise InvalidArgument("user_id is empty", "user_id", errors.EMPTY)
        erased, had_factors = self._feedback.forget(request.user_id, self._remaining(context))
        return pb.ForgetUserResponse(
            events_deleted=erased.events_deleted, had_model_factors=had_factors
        )

    def _bulk(
        self,
        rec: Recommender,
        request: pb.RecommendBatchRequest | pb.StreamRecommendationsRequest,
        context: grpc.ServicerContext,
        limit: int,
        limit_name: str,
    ) -> BulkRanking:
        """The ranking of a bulk request's users, validated as Recommend validates one."""
        k = rec.resolve_k(request.k)
        user_ids = list(request.user_ids)
        check_user_ids(user_ids, limit, limit_name)
        exclude_rated = request.exclude_rated if request.HasField("exclude_rated") else True
        c = self._config
        # Two chunks are in flight at once; both must fit the ranker's queue.
        chunk = min(c.ranker_max_batch_size, max(1, c.ranker_max_queue_size // 2))
        return BulkRanking(rec, user_ids, k, exclude_rated, self._call(context), chunk)

    def _remaining(self, context: grpc.ServicerContext) -> float:
        return max(self._call(context).deadline_s - time.monotonic(), 0.001)

    def _call(self, context: grpc.ServicerContext) -> Call:
        return Call.from_context(context, self._timeout_s)

    def _leased(self, context: grpc.ServicerContext, wanted: pb.ModelRef) -> Lease[Recommender]:
        """The call's lease: on the version the request's `model` or the `bertrec-model-version`
        metadata names, else the serving one. The call runs to its end on it, whatever is
        swapped in meanwhile."""
        version = wanted.version or None
        for key, value in context.invocation_metadata() or ():
            if key == VERSION_METADATA:
                if not isinstance(value, str) or not value.isascii() or not value.isdigit():
                    raise InvalidArgument(
                        f"{VERSION_METADATA} must be a version number", VERSION_METADATA
                    )
                named = int(value[:19])
                if version is not None and named != version:
                    raise InvalidArgument(
                        f"model.version {version} and {VERSION_METADATA} {named} disagree"
                    )
                version = named
        if version is not None and version < 0:
            raise InvalidArgument(
                f"model.version must be positive, got {version}", "model.version",
                errors.OUT_OF_RANGE,
            )  # fmt: skip
        lease = self._lease(version)
        if wanted.name and wanted.name != lease.value.model.name:
            lease.release()
            raise NotFound(
                f"model {wanted.name!r} is not served here", "model.name", errors.UNKNOWN_MODEL
            )
        return lease


def model_ref(ref: ModelRef) -> pb.ModelRef:
    return pb.ModelRef(name=ref.name, version=ref.version)


def recommend_response(rows: RankedRows) -> pb.RecommendResponse:
    """A RecommendResponse straight from the ranked arrays (`add_ranked`)."""
    response = pb.RecommendResponse(model=model_ref(rows.model))
    add_ranked(response.items, rows.item_ids, rows.scores, rows.ratings)
    return response


def ranked_items(result: Recommendations) -> list[pb.RankedItem]:
    return [
        pb.RankedItem(
            item_id=i.item_id,
            score=i.score,
            predicted_rating=i.predicted_rating,
            rank=i.rank,
            explanation=explanation_pb(i.explanation) if isinstance(i, ExplainedItem) else None,
        )
        for i in result.items
    ]


def add_user_results(
    field: Any, chunk: Sequence[UserResult], item_ids_of: Callable[[np.ndarray], list[str]]
) -> None:
    """Append bulk results to a repeated `UserRecommendations` field, straight from the ranked
    arrays (`add_ranked`), with every id of the chunk gathered at once (`Model.item_ids_of`)."""
    sizes = [len(one.rows) for one in chunk]
    ids = item_ids_of(np.concatenate([one.rows for one in chunk])) if chunk else []
    start = 0
    for one, size in zip(chunk, sizes, strict=True):
        items = field.add(user_id=one.user_id, found=one.found).items
        add_ranked(items, ids[start : start + size], one.scores, one.ratings)
        start += size


def add_ranked(
    field: Any, item_ids: Sequence[str], scores: np.ndarray, ratings: np.ndarray
) -> None:
    """Append ranked items to a repeated `RankedItem` field, built in place (a message passed
    to a constructor is copied), from the arrays: no object per item on the way."""
    add = field.add
    for rank, (item_id, score, rating) in enumerate(
        zip(item_ids, scores.tolist(), ratings.tolist(), strict=True), start=1
    ):
        add(item_id=item_id, score=score, predicted_rating=rating, rank=rank)


def explanation_pb(e: Explanation | None) -> pb.Explanation | None:
    if e is None:
        return None
    contributions = [pb.Contribution(item_id=c.item_id, contribution=c.contribution)
                     for c in e.contributions]  # fmt: skip
    return pb.Explanation(
        bias_part=e.bias_part,
        collaborative_part=e.collaborative_part,
        text_part=e.text_part,
        contributions=contributions,
        contributions_total=e.contributions_total,
    )
