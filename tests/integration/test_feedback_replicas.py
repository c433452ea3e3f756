"""Two bertrec servers sharing one store see each other's feedback and forgets.

The store is Redis (replicas), or one SQLite file, which is what the worker processes of one
`bertrec serve --workers N` share: two processes on one file, each with its own writer.

Replica A records feedback (or forgets a user); replica B, which never received the call,
must answer exactly as A does once its follower has read the store. B is polled until it
does, failing after REFLECT_TIMEOUT_S; the delay it took is printed for the record (its size
is bench material, never asserted here).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from redis_harness import RedisServer, need_redis_server, redis_server
from server_harness import Reference, ServerProcess, start_server

from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

Code = grpc.StatusCode
REFLECT_TIMEOUT_S = 10.0
TIMEOUT_S = 10.0
K = 6
KNOWN = "u0003"
COLD = "replica-cold-user-7d1e52b0a8c94f63"


class Replica:
    """One server of the pair and a stub on it."""

    def __init__(self, name: str, server: ServerProcess) -> None:
        self.name, self.server = name, server
        self.channel = grpc.insecure_channel(server.target)
        self.stub = pb_grpc.RecommenderServiceStub(self.channel)

    def recommend(self, user: str) -> list[tuple[str, float]] | Code:
        """The user's top K (item, score), or the status code of a failed call."""
        try:
            response = self.stub.Recommend(
                pb.RecommendRequest(user_id=user, k=K), timeout=TIMEOUT_S
            )
        except grpc.RpcError as exc:
            return exc.code()
        return [(i.item_id, i.score) for i in response.items]

    def record(self, *events: pb.FeedbackEvent) -> None:
        assert self.record_code(*events) == Code.OK

    def record_code(self, *events: pb.FeedbackEvent) -> Code:
        """OK once all events were stored as new ones, else the call's status code."""
        try:
            response = self.stub.RecordFeedback(
                pb.RecordFeedbackRequest(events=events), timeout=TIMEOUT_S
            )
        except grpc.RpcError as exc:
            return exc.code()
        assert (response.accepted, response.duplicates) == (len(events), 0)
        return Code.OK

    def forget(self, user: str) -> None:
        self.stub.ForgetUser(pb.ForgetUserRequest(user_id=user), timeout=TIMEOUT_S)


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, RedisServer | None]]:
    """The shared store's URL, and its Redis server where it is one."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path_factory.mktemp('sqlite') / 'feedback.db'}", None
        return
    need_redis_server()
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url, server


@pytest.fixture(scope="module")
def replicas(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, store: tuple[str, object]
) -> Iterator[tuple[Replica, Replica]]:
    flags = ("--feedback-store", store[0], "--feedback-poll-interval-s", "0.05")
    logs = tmp_path_factory.mktemp("replica-logs")
    servers = [start_server(model_repo, logs, *flags) for _ in range(2)]
    try:
        for server in servers:
            server.wait_serving()
        yield Replica("A", servers[0]), Replica("B", servers[1])
    finally:
        for server in servers:
            assert server.terminate() == 0, server.stderr()[-3000:]


def event(user: str, item: str, kind: int, rating: float = 0.0) -> pb.FeedbackEvent:
    return pb.FeedbackEvent(
        user_id=user, item_id=item, kind=kind, rating=rating, idempotency_key=uuid.uuid4().hex
    )


def wait_reflected(
    replica: Replica, condition: Callable[[], bool], what: str, since: float
) -> float:
    """Seconds from `since` (the other replica's answer) until `condition` holds on `replica`."""
    while not condition():
        if time.monotonic() - since > REFLECT_TIMEOUT_S:
            raise AssertionError(
                f"replica {replica.name} never reflected {what} in {REFLECT_TIMEOUT_S} s"
            )
        time.sleep(0.005)
    delay = time.monotonic() - since
    print(f"replica {replica.name} reflected {what} after {delay * 1000:.0f} ms")
    return delay


def test_feedback_on_a_is_reflected_on_b(replicas: tuple[Replica, Replica], ref: Reference) -> None:
    a, b = replicas
    assert a.recommend(COLD) == b.recommend(COLD) == Code.NOT_FOUND
    before = a.recommend(KNOWN)
    assert before == b.recommend(KNOWN) and isinstance(before, list)
    liked = before[0][0]
    a.record(
        event(KNOWN, liked, pb.FEEDBACK_KIND_RATING, 5.0),
        event(COLD, ref.item_ids[4], pb.FEEDBACK_KIND_RATING, 4.0),
        event(COLD, ref.item_ids[5], pb.FEEDBACK_KIND_CLICK),
    )
    acked = time.monotonic()
    after = {user: a.recommend(user) for user in (KNOWN, COLD)}
    assert after[KNOWN] != before and isinstance(after[COLD], list)
    for user, answer in after.items():
        wait_reflected(b, lambda u=user, x=answer: b.recommend(u) == x, f"{user}'s feedback", acked)
    # ...and the other way round, into a user A already holds.
    b.record(event(COLD, ref.item_ids[6], pb.FEEDBACK_KIND_SKIP))
    acked = time.monotonic()
    answer = b.recommend(COLD)
    assert answer != after[COLD]
    wait_reflected(a, lambda: a.recommend(COLD) == answer, "B's skip", acked)


def test_forget_on_a_makes_the_user_unknown_on_b(
    replicas: tuple[Replica, Replica], ref: Reference
) -> None:
    a, b = replicas
    for user in (KNOWN, COLD):
        assert isinstance(b.recommend(user), list)
        a.forget(user)
        forgotten = time.monotonic()
        assert a.recommend(user) == Code.NOT_FOUND
        wait_reflected(
            b, lambda u=user: b.recommend(u) == Code.NOT_FOUND, f"the forget of {user}", forgotten
        )
    # B sees the tombstone by hash only, yet masks the training row: new feedback on A makes
    # the same cold user (no training pairs) on both.
    a.record(event(KNOWN, ref.item_ids[7], pb.FEEDBACK_KIND_RATING, 3.0))
    acked = time.monotonic()
    answer = a.recommend(KNOWN)
    assert isinstance(answer, list)
    wait_reflected(b, lambda: b.recommend(KNOWN) == answer, "feedback after the forget", acked)


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_both_replicas_ride_out_a_redis_restart(
    replicas: tuple[Replica, Replica], store: tuple[str, RedisServer], ref: Reference
) -> None:
    """Redis killed under both servers: feedback calls answer UNAVAILABLE (retryable, nothing
    stored), reads keep serving; once Redis is back from its AOF, the same events are stored on
    retry and B's follower, which failed meanwhile, catches up."""
    (a, b), redis = replicas, store[1]
    user = "replica-outage-user-52c9e1f07ab34d18"
    first = event(user, ref.item_ids[10], pb.FEEDBACK_KIND_RATING, 5.0)
    a.record(first)
    acked = time.monotonic()
    answer = a.recommend(user)
    wait_reflected(b, lambda: b.recommend(user) == answer, "feedback before the outage", acked)
    redis.kill()
    try:
        during = event(user, ref.item_ids[11], pb.FEEDBACK_KIND_CLICK)
        assert a.record_code(during) == Code.UNAVAILABLE
        assert b.recommend(user) == answer  # reads need no store
        time.sleep(0.2)  # several failed polls of B's follower
    finally:
        redis.start()
    assert a.record_code(during) == Code.OK  # not stored during the outage: new on retry
    acked = time.monotonic()
    answer = a.recommend(user)
    wait_reflected(b, lambda: b.recommend(user) == answer, "feedback after the outage", acked)
    series = 'bertrec_feedback_store_errors_total{operation="follow"}'
    failed = [line for line in metrics(b).splitlines() if line.startswith(series)]
    assert failed and float(failed[0].split()[-1]) >= 1, "B's follower never saw the outage"


def metrics(replica: Replica) -> str:
    import urllib.request

    with urllib.request.urlopen(replica.server.metrics_url, timeout=10) as response:
        return str(response.read().decode())
