"""The feedback store stalls: another process holds SQLite's write lock past the call's deadline.

A write that cannot commit before the call's deadline is the deadline's doing, not a broken
store: the caller must get DEADLINE_EXCEEDED (the same code every other RPC gives when its
deadline passes first), and no status message may show where the store lives (a file path, a
Redis host). Meanwhile reads go on answering, and once the lock is gone the stalled write lands
(its key is taken: the caller's retry is a duplicate) and the server is healthy.

The fuzz of test_fuzz.py found the first at random, with 2 ms deadlines; here a held lock and
the server's own deadline for calls that set none (`request_timeout_s`) make it certain. The
follower of the store is kept from running (an hour between polls), so only a call's own path
can fold its events in: what a caller sees right after its answer is then certain too.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from adversarial.conftest import AdversarialServer
from adversarial.rpcs import ITEMS, USERS, Code, assert_healthy, tracebacks
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

# The deadline of calls that set none (the stalled writes below run into it); no follower.
SERVER_SETTINGS = {"request_timeout_s": 1.0, "feedback_poll_interval_s": 3600.0}
CLIENT_TIMEOUT_S = 30.0  # far past the server's deadline: the server's answer is what is seen
USER = "stalled-store-user"


@contextmanager
def write_locked(db: Path) -> Iterator[None]:
    """Hold the store's write lock (as a stuck writer in another process would)."""
    conn = sqlite3.connect(db, timeout=CLIENT_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.fixture(scope="module")
def stub(adversarial_channel: grpc.Channel) -> pb_grpc.RecommenderServiceStub:
    return pb_grpc.RecommenderServiceStub(adversarial_channel)


@pytest.fixture(autouse=True)
def healthy_after(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel
) -> Iterator[None]:
    logged = len(adversarial_server.log())
    yield
    assert_healthy(adversarial_channel)
    new = tracebacks(adversarial_server.log()[logged:])
    assert not new, f"the server logged {len(new)} traceback(s): {new[:3]}"


def rating(key: str, user_id: str = USER) -> pb.RecordFeedbackRequest:
    return pb.RecordFeedbackRequest(events=[pb.FeedbackEvent(
        user_id=user_id, item_id=ITEMS[3], kind=pb.FEEDBACK_KIND_RATING, rating=5.0,
        idempotency_key=key,
    )])  # fmt: skip


def forget(stub: pb_grpc.RecommenderServiceStub, user_id: str) -> tuple[int, bool]:
    answer = stub.ForgetUser(pb.ForgetUserRequest(user_id=user_id), timeout=CLIENT_TIMEOUT_S)
    return answer.events_deleted, answer.had_model_factors


def outcome(call: Callable[[], object]) -> tuple[Code, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return Code.OK, ""


WRITES: dict[str, Callable[[pb_grpc.RecommenderServiceStub], object]] = {
    "RecordFeedback": lambda s: s.RecordFeedback(rating("stalled"), timeout=CLIENT_TIMEOUT_S),
    "ForgetUser": lambda s: s.ForgetUser(
        pb.ForgetUserRequest(user_id="stalled-forget"), timeout=CLIENT_TIMEOUT_S
    ),
}


@pytest.mark.parametrize("method", sorted(WRITES))
def test_a_write_stalled_past_the_deadline_is_deadline_exceeded(
    adversarial_server: AdversarialServer, stub: pb_grpc.RecommenderServiceStub, method: str
) -> None:
    db = adversarial_server.feedback_db
    with write_locked(db):
        code, details = outcome(lambda: WRITES[method](stub))
    assert (code, str(db) in details) == (Code.DEADLINE_EXCEEDED, False), details


def stall_then_retry(
    server: AdversarialServer,
    stub: pb_grpc.RecommenderServiceStub,
    request: pb.RecordFeedbackRequest,
) -> tuple[Code, pb.RecordFeedbackResponse]:
    """Record while the store is locked past the call's deadline, checking that reads answer
    meanwhile; then retry. Returns the stalled call's code and the retry's answer."""
    with ThreadPoolExecutor(1) as pool, write_locked(server.feedback_db):
        stalled = pool.submit(outcome, lambda: stub.RecordFeedback(request, timeout=30.0))
        answer = stub.Recommend(pb.RecommendRequest(user_id=USERS[1], k=5), timeout=10.0)
        assert len(answer.items) == 5  # the held lock blocks writes only
        code, _ = stalled.result()
    return code, stub.RecordFeedback(request, timeout=CLIENT_TIMEOUT_S)


def test_reads_answer_while_the_store_is_stalled_and_the_stalled_write_lands(
    adversarial_server: AdversarialServer, stub: pb_grpc.RecommenderServiceStub
) -> None:
    code, retried = stall_then_retry(adversarial_server, stub, rating("stalled-then-landed"))
    assert code != Code.OK  # it could not commit in time (whichever code it got)
    # The writer commits the stalled batch once the lock is gone: its key is taken, and the
    # caller's retry, the safe thing to do, is a duplicate.
    assert (retried.accepted, retried.duplicates) == (0, 1)
    with sqlite3.connect(f"file:{adversarial_server.feedback_db}?mode=ro", uri=True) as conn:
        query = "SELECT count(*) FROM events WHERE idempotency_key = ?"
        assert conn.execute(query, ("stalled-then-landed",)).fetchone()[0] == 1


def test_a_retry_acked_as_a_duplicate_is_in_the_next_recommend(
    adversarial_server: AdversarialServer, stub: pb_grpc.RecommenderServiceStub
) -> None:
    user = "stalled-then-retried"
    code, retried = stall_then_retry(adversarial_server, stub, rating(user, user_id=user))
    assert code != Code.OK
    assert (retried.accepted, retried.duplicates) == (0, 1)
    # Acknowledged (as already stored): the user's next Recommend reflects it, so a cold user
    # is known now.
    recommend = pb.RecommendRequest(user_id=user, k=5)
    assert outcome(lambda: stub.Recommend(recommend, timeout=10.0))[0] == Code.OK


def test_a_forgotten_training_user_who_comes_back_is_served_at_once(
    stub: pb_grpc.RecommenderServiceStub,
) -> None:
    """NOT_FOUND after ForgetUser, "until new feedback": the acked comeback is in the very next
    Recommend by the call's own path alone, as a cold user whose rated item is left out."""
    user, recommend = USERS[30], pb.RecommendRequest(user_id=USERS[30], k=5)
    assert forget(stub, user)[1]  # a training user: their factors are masked
    assert outcome(lambda: stub.Recommend(recommend, timeout=10.0))[0] == Code.NOT_FOUND
    comeback = rating("comeback", user_id=user)
    assert stub.RecordFeedback(comeback, timeout=CLIENT_TIMEOUT_S).accepted == 1
    items = [i.item_id for i in stub.Recommend(recommend, timeout=10.0).items]
    assert len(items) == 5
    assert comeback.events[0].item_id not in items
