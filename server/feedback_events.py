"""RecordFeedback's events checked whole before anything is stored: one bad event rejects the
batch with INVALID_ARGUMENT naming it (`events[3].item_id ...`), so a client can fix exactly
that event and nothing of the batch was half-applied."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence

from bertrec.feedback.events import FeedbackEvent, FeedbackKind
from bertrec.server import errors
from bertrec.server.errors import InvalidArgument
from bertrec.server.model import Model
from bertrec.v1 import recommender_pb2 as pb

MAX_KEY_BYTES = 128
MAX_ID_BYTES = 512  # user and item ids: longer ones are not ids
_KINDS = {
    pb.FEEDBACK_KIND_RATING: FeedbackKind.RATING,
    pb.FEEDBACK_KIND_CLICK: FeedbackKind.CLICK,
    pb.FEEDBACK_KIND_PURCHASE: FeedbackKind.PURCHASE,
    pb.FEEDBACK_KIND_SKIP: FeedbackKind.SKIP,
}


def checked_events(
    events: Sequence[pb.FeedbackEvent],
    model: Model,
    max_events: int,
    max_clock_skew_s: float,
    now: float,
) -> list[FeedbackEvent]:
    """The request's events as store events, every one valid for the serving `model`.

    Raises:
        InvalidArgument: no events, too many, or the first bad event (by index and field).
    """
    if not events:
        raise InvalidArgument("events is empty", "events", errors.EMPTY)
    if len(events) > max_events:
        raise InvalidArgument(
            f"{len(events)} events, more than max_feedback_events {max_events}", "events",
            errors.TOO_MANY,
        )  # fmt: skip
    low, high = model.manifest.scoring.rating_range
    checked = []
    for i, event in enumerate(events):
        where = f"events[{i}]"
        _check_id(event.user_id, f"{where}.user_id")
        _check_id(event.item_id, f"{where}.item_id")
        if model.item_row(event.item_id) is None:
            raise InvalidArgument(
                f"{where}.item_id {event.item_id!r} is not in the catalogue", f"{where}.item_id",
                errors.UNKNOWN_ITEM,
            )  # fmt: skip
        kind = _KINDS.get(event.kind)
        if kind is None:
            raise InvalidArgument(
                f"{where}.kind must be RATING, CLICK, PURCHASE or SKIP", f"{where}.kind",
                errors.INVALID_KIND,
            )  # fmt: skip
        rating = float(event.rating)
        if kind is FeedbackKind.RATING and not (math.isfinite(rating) and low <= rating <= high):
            raise InvalidArgument(
                f"{where}.rating {rating:g} is outside [{low:g}, {high:g}]", f"{where}.rating",
                errors.OUT_OF_RANGE,
            )  # fmt: skip
        if kind is not FeedbackKind.RATING and rating != 0.0:
            raise InvalidArgument(
                f"{where}.rating must be 0 for kind {kind.name}", f"{where}.rating",
                errors.OUT_OF_RANGE,
            )  # fmt: skip
        occurred_at = _occurred_at(event, where, now, max_clock_skew_s)
        key = event.idempotency_key
        if len(key.encode("utf-8")) > MAX_KEY_BYTES:
            raise InvalidArgument(
                f"{where}.idempotency_key is longer than {MAX_KEY_BYTES} bytes",
                f"{where}.idempotency_key", errors.TOO_LARGE,
            )  # fmt: skip
        checked.append(
            FeedbackEvent(event.user_id, event.item_id, kind, rating if kind is
                          FeedbackKind.RATING else 0.0, occurred_at, key or uuid.uuid4().hex)
        )  # fmt: skip
    return checked


def _check_id(value: str, name: str) -> None:
    if not value:
        raise InvalidArgument(f"{name} is empty", name, errors.EMPTY)
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidArgument(f"{name} is longer than {MAX_ID_BYTES} bytes", name, errors.TOO_LARGE)


def _occurred_at(event: pb.FeedbackEvent, where: str, now: float, skew_s: float) -> float:
    if not event.HasField("occurred_at"):
        return now
    stamp = event.occurred_at
    if not 0 <= stamp.nanos < 1_000_000_000:
        raise InvalidArgument(
            f"{where}.occurred_at.nanos must be in 0..999999999", f"{where}.occurred_at.nanos",
            errors.OUT_OF_RANGE,
        )  # fmt: skip
    seconds = stamp.seconds + stamp.nanos / 1e9
    if seconds < 0:
        raise InvalidArgument(
            f"{where}.occurred_at is before 1970", f"{where}.occurred_at", errors.OUT_OF_RANGE
        )
    if seconds > now + skew_s:
        raise InvalidArgument(
            f"{where}.occurred_at is {seconds - now:.0f} s in the future (at most {skew_s:g} s)",
            f"{where}.occurred_at", errors.OUT_OF_RANGE,
        )  # fmt: skip
    return seconds
