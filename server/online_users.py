"""The users one loaded version knows right now: its training users, plus everyone folded in
from feedback, minus everyone forgotten.

One `OnlineUsers` per loaded version (its item factors decide the folded vectors), fed only by
`server/feedback.py` with records in the store's order. Writers take the lock; `lookup` reads
one dict entry of immutable `UserState`s without it, so a Recommend never waits for a fold-in.

Applying a record twice is harmless (each user keeps the seqs it applied), which is what lets
a replay on load, the live path and the follower of other replicas' writes overlap freely. A
forget is remembered by its tombstone's seq, so a replayed event older than the forget cannot
bring the user back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from bertrec.feedback.events import FeedbackEvent, FeedbackKind, Forgotten, Record, StoredEvent
from bertrec.server.errors import NotFound
from bertrec.server.fold_in import FoldIn, RatingUser, Touch
from bertrec.server.model import Model


@dataclass(frozen=True)
class UserState:
    """What a call needs about one user on one version.

    Attributes:
        row: the user's training row when the version's arrays describe them (frozen users);
            None for folded users, whose parameters are below.
        vector: ranking-space vector, float32 (d,).
        seen: item rows `exclude_rated` leaves out (training pairs and feedback), int64.
        rating: a folded user's rating-head parameters (None: the arrays at `row`).
        touches: a folded user's (item rows, weights, preferences), for explanations.
    """

    row: int | None
    vector: np.ndarray
    seen: np.ndarray
    rating: RatingUser | None = None
    touches: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


@dataclass
class _History:
    """Everything folded for one user on this version (guarded by `OnlineUsers._lock`).

    Besides the events it keeps the user's normal equations and rating prior, so a new event
    updates them for the items it touched (O(d^2) each) instead of rebuilding them over every
    training pair: for a user with hundreds of training ratings that was milliseconds a call.
    """

    seqs: set[int] = field(default_factory=set)
    by_item: dict[int, list[tuple[int, FeedbackEvent]]] = field(default_factory=dict)  # seq, event
    dirty: set[int] = field(default_factory=set)  # item rows with events not yet folded in
    # The folded state, valid for `row` (None: cold, or training factors masked):
    built: bool = False
    row: int | None = None
    training: dict[int, Touch] = field(default_factory=dict)
    touches: dict[int, Touch] = field(default_factory=dict)
    ratings: dict[int, float] = field(default_factory=dict)  # the latest rating per item
    system: np.ndarray | None = None
    rhs: np.ndarray | None = None
    prior: tuple[np.ndarray, np.ndarray] | None = None

    def item_events(self, item: int) -> list[FeedbackEvent]:
        """The events of one item in the order they happened (client time, then seq)."""
        found = sorted(self.by_item.get(item, ()), key=lambda f: (f[1].occurred_at, f[0]))
        return [event for _, event in found]


class OnlineUsers:
    """Users of one version, updated by feedback records.

    Args:
        model: the loaded version.
        user_hash: the store's salted hash of a user id (tombstones carry only that).
    """

    def __init__(self, model: Model, user_hash: Callable[[str], str]) -> None:
        self.model = model
        self._hash = user_hash
        self._fold = FoldIn(model.arrays, model.manifest.scoring.rating_range[1])
        self._lock = threading.Lock()
        self._histories: dict[str, _History] = {}
        self._folded: dict[str, UserState] = {}  # read without the lock
        self._masked: dict[int, int] = {}  # training row of a forgotten user -> tombstone seq
        self._forgotten: dict[str, int] = {}  # user hash -> tombstone seq
        self._rows_by_hash: dict[str, int] | None = None  # built on the first hashed forget

    @property
    def folded_users(self) -> int:
        return len(self._folded)

    def lookup(self, user_id: str) -> UserState:
        """The user's current state. Raises NotFound for unknown and forgotten users."""
        state = self._folded.get(user_id)
        if state is not None:
            return state
        row = self.model.training_row(user_id)
        if row is None or row in self._masked:
            raise NotFound(f"unknown user_id {user_id!r}")
        return UserState(row, self.model.user_vector(row), self.model.rated_rows(row))

    def has_training_factors(self, user_id: str) -> bool:
        row = self.model.training_row(user_id)
        return row is not None and row not in self._masked

    def apply(self, records: Iterable[Record]) -> int:
        """Fold events in and honour tombstones, in order; returns the users re-solved."""
        changed: set[str] = set()
        with self._lock:
            for record in records:
                if isinstance(record, Forgotten):
                    remaining = self._forget_hash(record)
                    changed = {u for u in changed if u in self._histories} | remaining
                elif self._add(record):
                    changed.add(record.event.user_id)
            for user_id in changed:
                self._folded[user_id] = self._solve(user_id, self._histories[user_id])
        return len(changed)

    def forget(self, user_id: str, tombstone: Forgotten) -> bool:
        """Drop a user's folded state and mask their training row; returns whether the
        version had training factors for them."""
        with self._lock:
            self._remember(tombstone)
            row = self.model.training_row(user_id)
            # The follower may have applied this same tombstone first: that still counts.
            had = row is not None and self._masked.get(row, tombstone.seq) == tombstone.seq
            if row is not None:
                self._masked.setdefault(row, tombstone.seq)
            if self._truncate(user_id, tombstone.seq):
                self._folded[user_id] = self._solve(user_id, self._histories[user_id])
            return had

    def _add(self, stored: StoredEvent) -> bool:
        event = stored.event
        if self._forgotten:
            gone = self._forgotten.get(self._hash(event.user_id))
            if gone is not None and stored.seq < gone:
                return False  # deleted by a later forget; a replay read it before that
        row = self.model.item_row(event.item_id)
        if row is None:
            return False  # an item of another version's catalogue
        history = self._histories.setdefault(event.user_id, _History())
        if stored.seq in history.seqs:
            return False
        history.seqs.add(stored.seq)
        history.by_item.setdefault(row, []).append((stored.seq, event))
        history.dirty.add(row)
        return True

    def _forget_hash(self, tombstone: Forgotten) -> set[str]:
        """Honour a tombstone known only by its hash; returns the users whose newer events
        remain (to re-solve, now without their training row)."""
        self._remember(tombstone)
        row = self._training_rows_by_hash().get(tombstone.user_hash)
        if row is not None:
            self._masked.setdefault(row, tombstone.seq)
        users = [u for u in self._histories if self._hash(u) == tombstone.user_hash]
        return {u for u in users if self._truncate(u, tombstone.seq)}

    def _remember(self, tombstone: Forgotten) -> None:
        known = self._forgotten.get(tombstone.user_hash, 0)
        self._forgotten[tombstone.user_hash] = max(tombstone.seq, known)

    def _truncate(self, user_id: str, seq: int) -> bool:
        """Drop the user's events older than a tombstone at `seq` (those it deleted) and keep
        newer ones, which may have arrived first (the follower and the live path race);
        returns whether any remain."""
        history = self._histories.get(user_id)
        if history is not None:
            kept = {i: [e for e in es if e[0] > seq] for i, es in history.by_item.items()}
            history.by_item = {i: es for i, es in kept.items() if es}
            history.seqs = {s for es in history.by_item.values() for s, _ in es}
            history.built = False  # rebuilt from what is left, without the training row
            if history.by_item:
                return True
        self._histories.pop(user_id, None)
        self._folded.pop(user_id, None)
        return False

    def _training_rows_by_hash(self) -> dict[str, int]:
        """Training row of each user's salted hash: one pass over the version's user ids,
        only once a tombstone arrives without its user id (replay, other replicas)."""
        if self._rows_by_hash is None:
            ids = self.model.arrays.user_ids.tolist()
            self._rows_by_hash = {self._hash(str(u)): row for row, u in enumerate(ids)}
        return self._rows_by_hash

    def _solve(self, user_id: str, history: _History) -> UserState:
        """Re-solve the user from their training pairs (unless forgotten) and every event:
        the first time (or after a forget) from scratch, then item by item."""
        row = self.model.training_row(user_id)
        if row is not None and row in self._masked:
            row = None
        fold = self._fold
        if not history.built or history.row != row:
            history.row, history.built = row, True
            history.training = fold.training_touches(row)
            history.touches = dict(history.training)
            history.ratings = {}
            history.dirty = set(history.by_item)
            for item in history.dirty:
                self._merge_item(history, item)
            history.system, history.rhs = fold.normal_equations(history.touches)
            history.prior = fold.rating_prior(row)
        else:
            assert history.system is not None and history.rhs is not None
            for item in history.dirty:
                old = history.touches.get(item)
                new = self._merge_item(history, item)
                fold.update(history.system, history.rhs, item, old, new)
        history.dirty = set()
        assert history.system is not None and history.rhs is not None
        assert history.prior is not None
        touches = history.touches
        rows = np.fromiter(touches.keys(), np.int64, len(touches))
        weights = np.fromiter((t.weight for t in touches.values()), np.float64, len(touches))
        prefs = np.fromiter((t.preference for t in touches.values()), np.float64, len(touches))
        return UserState(
            row=None,
            vector=fold.solve(history.system, history.rhs),
            seen=np.sort(rows),
            rating=fold.rating_step(history.prior, history.ratings),
            touches=(rows, weights, prefs),
        )

    def _merge_item(self, history: _History, item: int) -> Touch | None:
        """One item's evidence from its training pair and its events: the latest rating
        replaces earlier ones (and the training pair); clicks, purchases and skips add."""
        base = history.training.get(item)
        added: list[Touch] = []
        for event in history.item_events(item):
            touch = self._fold.confidence(event.kind, event.rating)
            if event.kind is FeedbackKind.RATING:
                base = touch
                history.ratings[item] = event.rating
            else:
                added.append(touch)
        merged = _merge([base, *added] if base is not None else added) if added else base
        if merged is None:
            history.touches.pop(item, None)
        else:
            history.touches[item] = merged
        return merged


def _merge(touches: list[Touch]) -> Touch:
    weight = sum(t.weight for t in touches)
    preference = sum(t.weight * t.preference for t in touches) / weight if weight else 0.0
    return Touch(weight, preference)


def no_tombstones(user_id: str) -> str:
    """The hash of a version without a feedback store: never asked, as no record arrives."""
    raise AssertionError("no feedback store: no tombstones to match")
