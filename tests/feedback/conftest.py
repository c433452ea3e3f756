"""Fixtures of the feedback store tests: one real redis-server for the session (each test
gets its own key prefix, so tests never see each other's records), and `backend`, which runs
a contract test once on SQLite and once on Redis."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from redis_harness import RedisServer, need_redis_server, redis_server

from bertrec.feedback.events import FeedbackEvent, FeedbackKind
from bertrec.feedback.store import FeedbackStore, open_store


@dataclass
class Commits:
    """A `CommitObserver` that keeps every commit it is told about."""

    seen: list[tuple[float, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def committed(self, duration_s: float, events: int, calls: int) -> None:
        with self.lock:
            self.seen.append((duration_s, events, calls))

    @property
    def calls(self) -> int:
        return sum(c for _, _, c in self.seen)

    @property
    def events(self) -> int:
        return sum(e for _, e, _ in self.seen)


@dataclass
class Backend:
    """One store kind under test.

    Attributes:
        name: "sqlite" or "redis".
        url: a store of its own for this test (opened as often as the test likes).
        poison: makes every later write that touches this user fail inside the store,
            the way a disk error or a broken key would.
    """

    name: str
    url: str
    poison: Callable[[str], None]

    def open(self, observer: Commits | None = None) -> FeedbackStore:
        return open_store(self.url, observer)


def event(user: str, item: str, key: str, rating: float = 4.0) -> FeedbackEvent:
    kind = FeedbackKind.RATING if rating else FeedbackKind.CLICK
    return FeedbackEvent(user, item, kind, rating, 1_700_000_000.5, key)


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    need_redis_server()
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "feedback.db"
        return Backend("sqlite", f"sqlite://{path}", lambda user: _poison_sqlite(path, user))
    server: RedisServer = request.getfixturevalue("shared_redis")
    prefix = f"test-{uuid.uuid4().hex[:12]}"

    def poison(user: str) -> None:  # a string where the user's hash belongs
        with server.client() as client:
            client.set(f"{prefix}:user:{user}", "not a hash")

    return Backend("redis", f"{server.url}?prefix={prefix}", poison)


@pytest.fixture
def commits() -> Commits:
    return Commits()


@pytest.fixture
def store(backend: Backend, commits: Commits) -> Iterator[FeedbackStore]:
    opened = backend.open(commits)
    yield opened
    opened.close()


def _poison_sqlite(path: Path, user: str) -> None:
    quoted = "'" + user.replace("'", "''") + "'"  # a trigger cannot take bound parameters
    with sqlite3.connect(path) as conn:
        conn.execute(
            f"CREATE TRIGGER poison_{uuid.uuid4().hex} BEFORE INSERT ON events"
            f" WHEN NEW.user_id = {quoted} BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
        )
