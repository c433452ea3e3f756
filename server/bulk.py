"""Bulk recommendations (RecommendBatch, StreamRecommendations): many users, one call.

Offline jobs (e-mails, precompute) ask for thousands of users at once. The ids are validated
up front (count, empty, duplicates), then ranked in chunks of the ranker's batch size: every
query of a chunk is queued before any is waited for, so a chunk fills whole ranking batches,
and the next chunk is queued while the caller turns the current one into a response, so the
ranker never waits for Python. At most two chunks are in flight, whatever the length of the
list: a stream is paced by its reader (backpressure), never materialised whole.

An unknown or forgotten user does not fail the job: its result has `found=False` and no rows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

import numpy as np

from bertrec.server import errors
from bertrec.server.engine import Call, Recommender
from bertrec.server.errors import Cancelled, DeadlineExceeded, InvalidArgument, NotFound
from bertrec.server.model import RankQuery, RankResult
from bertrec.server.online_users import UserState

_EMPTY_ROWS = np.empty(0, np.int64)
_Queued = tuple[UserState, Future[RankResult]]
_EMPTY_SCORES = np.empty(0, np.float32)


@dataclass(frozen=True)
class UserResult:
    """One user's ranked rows (best first); `found=False` (and no rows) for unknown users."""

    user_id: str
    found: bool
    rows: np.ndarray  # int64 (n,) catalogue rows
    scores: np.ndarray  # float32 (n,)
    ratings: np.ndarray  # float32 (n,) predicted ratings


def check_user_ids(user_ids: Sequence[str], limit: int, limit_name: str) -> None:
    """Reject an empty, oversized or repeating list, naming the offending `user_ids[i]`.

    Raises:
        InvalidArgument: no ids, more than `limit`, an empty id or a duplicate.
    """
    if not user_ids:
        raise InvalidArgument("user_ids is empty", "user_ids", errors.EMPTY)
    if len(user_ids) > limit:
        raise InvalidArgument(
            f"user_ids has {len(user_ids)} ids, more than {limit_name} {limit}",
            "user_ids", errors.TOO_MANY,
        )  # fmt: skip
    if len(set(user_ids)) == len(user_ids) and all(user_ids):
        return
    seen: set[str] = set()
    for i, user_id in enumerate(user_ids):
        if not user_id:
            raise InvalidArgument(f"user_ids[{i}] is empty", f"user_ids[{i}]", errors.EMPTY)
        if user_id in seen:
            raise InvalidArgument(
                f"user_ids[{i}] {user_id[:64]!r} is listed more than once", f"user_ids[{i}]",
                errors.DUPLICATE,
            )  # fmt: skip
        seen.add(user_id)


class _Chunk:
    """The queued queries of one chunk: (user id, its state and future; None: unknown user)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, _Queued | None]] = []

    def cancel(self) -> None:
        for _, queued in self.entries:
            future = queued and queued[1]
            if future is not None:
                future.cancel()


class BulkRanking:
    """Ranks a validated list of users chunk by chunk for one call.

    Args:
        recommender: the leased version's recommender.
        user_ids: validated ids (see `check_user_ids`).
        k: items per user (already resolved: 1..max_k).
        exclude_rated: leave out each user's rated items.
        call: the call's deadline and cancellation hook.
        chunk_size: queries queued together (the ranker's batch size).
    """

    def __init__(
        self,
        recommender: Recommender,
        user_ids: Sequence[str],
        k: int,
        exclude_rated: bool,
        call: Call,
        chunk_size: int,
    ) -> None:
        self._rec = recommender
        self._ids = user_ids
        self._k = k
        self._exclude_rated = exclude_rated
        self._call = call
        self._chunk_size = max(1, chunk_size)
        self._lock = threading.Lock()
        self._in_flight: list[_Chunk] = []
        self._cancelled = False
        # One callback per call (not per query): the client leaving cancels what is queued.
        if call.on_done is not None and not call.on_done(self.cancel):
            self._cancelled = True

    def cancel(self) -> None:
        """Withdraw every queued query (the caller left or the stream was closed)."""
        with self._lock:
            self._cancelled = True
            chunks, self._in_flight = self._in_flight, []
        for chunk in chunks:
            chunk.cancel()

    def chunks(self) -> Iterator[list[UserResult]]:
        """Each chunk's results, in request order; the next chunk is queued before this one
        is handed out, so ranking overlaps the caller's response building."""
        try:
            if not self._ids:
                return
            current = self._submit(0)
            for start in range(0, len(self._ids), self._chunk_size):
                after = start + self._chunk_size
                ahead = self._submit(after) if after < len(self._ids) else None
                yield self._collect(current)
                if ahead is None:
                    return
                current = ahead
        finally:
            self.cancel()

    def _submit(self, start: int) -> _Chunk:
        deadline_s = self._call.deadline_s
        if time.monotonic() >= deadline_s:
            raise DeadlineExceeded("deadline exceeded before every user was ranked")
        chunk = _Chunk()
        with self._lock:
            if self._cancelled:
                raise Cancelled("call cancelled by the client")
            self._in_flight.append(chunk)
        try:
            for user_id in self._ids[start : start + self._chunk_size]:
                chunk.entries.append((user_id, self._queue(user_id, deadline_s)))
        except BaseException:
            chunk.cancel()
            raise
        return chunk

    def _queue(self, user_id: str, deadline_s: float) -> _Queued | None:
        try:
            user = self._rec.users.lookup(user_id)
        except NotFound:
            return None
        exclude = user.seen if self._exclude_rated and len(user.seen) else None
        query = RankQuery(user.vector, self._k, exclude, None, user.row, user.rating)
        return user, self._rec.ranker.submit(query, deadline_s)

    def _collect(self, chunk: _Chunk) -> list[UserResult]:
        results: list[UserResult] = []
        try:
            for user_id, queued in chunk.entries:
                if queued is None:
                    results.append(UserResult(user_id, False, _EMPTY_ROWS, _EMPTY_SCORES,
                                              _EMPTY_SCORES))  # fmt: skip
                    continue
                user, future = queued
                ranked = self._wait(future)
                ratings = ranked.ratings
                if ratings is None:  # not from `Model.rank` (a stand-in model)
                    ratings = self._rec.model.predicted_ratings(
                        user.vector, ranked.rows, user.row, user.rating
                    )
                results.append(UserResult(user_id, True, ranked.rows, ranked.scores, ratings))
        except BaseException:
            chunk.cancel()
            raise
        with self._lock:
            if chunk in self._in_flight:
                self._in_flight.remove(chunk)
        return results

    def _wait(self, future: Future[RankResult]) -> RankResult:
        try:
            return future.result(timeout=max(self._call.deadline_s - time.monotonic(), 0.0))
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded before every user was ranked") from None
        except CancelledError:
            raise Cancelled("call cancelled by the client") from None
