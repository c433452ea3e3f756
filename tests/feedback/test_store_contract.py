"""The `FeedbackStore` contract (feedback/store.py), run against SQLite and against a real
Redis alike: the server, the replay and training rely on nothing else."""

from __future__ import annotations

import threading
import time

import pytest

from bertrec.feedback.events import Forgotten, StoredEvent
from bertrec.feedback.store import FeedbackStore, StoreError, salted_hash

from .conftest import Backend, Commits, event


def test_an_event_whose_key_the_store_holds_is_skipped_within_and_across_batches(
    store: FeedbackStore,
) -> None:
    first = store.append([event("u1", "a", "k1"), event("u1", "b", "k2"), event("u1", "a", "k1")])
    assert first.accepted == 2 and first.duplicates == 1
    assert first.seqs[2] is None and first.seqs[0] is not None and first.seqs[1] is not None

    again = store.append([event("u1", "a", "k1"), event("u2", "c", "k3")])
    assert again.seqs[0] is None and again.seqs[1] is not None
    assert [r.event.key for r in store.read_since(0) if isinstance(r, StoredEvent)] == [
        "k1", "k2", "k3",
    ]  # fmt: skip


def test_the_stored_event_is_the_event_appended(store: FeedbackStore) -> None:
    sent = [event("ü-1", "item/é", "key 1", rating=3.25), event("ü-1", "x", "key 2", rating=0)]
    seqs = store.append(sent).seqs
    stored = [(r.seq, r.event) for r in store.user_events("ü-1")]
    assert stored == list(zip(seqs, sent, strict=True))
    assert store.append([]).seqs == ()


def test_seqs_increase_and_are_never_reused_after_a_forget(store: FeedbackStore) -> None:
    before = store.append([event("u1", "a", "k1"), event("u1", "b", "k2")]).seqs
    erased = store.forget("u1")
    after = store.append([event("u1", "a", "k1"), event("u2", "c", "k3")]).seqs
    assert after[0] is not None  # the forgotten key is free again
    numbers = [*before, erased.tombstone.seq, *after]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


def test_read_since_pages_through_every_record_once_in_order(store: FeedbackStore) -> None:
    for batch in range(5):
        store.append([event(f"u{i % 3}", f"i{i}", f"k{batch}-{i}") for i in range(5)])
    store.forget("u0")
    seen: list[int] = []
    cursor = 0
    while page := store.read_since(cursor, limit=4):
        assert len(page) <= 4
        seen += [r.seq for r in page]
        cursor = page[-1].seq
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert seen == [r.seq for r in store.read_since(0)]
    assert len(seen) == 25 - 10 + 1  # u0's ten events are gone, its tombstone is there
    assert store.read_since(seen[-1]) == []


def test_user_events_hold_that_user_only_in_seq_order(store: FeedbackStore) -> None:
    store.append([event("u1", "a", "k1"), event("u2", "b", "k2")])
    store.append([event("u1", "c", "k3"), event("u1", "d", "k4")])
    mine = store.user_events("u1")
    assert [r.event.item_id for r in mine] == ["a", "c", "d"]
    assert [r.seq for r in mine] == sorted(r.seq for r in mine)
    assert store.user_events("nobody") == []


def test_forget_deletes_that_user_only_and_leaves_a_salted_tombstone(
    store: FeedbackStore,
) -> None:
    store.append([event("gone", "a", "k1"), event("kept", "a", "k2"), event("gone", "b", "k3")])
    erased = store.forget("gone")

    assert erased.events_deleted == 2
    assert store.user_events("gone") == []
    assert [r.event.key for r in store.user_events("kept")] == ["k2"]
    tombstone = erased.tombstone
    assert tombstone.user_hash == store.user_hash("gone") != salted_hash("", "gone")
    assert "gone" not in tombstone.user_hash
    assert store.tombstones() == [tombstone]
    assert store.read_since(0)[-1] == tombstone
    assert store.append([event("gone", "a", "k1")]).accepted == 1  # its key is free again

    twice = store.forget("gone")
    assert twice.events_deleted == 1 and twice.tombstone.seq > tombstone.seq
    assert store.tombstones() == [tombstone, twice.tombstone]
    assert store.forget("never-seen").events_deleted == 0


def test_the_salt_is_the_store_s_own_and_survives_a_reopen(backend: Backend) -> None:
    first = backend.open()
    salted = first.user_hash("u1")
    first.append([event("u1", "a", "k1")])
    first.close()
    again = backend.open()
    try:
        assert again.user_hash("u1") == salted != again.user_hash("u2")
        assert [r.event.key for r in again.user_events("u1")] == ["k1"]
    finally:
        again.close()


def test_a_batch_that_fails_inside_the_store_leaves_nothing_behind(
    backend: Backend, store: FeedbackStore
) -> None:
    store.append([event("before", "a", "k0")])
    backend.poison("bad")
    batch = [event("u1", "a", "k1"), event("bad", "b", "k2"), event("u3", "c", "k3")]
    with pytest.raises(StoreError):
        store.append(batch)

    assert [r.event.key for r in store.read_since(0) if isinstance(r, StoredEvent)] == ["k0"]
    assert store.user_events("u1") == [] and store.user_events("u3") == []
    retried = store.append([batch[0], batch[2]])  # their keys were not taken either
    assert retried.accepted == 2


def test_64_concurrent_callers_lose_nothing_and_share_no_seq(
    store: FeedbackStore, commits: Commits
) -> None:
    callers, calls = 64, 10
    acked: dict[str, int] = {}
    lock = threading.Lock()
    failures: list[BaseException] = []
    start = threading.Barrier(callers)

    def caller(n: int) -> None:
        try:
            start.wait()
            for i in range(calls):
                key = f"c{n}-{i}"
                (seq,) = store.append([event(f"user{n}", f"item{i}", key)]).seqs
                assert seq is not None
                with lock:
                    acked[key] = seq
        except BaseException as exc:  # reported below, in the test thread
            failures.append(exc)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert failures == []
    stored = {r.event.key: r.seq for r in store.read_since(0) if isinstance(r, StoredEvent)}
    assert stored == acked and len(stored) == callers * calls
    assert len(set(stored.values())) == len(stored)
    assert commits.calls == callers * calls and commits.events == callers * calls


def test_the_observer_hears_of_every_append_and_forget(
    store: FeedbackStore, commits: Commits
) -> None:
    store.append([event("u1", "a", "k1"), event("u1", "b", "k2")])
    store.append([event("u1", "a", "k1")])
    store.forget("u1")
    assert commits.calls == 3 and commits.events == 3
    assert all(duration >= 0 for duration, _, _ in commits.seen)


def test_tombstones_read_back_in_seq_order(store: FeedbackStore) -> None:
    for user in ["c", "a", "b"]:
        store.append([event(user, "x", f"k-{user}")])
        store.forget(user)
    tombstones = store.tombstones()
    assert [t.user_hash for t in tombstones] == [store.user_hash(u) for u in ["c", "a", "b"]]
    assert [t.seq for t in tombstones] == sorted(t.seq for t in tombstones)
    assert all(isinstance(t, Forgotten) for t in tombstones)


def test_a_follower_reading_while_others_append_sees_every_record_once_in_order(
    backend: Backend, store: FeedbackStore
) -> None:
    writers, calls = 8, 40
    done = threading.Event()
    follower = backend.open()  # another replica, following the shared log
    seen: list[int] = []

    def follow() -> None:
        cursor = 0
        while True:
            finished = done.is_set()  # read once more after the last append returned
            page = follower.read_since(cursor, limit=7)
            seen.extend(r.seq for r in page)
            cursor = page[-1].seq if page else cursor
            if finished and not page:
                return
            if not page:
                time.sleep(0.001)  # nothing new yet; leave the CPU to the writers

    def write(n: int) -> None:
        for i in range(calls):
            store.append([event(f"u{n}", f"i{i}", f"w{n}-{i}")])
            if i % 10 == 9:
                store.forget(f"gone{n}")

    reader = threading.Thread(target=follow)
    reader.start()
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    follower.close()

    assert seen == [r.seq for r in store.read_since(0)]  # none skipped, none twice, in order
    assert len(seen) == writers * calls + writers * (calls // 10)
