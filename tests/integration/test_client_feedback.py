"""The Python clients' feedback calls: RecordFeedback and ForgetUser, blocking and asyncio.

Against the real server with a SQLite feedback store: a cold user's first rating makes them
known (Recommend answers, without the rated item), a resent idempotency key is a duplicate,
and a forgotten user is unknown again. Against a fake server that fails the first attempts:
the shared retry policy (clients/service_config.json) retries both writes on UNAVAILABLE and
RESOURCE_EXHAUSTED, resending the same idempotency key, and never on FAILED_PRECONDITION,
which for these two methods can mean "no feedback store" (a retry could not help).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from server_harness import Reference, ServerProcess, serving

from bertrec.client import (
    AsyncRecommenderClient,
    Feedback,
    FeedbackKind,
    FeedbackRecorded,
    RecommenderClient,
    RecommenderError,
    RetryPolicy,
    UserForgotten,
)
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

Code = grpc.StatusCode
TIMEOUT_S = 10.0
FAST = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.02)  # the bundled codes and attempts


@pytest.fixture(scope="module")
def feedback_server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("feedback") / "feedback.db"
    logs = tmp_path_factory.mktemp("logs")
    with serving(model_repo, logs, "--feedback-store", f"sqlite:///{store}") as proc:
        yield proc


def top_rating(ref: Reference) -> float:
    """The top of the model's rating range (a rating the server accepts)."""
    return float(ref.manifest["scoring"]["rating_range"][1])


def test_a_cold_users_rating_makes_them_known_without_the_rated_item(
    feedback_server: ServerProcess, ref: Reference
) -> None:
    cold, item = "cold-sync", ref.item_ids[3]
    assert cold not in ref.user_ids
    with RecommenderClient(feedback_server.target, timeout_s=TIMEOUT_S) as client:
        with pytest.raises(RecommenderError) as unknown:
            client.recommend(cold, 5)
        assert unknown.value.code == Code.NOT_FOUND

        event = Feedback(cold, item, "rating", rating=top_rating(ref))
        assert client.record_feedback([event]) == FeedbackRecorded(accepted=1, duplicates=0)

        everything_else = len(ref.item_ids) - 1
        got = client.recommend(cold, everything_else)
        assert len(got.items) == everything_else and item not in got.item_ids


def test_a_resent_idempotency_key_is_a_duplicate(
    feedback_server: ServerProcess, ref: Reference
) -> None:
    first = Feedback("dup-user", ref.item_ids[0], FeedbackKind.CLICK, occurred_at=datetime.now(UTC))
    second = Feedback("dup-user", ref.item_ids[1], "purchase")
    with RecommenderClient(feedback_server.target, timeout_s=TIMEOUT_S) as client:
        assert client.record_feedback([first]) == FeedbackRecorded(1, 0)
        # The same object again, and a new event beside it: one stored, one recognised.
        assert client.record_feedback([first, second]) == FeedbackRecorded(1, 1)
        assert client.record_feedback([second, first]) == FeedbackRecorded(0, 2)
        assert client.forget_user("dup-user") == UserForgotten(2, had_model_factors=False)


def test_a_forgotten_user_is_unknown_until_new_feedback(
    feedback_server: ServerProcess, ref: Reference
) -> None:
    trained = ref.user_ids[0]
    item = ref.item_ids[5]
    with RecommenderClient(feedback_server.target, timeout_s=TIMEOUT_S) as client:
        assert client.recommend(trained, 3).items  # known from training
        client.record_feedback([Feedback(trained, item, "skip")])
        assert client.forget_user(trained) == UserForgotten(1, had_model_factors=True)
        with pytest.raises(RecommenderError) as forgotten:
            client.recommend(trained, 3)
        assert forgotten.value.code == Code.NOT_FOUND
        assert client.forget_user(trained).events_deleted == 0  # forgetting again is harmless

        client.record_feedback([Feedback(trained, item, "rating", rating=top_rating(ref))])
        assert item not in client.recommend(trained, 10).item_ids


def test_the_asyncio_client_records_and_forgets(
    feedback_server: ServerProcess, ref: Reference
) -> None:
    cold, item = "cold-aio", ref.item_ids[7]
    event = Feedback(cold, item, "rating", rating=top_rating(ref), occurred_at=1.7e9)

    async def scenario() -> None:
        async with AsyncRecommenderClient(feedback_server.target, timeout_s=TIMEOUT_S) as client:
            assert await client.record_feedback([event]) == FeedbackRecorded(1, 0)
            assert await client.record_feedback([event]) == FeedbackRecorded(0, 1)
            assert item not in (await client.recommend(cold, 10)).item_ids
            assert await client.forget_user(cold) == UserForgotten(1, False)
            with pytest.raises(RecommenderError) as forgotten:
                await client.recommend(cold, 10)
            assert forgotten.value.code == Code.NOT_FOUND

    asyncio.run(scenario())


def test_a_bad_event_rejects_the_whole_batch_by_its_index(
    feedback_server: ServerProcess, ref: Reference
) -> None:
    good = Feedback("batch-user", ref.item_ids[0], "click")
    bad = Feedback("batch-user", "no-such-item", "click")
    with RecommenderClient(feedback_server.target, timeout_s=TIMEOUT_S) as client:
        with pytest.raises(RecommenderError) as raised:
            client.record_feedback([good, bad])
        assert raised.value.code == Code.INVALID_ARGUMENT
        assert "events[1]" in raised.value.details
        # Nothing of it was stored: the good event is new, and the user unknown.
        with pytest.raises(RecommenderError):
            client.recommend("batch-user", 3)
        assert client.record_feedback([good]) == FeedbackRecorded(1, 0)


# --- the retry policy covers the two writes, against a fake server ---------------------------


class FlakyFeedback(pb_grpc.RecommenderServiceServicer):
    """Fails the first `failures` attempts of both writes with `code`, and keeps every request
    it sees; the answer counts keys seen before as duplicates, as the real store does."""

    def __init__(self, code: grpc.StatusCode, failures: int) -> None:
        self.code, self.failures = code, failures
        self.requests: list[pb.RecordFeedbackRequest | pb.ForgetUserRequest] = []
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    def _attempt(self, request: pb.RecordFeedbackRequest | pb.ForgetUserRequest) -> int:
        with self._lock:
            self.requests.append(request)
            return len(self.requests)

    def RecordFeedback(
        self, request: pb.RecordFeedbackRequest, context: grpc.ServicerContext
    ) -> pb.RecordFeedbackResponse:
        attempt = self._attempt(request)
        keys = [e.idempotency_key for e in request.events]
        new = [k for k in keys if k not in self._keys]
        self._keys.update(keys)  # stored, even when the answer is then lost
        if attempt <= self.failures:
            context.abort(self.code, f"attempt {attempt} refused")
        return pb.RecordFeedbackResponse(accepted=len(new), duplicates=len(keys) - len(new))

    def ForgetUser(
        self, request: pb.ForgetUserRequest, context: grpc.ServicerContext
    ) -> pb.ForgetUserResponse:
        attempt = self._attempt(request)
        if attempt <= self.failures:
            context.abort(self.code, f"attempt {attempt} refused")
        return pb.ForgetUserResponse(events_deleted=attempt)


@pytest.fixture
def flaky(request: pytest.FixtureRequest) -> Iterator[tuple[str, FlakyFeedback]]:
    code, failures = request.param
    servicer = FlakyFeedback(code, failures)
    server = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_RecommenderServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


RETRIED = [(Code.UNAVAILABLE, 2), (Code.RESOURCE_EXHAUSTED, 2)]


@pytest.mark.parametrize("flaky", RETRIED, indirect=True, ids=lambda p: p[0].name)
def test_record_feedback_is_retried_with_the_same_keys(flaky: tuple[str, FlakyFeedback]) -> None:
    target, servicer = flaky
    events = [
        Feedback("u1", "i1", "rating", rating=4.5, occurred_at=datetime(2026, 1, 2, tzinfo=UTC)),
        Feedback("u1", "i2", FeedbackKind.SKIP, idempotency_key="fixed-key", occurred_at=12.25),
    ]
    with RecommenderClient(target, timeout_s=TIMEOUT_S, retry=FAST) as client:
        # The first attempt stored both keys and its answer was lost: the retry finds them.
        assert client.record_feedback(events) == FeedbackRecorded(accepted=0, duplicates=2)
    assert len(servicer.requests) == 3
    assert all(r == servicer.requests[0] for r in servicer.requests)
    rating, skip = servicer.requests[0].events
    assert (rating.user_id, rating.item_id, rating.kind) == ("u1", "i1", pb.FEEDBACK_KIND_RATING)
    assert rating.rating == 4.5 and rating.occurred_at.seconds == 1767312000
    assert uuid.UUID(rating.idempotency_key).version == 4  # made by the client
    assert (skip.kind, skip.rating, skip.idempotency_key) == (pb.FEEDBACK_KIND_SKIP, 0, "fixed-key")
    assert (skip.occurred_at.seconds, skip.occurred_at.nanos) == (12, 250_000_000)


@pytest.mark.parametrize("flaky", RETRIED, indirect=True, ids=lambda p: p[0].name)
def test_the_asyncio_client_retries_both_writes(flaky: tuple[str, FlakyFeedback]) -> None:
    target, servicer = flaky

    async def calls() -> tuple[FeedbackRecorded, UserForgotten]:
        async with AsyncRecommenderClient(target, timeout_s=TIMEOUT_S, retry=FAST) as client:
            recorded = await client.record_feedback([Feedback("u1", "i1", "click")])
            return recorded, await client.forget_user("u1")

    recorded, forgotten = asyncio.run(calls())
    assert recorded == FeedbackRecorded(accepted=0, duplicates=1)
    assert forgotten == UserForgotten(events_deleted=4, had_model_factors=False)
    assert len(servicer.requests) == 4  # 3 attempts of the first call, 1 of the second


@pytest.mark.parametrize("flaky", [(Code.UNAVAILABLE, 2)], indirect=True)
def test_forget_user_is_retried(flaky: tuple[str, FlakyFeedback]) -> None:
    target, servicer = flaky
    with RecommenderClient(target, timeout_s=TIMEOUT_S, retry=FAST) as client:
        assert client.forget_user("u9").events_deleted == 3
    assert [r.user_id for r in servicer.requests] == ["u9"] * 3


@pytest.mark.parametrize(
    "flaky",
    [(Code.FAILED_PRECONDITION, 9), (Code.INVALID_ARGUMENT, 9), (Code.INTERNAL, 9)],
    indirect=True,
    ids=lambda p: p[0].name,
)
def test_other_failures_of_the_writes_are_raised_after_one_attempt(
    flaky: tuple[str, FlakyFeedback],
) -> None:
    target, servicer = flaky
    with RecommenderClient(target, timeout_s=TIMEOUT_S, retry=FAST) as client:
        with pytest.raises(RecommenderError) as raised:
            client.record_feedback([Feedback("u1", "i1", "click")])
        assert "attempt 1 refused" in raised.value.details
        with pytest.raises(RecommenderError):
            client.forget_user("u1")
    assert len(servicer.requests) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "like"}, "unknown feedback kind"),
        ({"kind": "rating"}, "needs a rating"),
        ({"kind": "click", "rating": 3.0}, "has no rating"),
        ({"kind": "click", "occurred_at": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"kind": "click", "idempotency_key": ""}, "empty idempotency_key"),
    ],
)
def test_malformed_events_are_refused_before_sending(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Feedback("u1", "i1", **kwargs)
