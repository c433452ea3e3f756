"""What a feedback event is, as stored and replayed: plain frozen dataclasses, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FeedbackKind(enum.Enum):
    """What a user did with an item (the proto's `FeedbackKind`, by name)."""

    RATING = "rating"
    CLICK = "click"
    PURCHASE = "purchase"
    SKIP = "skip"


@dataclass(frozen=True)
class FeedbackEvent:
    """One reaction of one user to one item, validated (see server/feedback.py).

    Attributes:
        user_id: external user id (any non-empty id).
        item_id: external item id.
        kind: what happened.
        rating: the rating for `FeedbackKind.RATING`; 0.0 otherwise.
        occurred_at: seconds since the Unix epoch, by the client's clock.
        key: the idempotency key; the store holds each key at most once.
    """

    user_id: str
    item_id: str
    kind: FeedbackKind
    rating: float
    occurred_at: float
    key: str


@dataclass(frozen=True)
class StoredEvent:
    """An event as the store holds it: `seq` orders it among every record of the store."""

    seq: int
    event: FeedbackEvent


@dataclass(frozen=True)
class Forgotten:
    """The tombstone of a forgotten user: their salted hash (never the id) and its place in
    the store's order; every event of that user with a smaller `seq` was deleted."""

    seq: int
    user_hash: str


Record = StoredEvent | Forgotten


@dataclass(frozen=True)
class Appended:
    """The outcome of one `append`: per event of the batch, its new `seq`, or None where the
    store already held the event's key (a duplicate, neither stored nor to be applied)."""

    seqs: tuple[int | None, ...]

    @property
    def accepted(self) -> int:
        return sum(s is not None for s in self.seqs)

    @property
    def duplicates(self) -> int:
        return sum(s is None for s in self.seqs)


@dataclass(frozen=True)
class Erased:
    """The outcome of `forget`: how many events were deleted and the tombstone written."""

    events_deleted: int
    tombstone: Forgotten
