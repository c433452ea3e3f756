"""RecommendBatch and StreamRecommendations against numpy computed from the exported arrays."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from server_harness import SHARED_FLAGS, Reference, ServerProcess, serving

from bertrec.client import AsyncRecommenderClient, Feedback, RecommenderClient, RecommenderError
from bertrec.server.bulk import BulkRanking
from bertrec.server.engine import Call
from bertrec.server.errors import Cancelled, NotFound
from bertrec.server.model import RankQuery, RankResult
from bertrec.server.online_users import UserState
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

USERS = tuple(f"u{i:04d}" for i in range(40))
STREAM = "/bertrec.v1.RecommenderService/StreamRecommendations"


def check_user(result, ref: Reference, k: int, exclude_rated: bool = True) -> None:
    expected = ref.recommend(result.user_id, k, exclude_rated=exclude_rated)
    assert result.found
    assert result.item_ids == [item for item, _ in expected]
    for item, (_, score) in zip(result.items, expected, strict=True):
        assert item.score == pytest.approx(score, abs=1e-5)
        assert item.predicted_rating == pytest.approx(
            ref.rating(result.user_id, item.item_id), abs=1e-5
        )
    assert [i.rank for i in result.items] == list(range(1, len(result.items) + 1))


def test_batch_matches_numpy_in_request_order(client: RecommenderClient, ref: Reference) -> None:
    asked = [*reversed(USERS), "ghost"]
    results = client.recommend_batch(asked, k=7)
    assert [r.user_id for r in results] == asked
    for result in results[:-1]:
        check_user(result, ref, 7)
    assert (results[-1].found, results[-1].items) == (False, ())
    assert {(r.model.name, r.model.version) for r in results} == {("tiny", 1)}


def test_batch_with_rated_items_and_default_k(client: RecommenderClient, ref: Reference) -> None:
    (with_rated,) = client.recommend_batch(["u0003"], k=50, exclude_rated=False)
    check_user(with_rated, ref, 50, exclude_rated=False)
    assert set(with_rated.item_ids) & set(ref.rated("u0003"))
    stub = pb_grpc.RecommenderServiceStub(grpc.insecure_channel(client._channel._channel.target()))
    response = stub.RecommendBatch(pb.RecommendBatchRequest(user_ids=["u0001"]), timeout=10)
    assert len(response.results[0].items) == 10  # k unset: 10, rated items excluded (unset)
    assert not {i.item_id for i in response.results[0].items} & set(ref.rated("u0001"))


@pytest.mark.parametrize(
    ("user_ids", "k", "says"),
    [
        ([], 5, "user_ids is empty"),
        (["u0001", ""], 5, "user_ids[1]"),
        (["u0001", "u0002", "u0001"], 5, "user_ids[2]"),
        (["u0001"], -1, "k must be"),
        (["u0001"], 51, "k must be"),
    ],
)
def test_bad_requests_are_refused_whole(
    client: RecommenderClient, user_ids: list[str], k: int, says: str
) -> None:
    for call in (
        client.recommend_batch,
        lambda *a, **kw: list(client.stream_recommendations(*a, **kw)),
    ):
        with pytest.raises(RecommenderError) as info:
            call(user_ids, k=k)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert says in info.value.details


@pytest.fixture(scope="module")
def small(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with tiny bulk limits, ranking batches of 4 and one stream at a time."""
    flags = ("--max-batch-users", "5", "--max-stream-users", "39", "--ranker-max-batch-size", "4",
             "--max-streaming-rpcs", "1")  # fmt: skip
    with serving(model_repo, tmp_path_factory.mktemp("bulk"), *SHARED_FLAGS, *flags) as proc:
        yield proc


def test_limits(small: ServerProcess) -> None:
    with RecommenderClient(small.target, timeout_s=10.0) as c:
        assert len(c.recommend_batch(USERS[:5], k=3)) == 5
        assert len(list(c.stream_recommendations(USERS[:39], k=3))) == 39
        for call, ids, says in (
            (c.recommend_batch, USERS[:6], "max_batch_users 5"),
            (
                lambda *a, **kw: list(c.stream_recommendations(*a, **kw)),
                USERS,
                "max_stream_users 39",
            ),
        ):
            with pytest.raises(RecommenderError) as info:
                call(ids, k=3)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert says in info.value.details


def test_stream_comes_in_ranker_sized_chunks_equal_to_numpy(
    small: ServerProcess, ref: Reference
) -> None:
    asked = [*USERS[:20], "ghost", *USERS[20:38]]
    with grpc.insecure_channel(small.target) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        request = pb.StreamRecommendationsRequest(user_ids=asked, k=4)
        messages = list(stub.StreamRecommendations(request, timeout=10))
    assert [len(m.results) for m in messages] == [4] * 9 + [3]
    with RecommenderClient(small.target, timeout_s=10.0) as c:
        results = list(c.stream_recommendations(asked, k=4))
    assert [r.user_id for r in results] == asked
    for result in results:
        if result.user_id == "ghost":
            assert not result.found and not result.items
        else:
            check_user(result, ref, 4)


def test_async_client(small: ServerProcess, ref: Reference) -> None:
    async def main() -> None:
        async with AsyncRecommenderClient(small.target, timeout_s=10.0) as c:
            batch = await c.recommend_batch(USERS[:3], k=5)
            streamed = [r async for r in c.stream_recommendations(USERS[:9], k=5)]
        for result in (*batch, *streamed):
            check_user(result, ref, 5)
        assert [r.user_id for r in streamed] == list(USERS[:9])

    asyncio.run(main())


def in_flight_calls(server: ServerProcess) -> float:
    """RPCs the server is handling (this module's calls run one at a time)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return sum(float(v) for v in re.findall(r"^bertrec_in_flight_requests (\S+)$", text, re.M))


def test_cancelling_a_stream_mid_way_frees_the_server(small: ServerProcess, ref: Reference) -> None:
    with grpc.insecure_channel(small.target) as channel:
        call = channel.unary_stream(STREAM)(
            pb.StreamRecommendationsRequest(user_ids=USERS[:39], k=50).SerializeToString(),
            timeout=30,
        )
        first = pb.StreamRecommendationsResponse.FromString(next(call))
        assert [r.user_id for r in first.results] == list(USERS[:4])
        call.cancel()
        assert call.code() == grpc.StatusCode.CANCELLED
    # The server's handler ends and gives back its stream permit (max_streaming_rpcs is 1):
    deadline = time.monotonic() + 10
    while in_flight_calls(small) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight_calls(small) == 0
    with RecommenderClient(small.target, timeout_s=10.0) as c:
        results = list(c.stream_recommendations(USERS[:6], k=2))
    for result in results:
        check_user(result, ref, 2)


# -- the server's bulk loop on a stand-in ranker: what is queued, and what a leaving caller frees


class FakeRanker:
    """Answers the first `answered` queries at once; later ones stay queued until cancelled."""

    def __init__(self, answered: int) -> None:
        self.answered = answered
        self.futures: list[Future[RankResult]] = []

    def submit(self, query: RankQuery, deadline_s: float) -> Future[RankResult]:
        future: Future[RankResult] = Future()
        if len(self.futures) < self.answered:
            rows = np.arange(query.k, dtype=np.int64)
            future.set_result(RankResult(rows, np.ones(query.k, np.float32), np.zeros(query.k)))
        self.futures.append(future)
        return future


class FakeUsers:
    def lookup(self, user_id: str) -> UserState:
        if user_id.startswith("ghost"):
            raise NotFound(f"unknown user_id {user_id!r}")
        return UserState(1, np.zeros(4, np.float32), np.empty(0, np.int64))


def bulk(
    answered: int, ids: list[str], callbacks: list | None = None
) -> tuple[BulkRanking, FakeRanker]:
    ranker = FakeRanker(answered)
    recommender = SimpleNamespace(users=FakeUsers(), ranker=ranker, model=None)
    on_done = None if callbacks is None else lambda cb: callbacks.append(cb) or True
    call = Call(time.monotonic() + 30, on_done)
    return BulkRanking(recommender, ids, 3, True, call, chunk_size=2), ranker  # type: ignore[arg-type]


def test_the_next_chunk_is_queued_ahead_and_a_closed_stream_withdraws_it() -> None:
    ranking, ranker = bulk(1, ["a", "ghost-1", "b", "c", "d", "e"])
    chunks = ranking.chunks()
    first = next(chunks)
    assert [(r.user_id, r.found, len(r.rows)) for r in first] == [
        ("a", True, 3),
        ("ghost-1", False, 0),
    ]
    assert len(ranker.futures) == 3  # a, then b and c of the next chunk; ghosts never queue
    chunks.close()
    assert [f.cancelled() for f in ranker.futures] == [False, True, True]
    assert len(ranker.futures) == 3  # d and e were never queued


def test_a_caller_leaving_mid_wait_cancels_the_queued_queries() -> None:
    callbacks: list = []
    ranking, ranker = bulk(0, ["a", "b", "c", "d"], callbacks)
    (leave,) = callbacks
    threading.Timer(0.2, leave).start()  # the client goes while the handler waits
    with pytest.raises(Cancelled):
        list(ranking.chunks())
    assert len(ranker.futures) == 4 and all(f.cancelled() for f in ranker.futures)


@pytest.fixture(scope="module")
def feedback_server(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("bulk-feedback") / "feedback.db"
    logs = tmp_path_factory.mktemp("logs")
    with serving(model_repo, logs, "--feedback-store", f"sqlite:///{store}") as proc:
        yield proc


def test_folded_and_forgotten_users(feedback_server: ServerProcess, ref: Reference) -> None:
    """A user known only from feedback is ranked like Recommend ranks them (their vector
    re-solved, their items excluded); a forgotten one comes back found=False."""
    cold, forgotten, item = "bulk-cold-reader", USERS[5], ref.item_ids[3]
    top = float(ref.manifest["scoring"]["rating_range"][1])
    with RecommenderClient(feedback_server.target, timeout_s=10.0) as c:
        c.record_feedback([Feedback(cold, item, "rating", rating=top)])
        c.forget_user(forgotten)
        asked = [cold, forgotten, USERS[6]]
        single = c.recommend(cold, 50)
        for results in (c.recommend_batch(asked, k=50), list(c.stream_recommendations(asked, 50))):
            got_cold, got_forgotten, trained = results
            assert got_cold.found and item not in got_cold.item_ids
            assert got_cold.item_ids == single.item_ids
            assert [i.score for i in got_cold.items] == [i.score for i in single.items]
            assert (got_forgotten.found, got_forgotten.items) == (False, ())
            check_user(trained, ref, 50)
