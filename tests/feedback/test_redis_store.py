"""What only the Redis store promises, each test on a redis-server of its own: acknowledged
events survive kill -9 of Redis, a batch lands whole or not at all when Redis dies under it,
a Redis that would answer before fsync is refused, forgetting reaches the AOF files, and a
Redis that is down or stalled is a StoreError."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_harness import RedisServer, need_redis_server, redis_server, wait_until

from bertrec.feedback.events import FeedbackEvent, StoredEvent
from bertrec.feedback.store import FeedbackStore, StoreError, open_store

from .conftest import event


@pytest.fixture(autouse=True)
def _redis_installed() -> None:
    need_redis_server()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as started:
        yield started


def stored_keys(store: FeedbackStore) -> set[str]:
    return {r.event.key for r in store.read_since(0, limit=10**6) if isinstance(r, StoredEvent)}


def test_acknowledged_events_survive_kill_9_of_redis(server: RedisServer) -> None:
    rng = random.Random(7)
    acked: list[str] = []
    for round_ in range(3):
        store = open_store(server.url)
        acked += _append_until_killed(store, server, f"r{round_}", wanted=50 + rng.randrange(300))
        store.close()
        server.start()  # replays the AOF
        store = open_store(server.url)
        stored = stored_keys(store)
        store.close()
        missing = [key for key in acked if key not in stored]
        assert missing == [], f"round {round_}: {len(missing)} acknowledged events lost"
    assert len(acked) >= 3 * 50


def test_a_batch_redis_dies_under_is_stored_whole_or_not_at_all(server: RedisServer) -> None:
    rng = random.Random(3)
    size = 5000
    store = open_store(server.url)
    started = time.perf_counter()
    store.append([event("warm", f"i{i}", f"warm-{i}") for i in range(size)])
    took = time.perf_counter() - started
    store.close()
    outcomes = []
    for round_ in range(4):
        store = open_store(server.url)
        batch = [event(f"u{i % 7}", f"i{i}", f"b{round_}-{i}") for i in range(size)]
        result: list[object] = []
        call = threading.Thread(target=_append_into, args=(store, batch, result))
        call.start()
        time.sleep(rng.uniform(0.0, took * 1.5))
        server.kill()
        call.join()
        store.close()
        server.start()
        store = open_store(server.url)
        landed = {e.key for e in batch} & stored_keys(store)
        store.close()
        acked = not isinstance(result[0], StoreError)
        outcomes.append((acked, len(landed)))
        assert len(landed) in (0, size), f"round {round_}: {len(landed)} of {size} stored"
        assert not acked or len(landed) == size
    print("(acknowledged, stored) per round:", outcomes)


def test_a_redis_that_answers_before_fsync_is_refused(tmp_path: Path) -> None:
    for i, setting in enumerate(
        [("--appendfsync", "everysec"), ("--appendonly", "no"), ("--appendfsync", "no")]
    ):
        with (
            redis_server(tmp_path / f"redis{i}", *setting) as lax,
            pytest.raises(StoreError, match="appendfsync always"),
        ):
            open_store(lax.url)


def test_a_redis_without_config_opens_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_server(tmp_path / "redis", "--rename-command", "CONFIG", "") as managed:
        with caplog.at_level(logging.WARNING, logger="bertrec.feedback.redis_store"):
            store = open_store(managed.url)
        assert "cannot read the AOF settings" in caplog.text
        assert store.append([event("u1", "a", "k1")]).accepted == 1
        store.close()


@pytest.mark.parametrize("preamble", ["yes", "no"])
def test_forget_leaves_no_trace_of_the_user_in_the_aof_after_the_rewrite(
    tmp_path: Path, preamble: str
) -> None:
    # Uncompressed, so a leftover in the rewritten base file is plain bytes to find.
    args = ("--aof-use-rdb-preamble", preamble, "--rdbcompression", "no")
    with redis_server(tmp_path / "redis", *args) as server:
        store = open_store(server.url)
        victim = _append_victim_and_keeper(store)
        assert all(s.encode() in server.aof_bytes() for s in victim)  # the search sees them

        store.forget(victim[0])
        _wait_for_trace_to_go(server, victim)
        store.close()
        assert b"kept-user-77" in server.aof_bytes() and b"kept-item-77" in server.aof_bytes()


def test_forget_during_a_running_rewrite_asks_for_another(server: RedisServer) -> None:
    store = open_store(server.url)
    victim = _append_victim_and_keeper(store)
    with server.client() as client:
        client.config_set("rdb-key-save-delay", 200_000)  # each key takes 0.2 s to rewrite
        client.bgrewriteaof()  # its snapshot holds the victim: it started before the forget
        wait_until(lambda: _rewriting(server), 10.0, "the slow rewrite to start")
        store.forget(victim[0])
        client.config_set("rdb-key-save-delay", 0)
    _wait_for_trace_to_go(server, victim)
    assert int(server.info("persistence")["aof_rewrites"]) >= 2
    store.close()


def test_a_redis_that_is_down_is_a_store_error_until_it_is_back(server: RedisServer) -> None:
    store = open_store(server.url)
    store.append([event("u1", "a", "k1")])
    server.kill()
    with pytest.raises(StoreError):
        store.append([event("u1", "b", "k2")])
    with pytest.raises(StoreError):
        store.forget("u1")
    with pytest.raises(StoreError):
        store.read_since(0)
    with pytest.raises(StoreError, match="cannot open"):
        open_store(server.url)

    server.start()
    assert store.append([event("u1", "b", "k2")]).accepted == 1  # the same store reconnects
    assert stored_keys(store) == {"k1", "k2"}
    store.close()


def test_a_stalled_redis_is_a_store_error_within_the_call_s_timeout(server: RedisServer) -> None:
    store = open_store(server.url)
    batch = [event("u1", "a", "k1"), event("u1", "b", "k2")]
    with server.client() as client:
        client.client_pause(2_000)  # milliseconds; every client's commands wait, ours too
        with pytest.raises(StoreError, match=r"no answer within 0\.3 s"):
            store.append(batch, timeout_s=0.3)
    # The timed-out call may still land once the pause ends; sending the batch again (it
    # waits for the pause to end) stores it exactly once.
    again = store.append(batch)
    assert again.accepted + again.duplicates == 2
    assert stored_keys(store) == {"k1", "k2"}
    store.close()


def _append_victim_and_keeper(store: FeedbackStore) -> list[str]:
    victim = ["victim-user-5c1e", "victim-item-0a", "victim-item-0b", "victim-key-9f"]
    store.append(
        [
            event(victim[0], victim[1], victim[3]),
            event(victim[0], victim[2], "victim-key-9g"),
            event("kept-user-77", "kept-item-77", "kept-key-77"),
        ]
    )
    return victim


def _wait_for_trace_to_go(server: RedisServer, victim: list[str]) -> None:
    """Until no rewrite runs and no AOF file holds any of `victim` (the store asks for the
    rewrite; Redis unlinks the old files just after it ends)."""

    def gone() -> bool:
        held = server.aof_bytes()
        return not _rewriting(server) and not any(s.encode() in held for s in victim)

    wait_until(gone, 30.0, "the forgotten user to leave the AOF files")


def _rewriting(server: RedisServer) -> bool:
    info = server.info("persistence")
    return bool(int(info["aof_rewrite_in_progress"]) or int(info["aof_rewrite_scheduled"]))


def _append_until_killed(
    store: FeedbackStore, server: RedisServer, tag: str, wanted: int
) -> list[str]:
    """Eight callers append one event per call until Redis is killed under them (after
    `wanted` acks); returns the keys whose append returned."""
    acked: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    def caller(n: int) -> None:
        for i in range(10**9):
            key = f"{tag}-{n}-{i}"
            try:
                store.append([event(f"u{n}", f"i{i}", key)], timeout_s=10.0)
            except StoreError:
                return
            with lock:
                acked.append(key)
                if len(acked) >= wanted:
                    enough.set()

    callers = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    for t in callers:
        t.start()
    assert enough.wait(60.0), "Redis acknowledged too few events"
    server.kill()
    for t in callers:
        t.join()
    return acked


def _append_into(store: FeedbackStore, batch: list[FeedbackEvent], result: list[object]) -> None:
    try:
        result.append(store.append(batch, timeout_s=10.0))
    except StoreError as exc:
        result.append(exc)
