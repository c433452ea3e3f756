"""Blocking client for bertrec.v1.RecommenderService."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
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


class RecommenderClient:
    """A connection to one bertrec server. Every method takes an optional per-call deadline.

    Args:
        target: "host:port".
        timeout_s: default deadline of each call (one deadline covers all its attempts).
        retry: changes to the bundled retry policy (`bertrec.client.retry`: UNAVAILABLE,
            RESOURCE_EXHAUSTED and FAILED_PRECONDITION, up to 5 attempts; the feedback writes
            without FAILED_PRECONDITION), which gRPC applies.
        channel: use this channel instead of opening one to `target`; it retries only if
            built with `channel_options()` (then `retry`, `tls`, the client certificate,
            `server_name` and `options` are not used; `token` still is).
        tls: None for plaintext, True to trust the system's root certificates, or the CA to
            trust (a PEM file's path or its bytes).
        client_cert, client_key: this client's certificate and key for mTLS (paths or bytes).
        token: bearer token sent with every call (`authorization: Bearer ...`); refused over
            plaintext unless the target is loopback. Never shown in a repr or an error.
        server_name: the name the server's certificate must carry, when it is not the
            target's host (e.g. an IP target and a certificate for a DNS name).
        options: more gRPC channel options, applied last.

    Raises (every call):
        RecommenderError: the call failed; `.code` is the gRPC status (UNAUTHENTICATED: no or
            a wrong token; PERMISSION_DENIED: the token lacks the method's role; UNAVAILABLE:
            also a TLS handshake that failed, e.g. an untrusted server certificate).
    Raises (here):
        ValueError: inconsistent security arguments (see `bertrec.client.security`).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 5.0,
        retry: t.RetryPolicy | None = None,
        channel: grpc.Channel | None = None,
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
                grpc.insecure_channel(target, options=opts)
                if credentials is None
                else grpc.secure_channel(target, credentials, options=opts)
            )
        self._channel = channel
        self._stub = pb_grpc.RecommenderServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"RecommenderClient({self._repr})"

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def recommend(
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
        return t.recommendations(self._invoke(self._stub.Recommend, request, timeout_s))

    def recommend_batch(
        self,
        user_ids: Sequence[str],
        k: int = 10,
        *,
        exclude_rated: bool = True,
        timeout_s: float | None = None,
    ) -> list[t.UserRecommendations]:
        """Top-k items for each user (at most the server's max_batch_users, 1024 by default),
        in order; unknown users come back with `found=False` instead of failing the call."""
        request = t.bulk_request(user_ids, k, exclude_rated)
        response = self._invoke(self._stub.RecommendBatch, request, timeout_s)
        return list(t.user_recommendations(response))

    def stream_recommendations(
        self,
        user_ids: Sequence[str],
        k: int = 10,
        *,
        exclude_rated: bool = True,
        timeout_s: float | None = None,
    ) -> Iterator[t.UserRecommendations]:
        """`recommend_batch` for long lists (up to max_stream_users), read as they are ranked.

        The server works only as far ahead as this iterator is read; closing it (or leaving
        the loop) cancels the call and the server's queued work. `timeout_s` bounds the
        whole stream.
        """
        request = t.stream_request(user_ids, k, exclude_rated)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        metadata = None if self._token is None else self._token.metadata
        call = self._stub.StreamRecommendations(request, timeout=timeout, metadata=metadata)
        try:
            for message in call:
                yield from t.user_recommendations(message)
        except grpc.RpcError as error:
            raise t.RecommenderError.of(error) from error
        finally:
            call.cancel()

    def recommend_for_text(
        self, text: str, k: int = 10, *, explain: bool = False, timeout_s: float | None = None
    ) -> t.Recommendations:
        """Top-k items for free text; `explain` as in `recommend` (no rated items here)."""
        request = pb.RecommendForTextRequest(text=text, k=k, explain=explain)
        return t.recommendations(self._invoke(self._stub.RecommendForText, request, timeout_s))

    def score_items(
        self, user_id: str, item_ids: Sequence[str], *, timeout_s: float | None = None
    ) -> t.Scores:
        """Predicted ratings of a user for items, in the given order."""
        request = pb.ScoreItemsRequest(user_id=user_id, item_ids=list(item_ids))
        return t.scores(self._invoke(self._stub.ScoreItems, request, timeout_s))

    def similar_items(
        self, item_id: str, k: int = 10, *, timeout_s: float | None = None
    ) -> t.SimilarItems:
        """The k nearest items by factor cosine."""
        request = pb.SimilarItemsRequest(item_id=item_id, k=k)
        return t.similar_items(self._invoke(self._stub.SimilarItems, request, timeout_s))

    def embed_text(self, texts: Sequence[str], *, timeout_s: float | None = None) -> t.Embeddings:
        """Encoder vectors, one row per text."""
        request = pb.EmbedTextRequest(texts=list(texts))
        return t.embeddings(self._invoke(self._stub.EmbedText, request, timeout_s))

    def model_info(self, *, timeout_s: float | None = None) -> t.ModelInfo:
        """The served model and the server's request limits."""
        request = pb.GetModelInfoRequest()
        return t.model_info(self._invoke(self._stub.GetModelInfo, request, timeout_s))

    def record_feedback(
        self, events: Sequence[fb.Feedback], *, timeout_s: float | None = None
    ) -> fb.FeedbackRecorded:
        """Store users' reactions durably, all or none; each user's next `recommend` reflects
        them. Events whose idempotency key the store holds already count as duplicates, so
        sending the same `Feedback` objects again is safe.

        Raises:
            RecommenderError: INVALID_ARGUMENT naming `events[i]` (nothing stored),
                FAILED_PRECONDITION when the server has no feedback store.
        """
        request = fb.record_feedback_request(events)
        return fb.recorded(self._invoke(self._stub.RecordFeedback, request, timeout_s))

    def forget_user(self, user_id: str, *, timeout_s: float | None = None) -> fb.UserForgotten:
        """Delete a user's stored feedback and folded vector; they are unknown (NOT_FOUND)
        until they send feedback again. Forgetting an unknown user is not an error."""
        request = pb.ForgetUserRequest(user_id=user_id)
        return fb.forgotten(self._invoke(self._stub.ForgetUser, request, timeout_s))

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The grpc.health.v1 status name, e.g. "SERVING" or "NOT_SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._invoke(self._health.Check, request, timeout_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_until_serving(self, timeout_s: float = 60.0, poll_s: float = 0.05) -> None:
        """Poll health until SERVING.

        Raises:
            RecommenderError: DEADLINE_EXCEEDED after `timeout_s`, naming the last answer seen
                (e.g. NOT_SERVING, or UNAVAILABLE with "Connection refused").
        """
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while (left := deadline - time.monotonic()) > 0:
            try:
                last = self.health(timeout_s=min(1.0, left))
                if last == "SERVING":
                    return
            except t.RecommenderError as exc:
                last = str(exc)  # not up yet: a refused connection or a check that timed out
            time.sleep(max(min(poll_s, deadline - time.monotonic()), 0.0))
        raise t.RecommenderError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"not SERVING after {timeout_s:g} s (last: {last})"
        )

    def _invoke(self, rpc: Callable[..., R], request: Any, timeout_s: float | None) -> R:
        try:
            timeout = self.timeout_s if timeout_s is None else timeout_s
            metadata = None if self._token is None else self._token.metadata
            return rpc(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise t.RecommenderError.of(error) from error
