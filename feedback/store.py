"""The feedback store contract and its choice by URL.

A store is an append-only, ordered log of `Record`s (events and tombstones) with three
guarantees the server builds on:

- `append` returns only once the batch is on stable storage (fsync'd), and stores all of it
  or none of it; an event whose idempotency key the store already holds for the same user is
  skipped (keys are per user: a caller who guesses another user's key cannot swallow that
  user's event).
- every record gets a `seq` larger than every record before it, never reused, so
  `read_since(cursor)` lets any number of readers (replicas, worker processes, a replay on
  start) follow the log and see each record once, in order.
- `forget` deletes every event of a user and appends a tombstone holding only a salted hash
  of the id (`user_hash`), so nothing of the user remains while training can still leave
  them out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from bertrec.errors import BertrecError
from bertrec.feedback.events import (
    Appended,
    Erased,
    FeedbackEvent,
    Forgotten,
    Record,
    StoredEvent,
)

SQLITE_SCHEME = "sqlite://"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class StoreError(BertrecError):
    """The store cannot be reached or cannot write; nothing of the failed call was stored."""


class CommitObserver(Protocol):
    """Told about every durable write (the server's metrics)."""

    def committed(self, duration_s: float, events: int, calls: int) -> None:
        """One write to stable storage took `duration_s` and carried `events` events of
        `calls` calls (group commit: many callers share one fsync)."""


class NoObserver:
    def committed(self, duration_s: float, events: int, calls: int) -> None:
        pass


class FeedbackStore(Protocol):
    """A durable, ordered log of feedback records (see the module docstring)."""

    url: str  # where it lives, without credentials (for logs and metrics)

    def append(self, events: Sequence[FeedbackEvent], timeout_s: float | None = None) -> Appended:
        """Store a batch durably, all or nothing; returns once it is on stable storage.

        Raises:
            StoreError: the store failed or `timeout_s` passed; the batch may or may not
                have been stored (a retry with the same keys is safe).
        """
        ...

    def forget(self, user_id: str, timeout_s: float | None = None) -> Erased:
        """Delete every event of `user_id` and append their tombstone, durably."""
        ...

    def read_since(self, cursor: int, limit: int = 10_000) -> list[Record]:
        """Up to `limit` records with seq > `cursor`, in seq order (0: from the start)."""
        ...

    def user_events(self, user_id: str) -> list[StoredEvent]:
        """Every stored event of one user, in seq order."""
        ...

    def tombstones(self) -> list[Forgotten]:
        """Every tombstone, in seq order."""
        ...

    def user_hash(self, user_id: str) -> str:
        """The salted hash tombstones hold for `user_id` (the salt is the store's own)."""
        ...

    def close(self) -> None:
        """Finish pending writes and release the store."""
        ...


def scoped_key(user_id: str, key: str) -> str:
    """The (user, idempotency key) pair as one unambiguous string (ids may hold any
    character, so the user id is length-prefixed rather than joined by a separator)."""
    return f"{len(user_id)}:{user_id}{key}"


def salted_hash(salt: str, user_id: str) -> str:
    """hex SHA-256 of salt + user id: a tombstone identifies a user only to whoever has both."""
    return hashlib.sha256(f"{salt}\0{user_id}".encode()).hexdigest()


def open_store(url: str, observer: CommitObserver | None = None) -> FeedbackStore:
    """The store a URL names: `sqlite://PATH` (`sqlite:///abs/path.db` or
    `sqlite://relative.db`) or `redis://[user:password@]host:port/db` (also `rediss://`).

    Raises:
        StoreError: an unknown scheme, or the store cannot be opened.
    """
    observer = observer or NoObserver()
    if url.startswith(SQLITE_SCHEME):
        from bertrec.feedback.sqlite_store import SqliteStore

        return SqliteStore(url[len(SQLITE_SCHEME) :], observer)
    if url.startswith(REDIS_SCHEMES):
        from bertrec.feedback.redis_store import RedisStore

        return RedisStore(url, observer)
    raise StoreError(
        f"feedback store {url!r}: unknown scheme (use sqlite://PATH or redis://host:port/db)"
    )
