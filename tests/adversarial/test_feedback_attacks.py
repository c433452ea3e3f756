"""RecordFeedback and ForgetUser attacked where the tables cannot look: the state they leave.

`bad_inputs.py` checks the status of every rule; here the store itself is read (its SQLite
file) along with the metrics: a refused batch leaves no row and no commit, a key is stored
once however it is raced, forgetting leaves nothing of the user (not even the idempotency keys
that often spell their id), forgetting nobody is harmless, and the feedback series move by
exactly what happened.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc
import pytest

from adversarial.bad_inputs import BAD_INPUT, Case
from adversarial.conftest import AdversarialServer, Samples
from adversarial.rpcs import (
    ITEMS,
    RANKER,
    RPCS,
    USERS,
    Code,
    assert_healthy,
    invoke,
    path,
    tensor_bytes,
    tracebacks,
)
from bertrec.oip.v2 import grpc_service_pb2 as oip
from bertrec.oip.v2 import grpc_service_pb2_grpc as oip_grpc
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

TIMEOUT_S = 10.0
# The follower of the store polls all the time, so its deliveries interleave with the live
# path's as often as they can. (At 1 ms, the forget test below caught a race of a9d0c47 that
# the default 50 ms hid: the follower applied the tombstone first and had_model_factors was
# False.)
SERVER_SETTINGS = {"feedback_poll_interval_s": 0.001}
RATING, CLICK, PURCHASE = pb.FEEDBACK_KIND_RATING, pb.FEEDBACK_KIND_CLICK, pb.FEEDBACK_KIND_PURCHASE
REFUSED_BATCHES = [
    c
    for c in BAD_INPUT
    if c.path == path("rec", "RecordFeedback") and c.code == Code.INVALID_ARGUMENT
]
# A training user of tests/fakes.py's model that nothing else here touches.
TRAINED = USERS[33]


@pytest.fixture(autouse=True)
def healthy_after(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel
) -> Iterator[None]:
    """After every attack: SERVING, a valid call answers, and no traceback was logged."""
    logged = len(adversarial_server.log())
    yield
    assert_healthy(adversarial_channel)
    new = tracebacks(adversarial_server.log()[logged:])
    assert not new, f"the server logged {len(new)} traceback(s): {new[:3]}"


@pytest.fixture(scope="module")
def stub(adversarial_channel: grpc.Channel) -> pb_grpc.RecommenderServiceStub:
    return pb_grpc.RecommenderServiceStub(adversarial_channel)


def event(user_id: str, key: str, item: int = 1, kind: int = RATING) -> pb.FeedbackEvent:
    """A valid event (a 4-star rating, or `kind` without one)."""
    rating = 4.0 if kind == RATING else 0.0
    return pb.FeedbackEvent(user_id=user_id, item_id=ITEMS[item], kind=kind, rating=rating,
                            idempotency_key=key)  # fmt: skip


def record(stub: pb_grpc.RecommenderServiceStub, *events: pb.FeedbackEvent) -> tuple[int, int]:
    """RecordFeedback; returns (accepted, duplicates)."""
    answer = stub.RecordFeedback(pb.RecordFeedbackRequest(events=events), timeout=TIMEOUT_S)
    return answer.accepted, answer.duplicates


def forget(stub: pb_grpc.RecommenderServiceStub, user_id: str) -> tuple[int, bool]:
    """ForgetUser; returns (events_deleted, had_model_factors)."""
    answer = stub.ForgetUser(pb.ForgetUserRequest(user_id=user_id), timeout=TIMEOUT_S)
    return answer.events_deleted, answer.had_model_factors


def code_of(call: Callable[[], object]) -> Code:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return Code.OK


def rows(db: Path, where: str = "1", *args: str) -> int:
    """Rows of the store's events table matching `where`, read from its file (read-only)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=TIMEOUT_S) as conn:
        return int(conn.execute(f"SELECT count(*) FROM events WHERE {where}", args).fetchone()[0])


def stored_events(db: Path) -> int:
    return rows(db, "user_id IS NOT NULL")  # tombstones hold no user id


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def events_counted(samples: Samples) -> float:
    """bertrec_feedback_events_total over every kind and outcome."""
    return sum(v for (n, _), v in samples.items() if n == "bertrec_feedback_events_total")


# -- nothing of a refused batch is stored --------------------------------------------------------


@pytest.mark.parametrize("case", REFUSED_BATCHES, ids=lambda c: c.id)
def test_a_refused_batch_leaves_no_row_and_no_commit(
    adversarial_server: AdversarialServer, adversarial_channel: grpc.Channel, case: Case
) -> None:
    db, before = adversarial_server.feedback_db, adversarial_server.samples()
    stored = stored_events(db)
    outcome = invoke(adversarial_channel, RPCS[case.path], case.request.SerializeToString())
    after = adversarial_server.samples()
    assert outcome.code == Code.INVALID_ARGUMENT, outcome
    assert stored_events(db) == stored
    assert moved(before, after, "bertrec_feedback_rejected_batches_total") == 1
    assert events_counted(after) == events_counted(before)
    assert moved(before, after, "bertrec_feedback_commit_seconds_count") == 0


def test_the_good_events_of_a_refused_batch_can_be_sent_again(
    stub: pb_grpc.RecommenderServiceStub,
) -> None:
    good = event("refused-then-resent", "refused-then-resent:1")
    bad = event("refused-then-resent", "refused-then-resent:2", item=2)
    bad.rating = 9.0
    with pytest.raises(grpc.RpcError) as refused:
        record(stub, good, bad)
    assert refused.value.code() == Code.INVALID_ARGUMENT
    assert "events[1].rating" in (refused.value.details() or "")
    assert record(stub, good) == (1, 0)  # not a duplicate: the refused call stored nothing
    assert record(stub, good) == (0, 1)  # and now it is stored


# -- idempotency keys --------------------------------------------------------------------------


def test_a_key_twice_in_one_batch_is_stored_once(
    adversarial_server: AdversarialServer, stub: pb_grpc.RecommenderServiceStub
) -> None:
    key = "twice-in-one-batch"
    assert record(stub, event("twice", key, item=3), event("twice", key, item=4)) == (1, 1)
    assert rows(adversarial_server.feedback_db, "idempotency_key = ?", key) == 1


def test_keys_raced_by_many_callers_are_each_stored_once(
    adversarial_server: AdversarialServer, stub: pb_grpc.RecommenderServiceStub
) -> None:
    keys = [f"raced-{n}" for n in range(4)]
    batch = [event("raced", key, item=10 + n) for n, key in enumerate(keys)]
    start = threading.Barrier(16)

    def send() -> tuple[int, int]:
        start.wait()
        return record(stub, *batch)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: send(), range(16)))
    assert sum(a for a, _ in answers) == len(keys), answers
    assert sum(d for _, d in answers) == 15 * len(keys), answers
    db = adversarial_server.feedback_db
    assert rows(db, "user_id = ?", "raced") == len(keys)


# -- forgetting --------------------------------------------------------------------------------


def test_forgetting_an_empty_id_is_invalid_and_writes_no_tombstone(
    adversarial_server: AdversarialServer, stub: pb_grpc.RecommenderServiceStub
) -> None:
    db = adversarial_server.feedback_db
    tombstones = rows(db, "kind = 'forget'")
    with pytest.raises(grpc.RpcError) as refused:
        forget(stub, "")
    assert refused.value.code() == Code.INVALID_ARGUMENT
    assert "user_id is empty" in (refused.value.details() or "")
    assert rows(db, "kind = 'forget'") == tombstones


def test_forgetting_someone_unknown_is_harmless(
    adversarial_server: AdversarialServer, stub: pb_grpc.RecommenderServiceStub
) -> None:
    db = adversarial_server.feedback_db
    stored = stored_events(db)
    assert forget(stub, "nobody-at-all") == (0, False)
    assert stored_events(db) == stored


def test_forgetting_a_training_user_is_total_until_new_feedback(
    adversarial_server: AdversarialServer,
    adversarial_channel: grpc.Channel,
    stub: pb_grpc.RecommenderServiceStub,
) -> None:
    db, user = adversarial_server.feedback_db, TRAINED
    keys = [f"bertrec-example:{user}:{ITEMS[n]}" for n in (5, 6, 7)]  # keys that spell the id
    kinds = (RATING, CLICK, PURCHASE)
    assert record(stub, *[event(user, k, 5 + n, kind) for n, (k, kind) in
                          enumerate(zip(keys, kinds, strict=True))]) == (3, 0)  # fmt: skip
    assert code_of(lambda: stub.Recommend(pb.RecommendRequest(user_id=user, k=5))) == Code.OK

    assert forget(stub, user) == (3, True)
    infer = oip.ModelInferRequest(
        model_name=RANKER, inputs=[tensor_bytes("user_id", [user.encode()])]
    )
    oip_stub = oip_grpc.GRPCInferenceServiceStub(adversarial_channel)
    calls: dict[str, Callable[[], object]] = {
        "Recommend": lambda: stub.Recommend(pb.RecommendRequest(user_id=user, k=5)),
        "Recommend explain": lambda: stub.Recommend(
            pb.RecommendRequest(user_id=user, k=5, explain=True)
        ),
        "ScoreItems": lambda: stub.ScoreItems(
            pb.ScoreItemsRequest(user_id=user, item_ids=ITEMS[:2])
        ),
        "ModelInfer": lambda: oip_stub.ModelInfer(infer),
    }
    assert {name: code_of(call) for name, call in calls.items()} == dict.fromkeys(
        calls, Code.NOT_FOUND
    )
    assert rows(db, "user_id = ?", user) == 0
    assert all(rows(db, "idempotency_key = ?", k) == 0 for k in keys)
    assert forget(stub, user) == (0, False)  # nothing left: the factors are masked already

    # New feedback makes them a (cold) user again, in the very next Recommend, even if the
    # follower of the store delivers the tombstone after it; their old key is free: nothing
    # kept it.
    assert record(stub, event(user, keys[0], item=8)) == (1, 0)
    answer = stub.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=TIMEOUT_S)
    assert len(answer.items) == 5
    assert ITEMS[8] not in [i.item_id for i in answer.items]  # rated: excluded


def test_forgetting_a_folded_user(stub: pb_grpc.RecommenderServiceStub) -> None:
    user = "cold-then-forgotten"
    assert code_of(lambda: stub.Recommend(pb.RecommendRequest(user_id=user, k=5))) == (
        Code.NOT_FOUND
    )
    assert record(stub, event(user, f"{user}:1", item=20), event(user, f"{user}:2", 21)) == (2, 0)
    assert code_of(lambda: stub.Recommend(pb.RecommendRequest(user_id=user, k=5))) == Code.OK
    assert forget(stub, user) == (2, False)
    assert code_of(lambda: stub.Recommend(pb.RecommendRequest(user_id=user, k=5))) == (
        Code.NOT_FOUND
    )


def test_feedback_raced_by_forgets_does_not_bring_the_user_back(
    adversarial_server: AdversarialServer, stub: pb_grpc.RecommenderServiceStub
) -> None:
    """Records and forgets of one user interleave; after a last forget, nothing of them is
    left, neither served nor stored, whichever of the live path, the follower of the store or
    a late fold-in delivers the raced events."""
    user, rounds = "raced-by-forgets", 12

    def send(n: int) -> None:
        record(stub, event(user, f"{user}:{n}:a", item=n), event(user, f"{user}:{n}:b", n + 1))

    def erase() -> None:
        forget(stub, user)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call) for n in range(rounds) for call in (partial(send, n), erase)]
        for future in futures:
            future.result()
    forget(stub, user)
    time.sleep(0.5)  # ten polls of the follower: a resurrection would have happened by now
    assert code_of(lambda: stub.Recommend(pb.RecommendRequest(user_id=user, k=5))) == (
        Code.NOT_FOUND
    )
    assert rows(adversarial_server.feedback_db, "user_id = ?", user) == 0


# -- metrics -----------------------------------------------------------------------------------


def test_the_feedback_metrics_count_what_happened(
    adversarial_server: AdversarialServer, stub: pb_grpc.RecommenderServiceStub
) -> None:
    server, user = adversarial_server, "metered"
    batch = [event(user, "metered:1", 30), event(user, "metered:2", 31, CLICK),
             event(user, "metered:3", 32, PURCHASE)]  # fmt: skip
    before = server.samples()
    assert record(stub, *batch) == (3, 0)
    first = server.samples()
    for kind in ("rating", "click", "purchase"):
        assert moved(before, first, "bertrec_feedback_events_total", kind=kind,
                     outcome="accepted") == 1, kind  # fmt: skip
    assert events_counted(first) - events_counted(before) == 3
    assert moved(before, first, "bertrec_feedback_commit_seconds_count") == 1  # one caller
    assert moved(before, first, "bertrec_feedback_commit_seconds_sum") > 0

    assert record(stub, batch[0], event(user, "metered:4", 33)) == (1, 1)
    second = server.samples()
    assert moved(first, second, "bertrec_feedback_events_total", kind="rating",
                 outcome="duplicate") == 1  # fmt: skip
    assert moved(first, second, "bertrec_feedback_events_total", kind="rating",
                 outcome="accepted") == 1  # fmt: skip
    assert moved(first, second, "bertrec_feedback_rejected_batches_total") == 0

    with pytest.raises(grpc.RpcError):
        record(stub, event(user, "metered:5", 34), event("", "metered:6", 35))
    third = server.samples()
    assert moved(second, third, "bertrec_feedback_rejected_batches_total") == 1
    assert events_counted(third) == events_counted(second)
    assert moved(second, third, "bertrec_feedback_commit_seconds_count") == 0

    assert forget(stub, user) == (4, False)
    fourth = server.samples()
    assert moved(third, fourth, "bertrec_feedback_forgotten_users_total") == 1
    assert events_counted(fourth) == events_counted(third)  # a forget is no event
