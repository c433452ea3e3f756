"""Feedback events as the Python client sends them, and what the server answers.

`Feedback` is the caller's view of one event: the kind by name, the time as a `datetime` or
Unix seconds, and an idempotency key that defaults to a random UUID made when the event is
built. Made then (not per call) so that sending the same `Feedback` objects again, after a
timeout that left the outcome unknown, stores them once: gRPC's own retries resend the same
bytes, and a caller's retry resends the same keys.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from bertrec.feedback.events import FeedbackKind
from bertrec.v1 import recommender_pb2 as pb

__all__ = ["Feedback", "FeedbackKind", "FeedbackRecorded", "UserForgotten"]

_KIND_TO_PB = {
    FeedbackKind.RATING: pb.FEEDBACK_KIND_RATING,
    FeedbackKind.CLICK: pb.FEEDBACK_KIND_CLICK,
    FeedbackKind.PURCHASE: pb.FEEDBACK_KIND_PURCHASE,
    FeedbackKind.SKIP: pb.FEEDBACK_KIND_SKIP,
}


@dataclass(frozen=True)
class Feedback:
    """One reaction of one user to one item, to send with `record_feedback`.

    Attributes:
        user_id: external user id; one the model has never seen becomes a known user.
        item_id: external item id, in the served model's catalogue.
        kind: a `FeedbackKind` or its name: "rating", "click", "purchase" or "skip".
        rating: the rating of a "rating" event (within the model's rating range); None for
            the other kinds.
        occurred_at: when it happened: a timezone-aware `datetime` or Unix seconds; None
            means when the server receives it.
        idempotency_key: the event's key (at most 128 bytes); None gives a random UUID, fixed
            from then on, so resending this object can never store it twice.

    Raises:
        ValueError: an unknown kind, a rating missing from a rating event or given to another
            kind, a naive `datetime`, or an empty key.
    """

    user_id: str
    item_id: str
    kind: FeedbackKind | str
    rating: float | None = None
    occurred_at: datetime | float | None = None
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        kind = _kind(self.kind)
        object.__setattr__(self, "kind", kind)
        if kind is FeedbackKind.RATING and self.rating is None:
            raise ValueError("a rating event needs a rating")
        if kind is not FeedbackKind.RATING and self.rating is not None:
            raise ValueError(f"a {kind.value} event has no rating (got {self.rating})")
        if isinstance(self.occurred_at, datetime) and self.occurred_at.utcoffset() is None:
            # A naive datetime would be read in this machine's time zone, silently.
            raise ValueError("occurred_at must be timezone-aware (e.g. datetime.now(UTC))")
        if self.idempotency_key is None:
            object.__setattr__(self, "idempotency_key", str(uuid.uuid4()))
        elif not self.idempotency_key:
            raise ValueError("empty idempotency_key: leave it None for a random one")


@dataclass(frozen=True)
class FeedbackRecorded:
    """What the store did with a batch: `accepted` events stored now, `duplicates` skipped
    because the store already held their idempotency key."""

    accepted: int
    duplicates: int


@dataclass(frozen=True)
class UserForgotten:
    """What `forget_user` removed: the user's stored events, and whether the served model had
    training-data factors for them (now masked)."""

    events_deleted: int
    had_model_factors: bool


def record_feedback_request(events: Sequence[Feedback]) -> pb.RecordFeedbackRequest:
    return pb.RecordFeedbackRequest(events=[_event(e) for e in events])


def recorded(msg: pb.RecordFeedbackResponse) -> FeedbackRecorded:
    return FeedbackRecorded(msg.accepted, msg.duplicates)


def forgotten(msg: pb.ForgetUserResponse) -> UserForgotten:
    return UserForgotten(msg.events_deleted, msg.had_model_factors)


def _kind(kind: FeedbackKind | str) -> FeedbackKind:
    if isinstance(kind, FeedbackKind):
        return kind
    try:
        return FeedbackKind(kind)
    except ValueError:
        names = ", ".join(k.value for k in FeedbackKind)
        raise ValueError(f"unknown feedback kind {kind!r} (one of {names})") from None


def _event(event: Feedback) -> pb.FeedbackEvent:
    msg = pb.FeedbackEvent(
        user_id=event.user_id,
        item_id=event.item_id,
        kind=_KIND_TO_PB[_kind(event.kind)],
        rating=event.rating or 0.0,
        idempotency_key=event.idempotency_key,
    )
    if event.occurred_at is not None:
        msg.occurred_at.CopyFrom(_timestamp(event.occurred_at))
    return msg


def _timestamp(when: datetime | float) -> Timestamp:
    stamp = Timestamp()
    if isinstance(when, datetime):
        stamp.FromDatetime(when)
    else:
        stamp.FromNanoseconds(round(when * 1e9))
    return stamp
