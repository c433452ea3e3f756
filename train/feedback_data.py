"""Fold a feedback store into the next training run (`bertrec train --feedback STORE_URL`).

The server keeps every acknowledged event in the store and folds it into the served user
vectors at once; the next training run is where the item side and the encoder learn from it
too. This module turns the store's log into training rows:

- RATING events become rating rows. For a user+item pair rated more than once (in the store,
  or in the store and the ratings file), the latest by `occurred_at` wins; on a tie the store
  wins (it was recorded after the file was written). Users unknown to the ratings file become
  new users; items unknown to the catalogue (the ratings file's items and the item texts) are
  dropped and counted, since no item row could hold them.
- CLICK, PURCHASE and SKIP carry no rating. Both heads train on ratings: the rating head
  needs a value, and the ranking head's confidences are derived from ratings (heads.py), so
  giving it implicit pairs would mean a second interaction matrix just for it. They are
  counted and reported as not used by training; they steer only the served fold-in.
- Tombstones: every row of the ratings file (and of a `--test` file) whose user's salted hash
  (`store.user_hash`) is a tombstone is left out, because the forget came after the file was
  written. The store's own events of that user were recorded after the forget (the store
  deleted the earlier ones) and stay; an event the store still holds from before its user's
  tombstone (which the store contract rules out) is dropped all the same.

Only counts leave this module (the summary, recorded in the training metrics): never an id.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.errors import BertrecError
from bertrec.feedback.events import FeedbackEvent, FeedbackKind, Forgotten, StoredEvent
from bertrec.feedback.store import SQLITE_SCHEME, FeedbackStore, open_store
from bertrec.train.dataset import Dataset, Ratings

log = logging.getLogger(__name__)

PAGE = 10_000  # records per read_since call
Pair = tuple[str, str]  # (user id, item id)

# Reasons an event does not become a training row (the summary's `skipped` keys).
UNKNOWN_ITEM = "unknown_item"
SUPERSEDED = "superseded"  # a later rating of the same user+item won
BEFORE_FORGET = "before_forget"
BAD_RATING = "bad_rating"  # not a finite number (the server rejects these; kept for safety)
NOT_RATING = {k: f"{k.value}_not_used" for k in FeedbackKind if k is not FeedbackKind.RATING}


@dataclass(frozen=True)
class FeedbackLog:
    """Everything a store holds: its events in seq order and, per forgotten user's hash, the
    seq of their latest tombstone."""

    events: tuple[StoredEvent, ...]
    tombstones: dict[str, int]


@dataclass(frozen=True)
class FeedbackSummary:
    """What folding the store did, in counts only (safe to log and to put in a manifest)."""

    events: int  # events read from the store
    ratings_used: int  # rating rows added from the store
    new_users: int  # users of those rows the ratings file did not have
    file_ratings_replaced: int  # ratings-file rows a later store rating replaced
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> events
    users_forgotten: int = 0  # distinct tombstone hashes in the store
    file_users_forgotten: int = 0  # users of the ratings file left out
    file_ratings_forgotten: int = 0  # rows of the ratings file left out
    test_ratings_forgotten: int = 0  # rows of the --test file left out

    def line(self) -> str:
        """One line for the console and the log."""
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()) if n)
        return (
            f"feedback: {self.events} events, {self.ratings_used} ratings used "
            f"({self.new_users} new users, {self.file_ratings_replaced} file ratings replaced); "
            f"skipped: {skipped or 'none'}; {self.users_forgotten} users forgotten "
            f"({self.file_ratings_forgotten} ratings of {self.file_users_forgotten} users "
            f"and {self.test_ratings_forgotten} test ratings left out)"
        )

    def as_metrics(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "ratings_used": self.ratings_used,
            "new_users": self.new_users,
            "file_ratings_replaced": self.file_ratings_replaced,
            "skipped": dict(sorted(self.skipped.items())),
            "users_forgotten": self.users_forgotten,
            "file_users_forgotten": self.file_users_forgotten,
            "file_ratings_forgotten": self.file_ratings_forgotten,
            "test_ratings_forgotten": self.test_ratings_forgotten,
        }


@dataclass(frozen=True)
class Folded:
    """The training data with the store folded in, and the (optional) test file without the
    forgotten users."""

    dataset: Dataset
    test: Ratings | None
    summary: FeedbackSummary


def fold_feedback(url: str, dataset: Dataset, test: Ratings | None = None) -> Folded:
    """Read the store at `url` and fold it into `dataset` (see the module docstring).

    Raises:
        BertrecError: the store is missing (a sqlite file that does not exist) or unreadable.
    """
    _check_exists(url)
    store = open_store(url)
    try:
        feedback = read_log(store)
        dataset, summary = merge_feedback(dataset, feedback, store.user_hash)
        if test is not None:
            test, _, rows = leave_out_forgotten(test, feedback.tombstones, store.user_hash)
            summary = replace(summary, test_ratings_forgotten=rows)
    finally:
        store.close()
    log.info("%s", summary.line())
    return Folded(dataset, test, summary)


def _check_exists(url: str) -> None:
    """open_store creates a missing sqlite file; for training a typo must not read as an empty
    store (it would silently keep forgotten users in)."""
    if url.startswith(SQLITE_SCHEME):
        path = Path(url[len(SQLITE_SCHEME) :]).expanduser()
        if not path.is_file():
            raise BertrecError(f"feedback store {url}: no such file {path}")


def read_log(store: FeedbackStore, page: int = PAGE) -> FeedbackLog:
    """Every record of `store`, paged with `read_since`."""
    events: list[StoredEvent] = []
    tombstones: dict[str, int] = {}
    cursor = 0
    while records := store.read_since(cursor, page):
        for record in records:
            if isinstance(record, Forgotten):
                tombstones[record.user_hash] = max(record.seq, tombstones.get(record.user_hash, 0))
            else:
                events.append(record)
        cursor = records[-1].seq
    return FeedbackLog(tuple(events), tombstones)


def merge_feedback(
    dataset: Dataset, feedback: FeedbackLog, user_hash: Callable[[str], str]
) -> tuple[Dataset, FeedbackSummary]:
    """`dataset` without its forgotten users' ratings, plus the store's ratings (latest wins).

    Args:
        dataset: the ratings file and item texts.
        feedback: the store's log (`read_log`).
        user_hash: the store's salted hash of a user id (`FeedbackStore.user_hash`).
    """
    catalogue = set(dataset.ratings.item_ids.tolist()) | dataset.item_texts.keys()
    kept, forgotten_users, forgotten_rows = leave_out_forgotten(
        dataset.ratings, feedback.tombstones, user_hash
    )
    latest, skipped = latest_ratings(feedback, catalogue, user_hash)
    replaced, lost = _rows_replaced(kept, latest)
    skipped[SUPERSEDED] += len(lost)
    winners = [e for pair, e in latest.items() if pair not in lost]
    file_users = set(kept.user_ids.tolist())
    summary = FeedbackSummary(
        events=len(feedback.events),
        ratings_used=len(winners),
        new_users=len({e.user_id for e in winners} - file_users),
        file_ratings_replaced=int(replaced.sum()),
        skipped={why: n for why, n in skipped.items() if n},
        users_forgotten=len(feedback.tombstones),
        file_users_forgotten=forgotten_users,
        file_ratings_forgotten=forgotten_rows,
    )
    ratings = _concat(kept.subset(~replaced), _as_ratings(winners))
    return Dataset(ratings, dataset.item_texts), summary


def leave_out_forgotten(
    ratings: Ratings, tombstones: dict[str, int], user_hash: Callable[[str], str]
) -> tuple[Ratings, int, int]:
    """`ratings` without the rows of users whose hash is a tombstone; and how many users and
    rows were left out."""
    if not tombstones:
        return ratings, 0, 0
    gone = {u for u in set(ratings.user_ids.tolist()) if user_hash(u) in tombstones}
    if not gone:
        return ratings, 0, 0
    drop = _members(ratings.user_ids, gone)
    return ratings.subset(~drop), len(gone), int(drop.sum())


def latest_ratings(
    feedback: FeedbackLog, catalogue: set[str], user_hash: Callable[[str], str]
) -> tuple[dict[Pair, FeedbackEvent], Counter[str]]:
    """The latest RATING event per user+item (by occurred_at, then seq), and per reason the
    events that are not among them."""
    skipped: Counter[str] = Counter({SUPERSEDED: 0})
    forgotten_at = _tombstone_seqs(feedback, user_hash)
    latest: dict[Pair, StoredEvent] = {}
    for stored in feedback.events:
        e = stored.event
        reason = _unusable(stored, catalogue, forgotten_at)
        if reason:
            skipped[reason] += 1
            continue
        pair = (e.user_id, e.item_id)
        before = latest.get(pair)
        if before is not None:
            skipped[SUPERSEDED] += 1
            if (before.event.occurred_at, before.seq) > (e.occurred_at, stored.seq):
                continue
        latest[pair] = stored
    return {pair: s.event for pair, s in latest.items()}, skipped


def _unusable(stored: StoredEvent, catalogue: set[str], forgotten_at: dict[str, int]) -> str:
    """Why an event cannot become a training row ("" when it can)."""
    e = stored.event
    if stored.seq < forgotten_at.get(e.user_id, 0):
        return BEFORE_FORGET
    if e.kind is not FeedbackKind.RATING:
        return NOT_RATING[e.kind]
    if e.item_id not in catalogue:
        return UNKNOWN_ITEM
    if not math.isfinite(e.rating):
        return BAD_RATING
    return ""


def _tombstone_seqs(feedback: FeedbackLog, user_hash: Callable[[str], str]) -> dict[str, int]:
    """Per user id of the log that has a tombstone: the tombstone's seq."""
    if not feedback.tombstones:
        return {}
    users = {s.event.user_id for s in feedback.events}
    hashes = {u: user_hash(u) for u in users}
    return {u: feedback.tombstones[h] for u, h in hashes.items() if h in feedback.tombstones}


def _rows_replaced(
    ratings: Ratings, latest: dict[Pair, FeedbackEvent]
) -> tuple[np.ndarray, set[Pair]]:
    """Which file rows a store rating replaces (mask), and which store ratings lose to a later
    file row of the same pair."""
    replaced = np.zeros(len(ratings), dtype=bool)
    if not latest:
        return replaced, set()
    candidates = np.flatnonzero(_members(ratings.user_ids, {u for u, _ in latest}))
    file_time: dict[Pair, int] = {}
    for row in candidates.tolist():
        pair = (ratings.user_ids[row], ratings.item_ids[row])
        if pair in latest:
            file_time[pair] = max(int(ratings.timestamps[row]), file_time.get(pair, 0))
    lost = {pair for pair, t in file_time.items() if t > latest[pair].occurred_at}
    for row in candidates.tolist():
        pair = (ratings.user_ids[row], ratings.item_ids[row])
        replaced[row] = pair in latest and pair not in lost
    return replaced, lost


def _members(ids: np.ndarray, wanted: set[str]) -> np.ndarray:
    return np.fromiter((i in wanted for i in ids), dtype=bool, count=len(ids))


def _as_ratings(events: Iterable[FeedbackEvent]) -> Ratings:
    rows = list(events)
    return Ratings.from_columns(
        user_ids=[e.user_id for e in rows],
        item_ids=[e.item_id for e in rows],
        ratings=[e.rating for e in rows],
        timestamps=[int(e.occurred_at) for e in rows],
    )


def _concat(a: Ratings, b: Ratings) -> Ratings:
    return Ratings(
        user_ids=np.concatenate([a.user_ids, b.user_ids]),
        item_ids=np.concatenate([a.item_ids, b.item_ids]),
        ratings=np.concatenate([a.ratings, b.ratings]),
        reviews=np.concatenate([a.reviews, b.reviews]),
        timestamps=np.concatenate([a.timestamps, b.timestamps]),
    )
