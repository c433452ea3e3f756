"""What only the SQLite store promises: group commit, forgetting down to the bytes of its
files, and no acknowledged event lost to a kill -9 of the process writing."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bertrec.feedback import sqlite_store
from bertrec.feedback.events import FeedbackEvent, FeedbackKind, StoredEvent
from bertrec.feedback.sqlite_store import SqliteStore
from bertrec.feedback.store import StoreError

from .conftest import Commits, event

# A child that appends one event per call from 4 threads forever and prints each key once
# its append has returned (acknowledged).
APPENDER = """
import sys, threading
from bertrec.feedback.events import FeedbackEvent, FeedbackKind
from bertrec.feedback.sqlite_store import SqliteStore
from bertrec.feedback.store import StoreError
from bertrec.feedback.store import NoObserver

store = SqliteStore(sys.argv[1], NoObserver())
lock = threading.Lock()

def append(thread):
    for i in range(10**9):
        key = f"{sys.argv[2]}-{thread}-{i}"
        store.append([FeedbackEvent("u", f"i{i}", FeedbackKind.CLICK, 0.0, 1.0, key)])
        with lock:
            sys.stdout.write(key + "\\n")
            sys.stdout.flush()

for thread in range(4):
    threading.Thread(target=append, args=(thread,)).start()
"""


def test_concurrent_callers_share_commits(tmp_path: Path) -> None:
    commits = Commits()
    store = SqliteStore(str(tmp_path / "feedback.db"), commits)
    callers, calls = 64, 5
    start = threading.Barrier(callers)

    def caller(n: int) -> None:
        start.wait()
        for i in range(calls):
            store.append([event(f"u{n}", "item", f"{n}-{i}")])

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()

    assert commits.calls == callers * calls
    # While one group commits, the other callers queue: each commit carries many calls.
    assert len(commits.seen) < callers * calls / 4, commits.seen
    assert max(c for _, _, c in commits.seen) > 1


def test_forget_leaves_no_byte_of_the_user_in_the_files(tmp_path: Path) -> None:
    path = tmp_path / "feedback.db"
    store = SqliteStore(str(path), Commits())
    secrets = ["victim-user-5c1e", "victim-item-0a", "victim-item-0b", "victim-key-9f"]
    store.append(
        [
            event(secrets[0], secrets[1], secrets[3]),
            event(secrets[0], secrets[2], "victim-key-9g"),
            event("kept-user-77", "kept-item-77", "kept-key-77"),
        ]
    )
    assert all(s.encode() in _file_bytes(path) for s in secrets)  # the search can see them

    store.forget(secrets[0])
    store.close()
    held = _file_bytes(path)

    assert [s for s in secrets if s.encode() in held] == []
    assert b"kept-user-77" in held and b"kept-item-77" in held


# Write histories (`_replay`) after which, before forgets rewrote every page, the forgotten id
# survived in the unused space of an index page (seeds 16, 23, 43 and 50 of 0-59 did).
STALE_COPY_SEEDS = (16, 23)
USERS = [f"durable-user-{n}" for n in range(6)]


def _replay(path: Path, seed: int) -> None:
    """Three lifetimes of the store, each appending batches of 1-4 events of six users."""
    rng = random.Random(seed)
    for _ in range(3):
        store = SqliteStore(str(path), Commits())
        for _ in range(rng.randint(40, 260)):
            store.append([
                FeedbackEvent(rng.choice(USERS), f"item-{rng.randint(0, 59):05d}",
                              FeedbackKind.CLICK, 0.0, 1.7e9, f"{rng.getrandbits(128):032x}")
                for _ in range(rng.randint(1, 4))
            ])  # fmt: skip
        store.close()


def _forget_first_user(path: Path) -> bytes:
    store = SqliteStore(str(path), Commits())
    store.forget(USERS[0])
    store.close()
    return _file_bytes(path)


@pytest.mark.parametrize("seed", STALE_COPY_SEEDS)
def test_forget_leaves_no_copy_that_page_splits_moved(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "feedback.db"
    _replay(path, seed)
    held = _forget_first_user(path)
    assert USERS[0].encode() not in held
    assert USERS[1].encode() in held


def test_without_rewriting_every_page_those_histories_keep_the_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hazard is real in this SQLite: `secure_delete` and a checkpoint alone leave the
    forgotten id in the file after these histories."""
    monkeypatch.setattr(SqliteStore, "_rewrite_every_page", lambda self: None)
    kept = []
    for seed in STALE_COPY_SEEDS:
        path = tmp_path / str(seed) / "feedback.db"
        path.parent.mkdir()
        _replay(path, seed)
        kept.append(USERS[0].encode() in _forget_first_user(path))
    assert kept == [True] * len(STALE_COPY_SEEDS)


def test_a_forget_whose_scrub_fails_is_refused_and_the_store_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleted but perhaps not scrubbed is not forgotten: the caller hears an error (and may
    retry the forget); the writer thread survives."""

    def fail(self: SqliteStore) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    store = SqliteStore(str(tmp_path / "feedback.db"), Commits())
    store.append([event("gone", "i1", "k1"), event("kept", "i2", "k2")])
    monkeypatch.setattr(SqliteStore, "_rewrite_every_page", fail)
    with pytest.raises(StoreError, match="disk I/O error"):
        store.forget("gone")
    monkeypatch.undo()
    assert store.user_events("gone") == []  # the delete itself was committed
    store.append([event("kept", "i3", "k3")])
    assert store.forget("gone").events_deleted == 0  # a retry scrubs
    assert [e.event.key for e in store.user_events("kept")] == ["k2", "k3"]
    store.close()


def test_a_forget_a_lingering_reader_keeps_from_scrubbing_fails_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader holding an old snapshot keeps the WAL from being checkpointed, so the main
    file may still hold the user's rows: the forget fails within the scrub's wait (it used to
    hold the writer thread for up to 50 x 30 s, then answer as if scrubbed), appends go on,
    and a retry once the reader is gone leaves no byte of the user."""
    monkeypatch.setattr(sqlite_store, "SCRUB_CHECKPOINT_WAIT_S", 0.3)
    path = tmp_path / "feedback.db"
    store = SqliteStore(str(path), Commits())
    store.append([event("secret-user-xyz", "i1", "k1"), event("kept", "i2", "k2")])
    reader = sqlite3.connect(str(path))
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM events").fetchone()  # holds this snapshot
    started = time.monotonic()
    with pytest.raises(StoreError, match="checkpoint still busy"):
        store.forget("secret-user-xyz")
    assert time.monotonic() - started < 10
    store.append([event("kept", "i3", "k3")])  # the writer thread is free again
    reader.rollback()
    reader.close()
    store.forget("secret-user-xyz")
    assert [e.event.key for e in store.user_events("kept")] == ["k2", "k3"]
    store.close()
    assert not [p.name for p in tmp_path.iterdir() if b"secret-user-xyz" in p.read_bytes()]


def test_forgets_committed_together_share_one_scrub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrub rewrites the whole store: forgets queued behind a running one wait for one
    scrub together, not one each."""
    rewrite = SqliteStore._rewrite_every_page
    scrubs = []

    def slow(self: SqliteStore) -> None:
        scrubs.append(1)
        deadline = time.monotonic() + 10
        while len(scrubs) == 1 and self._jobs.qsize() < 5 and time.monotonic() < deadline:
            time.sleep(0.01)  # the first scrub runs until the other five forgets have queued
        rewrite(self)

    monkeypatch.setattr(SqliteStore, "_rewrite_every_page", slow)
    store = SqliteStore(str(tmp_path / "feedback.db"), Commits())
    users = [f"user-{n}" for n in range(6)]
    store.append([event(u, "item", f"key-{u}") for u in users])
    first = threading.Thread(target=store.forget, args=(users[0],))
    first.start()
    while not scrubs:  # the first forget's scrub is running
        time.sleep(0.01)
    rest = [threading.Thread(target=store.forget, args=(u,)) for u in users[1:]]
    for t in rest:
        t.start()
    for t in [first, *rest]:
        t.join()
    assert all(store.user_events(u) == [] for u in users)
    assert len(scrubs) == 2, scrubs
    store.close()


def test_kill_9_while_appending_loses_no_acknowledged_event(tmp_path: Path) -> None:
    path = tmp_path / "feedback.db"
    rng = random.Random(11)
    acked: list[str] = []
    for round_ in range(3):
        acked += _append_until_killed(path, f"r{round_}", rng)
        store = SqliteStore(str(path), Commits())
        stored = {r.event.key for r in store.read_since(0) if isinstance(r, StoredEvent)}
        store.close()
        missing = [key for key in acked if key not in stored]
        assert missing == [], f"round {round_}: {len(missing)} acknowledged events lost"
    assert len(acked) > 3 * 20


def _append_until_killed(path: Path, tag: str, rng: random.Random) -> list[str]:
    """Run the appender, kill -9 it at a random moment after its first 20 acks, and return
    every key it printed in full (a line cut by the kill is not an ack)."""
    child = subprocess.Popen(
        [sys.executable, "-c", APPENDER, str(path), tag], stdout=subprocess.PIPE
    )
    assert child.stdout is not None
    lines: list[bytes] = []
    enough = threading.Event()
    wanted = 20 + rng.randrange(200)

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line)
            if len(lines) >= wanted:
                enough.set()
        enough.set()  # the child ended on its own: the test fails below, not here

    reader = threading.Thread(target=read)
    reader.start()
    enough.wait(60.0)
    time.sleep(rng.uniform(0.0, 0.05))  # land anywhere in an append
    child.send_signal(signal.SIGKILL)
    child.wait()
    reader.join()
    assert child.returncode == -signal.SIGKILL, "the appender died before it was killed"
    return [line.decode().rstrip("\n") for line in lines if line.endswith(b"\n")]


def _file_bytes(db: Path) -> bytes:
    """The database file and every companion (-wal, -shm, -journal)."""
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")))
