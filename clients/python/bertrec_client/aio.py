"""asyncio client for bertrec.v1.RecommenderService (grpc.aio); mirrors `RecommenderClient`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bertrec.client import feedback as fb
from bertrec.client import security as sec
from bertrec.client import types as t
from bertrec.client.retry import channel_options
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

R = TypeVar("R")


class AsyncRecommenderClient:
    """A grpc.aio connection to one bertrec server; see `RecommenderClient` for the methods.

    Create it inside a running event loop; `async with` closes the channel. The security
    arguments (`tls`, `client_cert`, `client_key`, `token`, `server_name`, `options`) are
    those of `RecommenderClient`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 5.0,
        retry: t.RetryPolicy | None = None,
        channel: grpc.aio.Channel | None = None,
        tls: bool | sec.PemSource | None = None,
        client_cert: sec.PemSource | None = None,
        client_key: sec.PemSource | None = None,
        token: str | sec.BearerToken | None = None,
        server_name: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.retry = (retry or t.RetryPolicy()).resolved()
        self._token = sec.as_token(token)
        self._repr = sec.describe(target, tls, client_cert, self._token)
        if channel is None:
            credentials, opts = sec.channel_arguments(
                target, channel_options(retry), tls, client_cert, client_key, self._token,
                server_name, options,
            )  # fmt: skip
            channel = (
                grpc.aio.insecure_channel(target, options=opts)
                if credentials is None
                else grpc.aio.secure_channel(target, credentials, options=opts)
            )
        self._channel = channel
        self._stub = pb_grpc.RecommenderServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"AsyncRecommenderClient({self._repr})"

    async def __aenter__(self) -> AsyncRecommenderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def recommend(
        self,
        user_id: str,
        k: int = 10,
        *,
        exclude_rated: bool = True,
        include_item_ids: Sequence[str] = (),
        exclude_item_ids: Sequence[str] = (),
        explain: bool = False,
        timeout_s: float | None = None,
    ) -> t.Recommendations:
        """Top-k items for a known user; with `explain`, each is an `ExplainedItem` whose
        `.explanation` splits its score (bias, collaborative, text) and names the rated
        items that contributed most."""
        request = t.recommend_request(
            user_id, k, exclude_rated, include_item_ids, exclude_item_ids, explain
        )
        return t.recommendations(await self._invoke(self._stub.Recommend, request, timeout_s))

    async def recommend_batch(
        self,
        user_ids: Sequence[str],
        k: int = 10,
        *,
        exclude_rated: bool = True,
        timeout_s: float | None = None,
    ) -> list[t.UserRecommendations]:
        """Top-k items for each user, in order; unknown users have `found=False`."""
        request = t.bulk_request(user_ids, k, exclude_rated)
        response = await self._invoke(self._stub.RecommendBatch, request, timeout_s)
        return list(t.user_recommendations(response))

    async def stream_recommendations(
        self,
        user_ids: Sequence[str],
        k: int = 10,
        *,
        exclude_rated: bool = True,
        timeout_s: float | None = None,
    ) -> AsyncIterator[t.UserRecommendations]:
        """`recommend_batch` for long lists, as an async iterator paced by its reader;
        leaving it early cancels the call."""
        request = t.stream_request(user_ids, k, exclude_rated)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        metadata = None if self._token is None else self._token.metadata
        call = self._stub.StreamRecommendations(request, timeout=timeout, metadata=metadata)
        try:
            async for message in call:
                for one in t.user_recommendations(message):
                    yield one
        except grpc.RpcError as error:
            raise t.RecommenderError.of(error) from error
        finally:
            call.cancel()

    async def recommend_for_text(
        self, text: str, k: int = 10, *, explain: bool = False, timeout_s: float | None = None
    ) -> t.Recommendations:
        """Top-k items for free text; `explain` as in `recommend` (no rated items here)."""
        request = pb.RecommendForTextRequest(text=text, k=k, explain=explain)
        response = await self._invoke(self._stub.RecommendForText, request, timeout_s)
        return t.recommendations(response)

    async def score_items(
        self, user_id: str, item_ids: Sequence[str], *, timeout_s: float | None = None
    ) -> t.Scores:
        """Predicted ratings of a user for items, in the given order."""
        request = pb.ScoreItemsRequest(user_id=user_id, item_ids=list(item_ids))
        return t.scores(await self._invoke(self._stub.ScoreItems, request, timeout_s))

    async def similar_items(
        self, item_id: str, k: int = 10, *, timeout_s: float | None = None
    ) -> t.SimilarItems:
        """The k nearest items by factor cosine."""
        request = pb.SimilarItemsRequest(item_id=item_id, k=k)
        return t.similar_items(await self._invoke(self._stub.SimilarItems, request, timeout_s))

    async def embed_text(
        self, texts: Sequence[str], *, timeout_s: float | None = None
    ) -> t.Embeddings:
        """Encoder vectors, one row per text."""
        request = pb.EmbedTextRequest(texts=list(texts))
        return t.embeddings(await self._invoke(self._stub.EmbedText, request, timeout_s))

    async def model_info(self, *, timeout_s: float | None = None) -> t.ModelInfo:
        """The served model and the server's request limits."""
        request = pb.GetModelInfoRequest()
        return t.model_info(await self._invoke(self._stub.GetModelInfo, request, timeout_s))

    async def record_feedback(
        self, events: Sequence[fb.Feedback], *, timeout_s: float | None = None
    ) -> fb.FeedbackRecorded:
        """Store users' reactions durably, all or none (see `RecommenderClient`)."""
        request = fb.record_feedback_request(events)
        return fb.recorded(await self._invoke(self._stub.RecordFeedback, request, timeout_s))

    async def forget_user(
        self, user_id: str, *, timeout_s: float | None = None
    ) -> fb.UserForgotten:
        """Delete a user's stored feedback and folded vector (see `RecommenderClient`)."""
        request = pb.ForgetUserRequest(user_id=user_id)
        return fb.forgotten(await self._invoke(self._stub.ForgetUser, request, timeout_s))

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The grpc.health.v1 status name, e.g. "SERVING" or "NOT_SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._invoke(self._health.Check, request, timeout_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def _invoke(
        self, rpc: Callable[..., Awaitable[R]], request: Any, timeout_s: float | None
    ) -> R:
        try:
            timeout = self.timeout_s if timeout_s is None else timeout_s
            metadata = None if self._token is None else self._token.metadata
            return await rpc(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise t.RecommenderError.of(error) from error
