"""The one owner of the feedback store and of which loaded versions see its records.

Three paths deliver records to every attached version's `OnlineUsers`, and may overlap (each
user applies a seq once):

- live: `record` appends durably, then folds the events into every attached version before
  it answers, so the caller's next Recommend reflects them;
- replay: `attach` (a version being loaded, before the slot hands it out) reads the whole
  store, so folded users survive a restart and a version swap;
- follow: a thread reads the store every `feedback_poll_interval_s` from where it left off,
  which brings in what other replicas or worker processes wrote to a shared store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from bertrec.feedback.events import Erased, FeedbackEvent, Record, StoredEvent
from bertrec.feedback.store import FeedbackStore, StoreError
from bertrec.server.errors import DeadlineExceeded, NotReady, ServiceError, Unavailable
from bertrec.server.feedback_metrics import FeedbackMetrics
from bertrec.server.model import Model
from bertrec.server.online_users import OnlineUsers, no_tombstones

log = logging.getLogger(__name__)

PAGE = 10_000  # records per read of the store


class Feedback:
    """Durable feedback for the server's loaded versions.

    Args:
        store: the opened store (None: feedback calls answer FAILED_PRECONDITION).
        metrics: the feedback series.
        poll_interval_s: how often the follower reads what others wrote.
    """

    def __init__(
        self, store: FeedbackStore | None, metrics: FeedbackMetrics, poll_interval_s: float
    ) -> None:
        self.store = store
        self._metrics = metrics
        self._poll_s = poll_interval_s
        self._lock = threading.Lock()
        self._attached: list[OnlineUsers] = []
        self._cursor = 0  # the follower has applied every record up to here
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def users_for(self, model: Model) -> OnlineUsers:
        """A version's users, attached to the store and replayed (see the module doc).

        Raises:
            StoreError: the store cannot be read (the version then fails to load).
        """
        if self.store is None:
            return OnlineUsers(model, no_tombstones)
        model_users = OnlineUsers(model, self.store.user_hash)
        with self._lock:
            self._attached.append(model_users)
        started = time.perf_counter()
        cursor, total = 0, 0
        try:
            while True:
                page = self.store.read_since(cursor, PAGE)
                if not page:
                    break
                model_users.apply(page)
                cursor, total = page[-1].seq, total + len(page)
        except BaseException:
            self.detach(model_users)  # the version fails to load: nothing may keep it
            raise
        if self._thread is None:  # the follower starts where the first replay ended
            self._cursor = max(self._cursor, cursor)
        duration = time.perf_counter() - started
        self._metrics.replayed(duration)
        self._count_folded()
        log.info(
            "feedback: replayed %d records into version %d in %.2f s (%d folded users)",
            total, model_users.model.version, duration, model_users.folded_users,
        )  # fmt: skip
        return model_users

    def detach(self, users: OnlineUsers) -> None:
        with self._lock:
            if users in self._attached:
                self._attached.remove(users)

    def record(self, events: Sequence[FeedbackEvent], timeout_s: float) -> tuple[int, int]:
        """Store a checked batch durably, fold it into every attached version; returns
        (accepted, duplicates).

        Raises:
            NotReady: no store is configured.
            Unavailable: the store failed; the batch may have been stored (retry with the
                same keys).
        """
        store = self._require_store()
        deadline = time.monotonic() + timeout_s
        try:
            appended = store.append(events, timeout_s)
            stored: list[Record] = [
                StoredEvent(seq, event)
                for seq, event in zip(appended.seqs, events, strict=True)
                if seq is not None
            ]
            # A duplicate may be the retry of a write that outlived its first call: stored,
            # never folded in here. Folding what the store holds of its user makes this ack
            # mean the same (the next Recommend reflects the events; a seq applies once).
            retried = {e.user_id for e, s in zip(events, appended.seqs, strict=True) if s is None}
            for user_id in retried:
                stored.extend(store.user_events(user_id))
        except StoreError as exc:
            raise self._failed("append", exc, deadline) from exc
        self._deliver(sorted(stored, key=lambda r: r.seq))
        self._metrics.recorded(events, appended.seqs)
        return appended.accepted, appended.duplicates

    def rejected(self) -> None:
        """Count a batch refused whole by validation."""
        self._metrics.rejected()

    def forget(self, user_id: str, timeout_s: float) -> tuple[Erased, bool]:
        """Delete a user's events (durably) and their state on every attached version;
        returns what the store erased and whether the serving version had training factors
        for them (the last attached version is the newest)."""
        store = self._require_store()
        deadline = time.monotonic() + timeout_s
        try:
            erased = store.forget(user_id, timeout_s)
        except StoreError as exc:
            raise self._failed("forget", exc, deadline) from exc
        with self._lock:
            attached = list(self._attached)
        had = [users.forget(user_id, erased.tombstone) for users in attached]
        self._metrics.forgot()
        self._count_folded()
        return erased, any(had)

    def start(self) -> None:
        """Start following the store from where the replay on load ended."""
        if self.store is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._follow, name="feedback-follow", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self.store is not None:
            self.store.close()

    def _follow(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                page = self.store.read_since(self._cursor, PAGE) if self.store else []
            except StoreError as exc:
                self._metrics.store_failed("follow")
                log.warning("feedback: cannot read the store: %s", exc)
                continue
            if page:
                self._deliver(page)
                self._cursor = page[-1].seq

    def _deliver(self, records: Sequence[Record]) -> None:
        with self._lock:
            attached = list(self._attached)
        for users in attached:
            users.apply(records)
        self._count_folded()

    def _count_folded(self) -> None:
        """Set the folded-users gauge (a value, not a callback: with --workers the parent
        reads it from the workers' metric files, where no callback of theirs can run)."""
        self._metrics.folded.set(self._folded_users())

    def _folded_users(self) -> int:
        with self._lock:
            return self._attached[-1].folded_users if self._attached else 0

    def _failed(self, operation: str, exc: StoreError, deadline: float) -> ServiceError:
        """The status of a failed store call: the call's deadline when it ran out first (the
        write may still land), else the store's failure. The store's own message names where
        it lives (a path, a host): it goes to the log, not to the caller."""
        if time.monotonic() >= deadline:
            return DeadlineExceeded(
                f"the feedback store did not confirm the {operation} before the call's "
                "deadline; it may still land (resending with the same idempotency keys is safe)"
            )
        self._metrics.store_failed(operation)
        log.warning("feedback: %s failed: %s", operation, exc)
        return Unavailable(
            f"the feedback store failed the {operation}; resending (same keys) is safe"
        )

    def _require_store(self) -> FeedbackStore:
        if self.store is None:
            raise NotReady("no feedback store: start the server with --feedback-store URL")
        return self.store
