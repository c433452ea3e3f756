"""Two ForgetUser calls of one user race a RecordFeedback: no deleted event may come back.

The store serialises the writes (tombstone A, then the event, then tombstone B, which deletes
the event), but each gRPC thread reaches the served users (`OnlineUsers.forget`, the live
delivery of the event) when it gets there. Whatever that order, the user's state must never
hold an event the store has deleted: that is the privacy guarantee of ForgetUser. Driven
in-process on `OnlineUsers` with store-like records, because only there can the threads'
order be chosen instead of hoped for. (The out-of-order case was a defect, found here and
fixed in 51c6534: a late forget lowered the newer tombstone's seq.)
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest

from bertrec.bench.synthetic import random_factor_arrays
from bertrec.feedback.events import FeedbackEvent, FeedbackKind, Forgotten, StoredEvent
from bertrec.feedback.store import salted_hash
from bertrec.repository.artifacts import FactorArrays
from bertrec.server.errors import NotFound
from bertrec.server.model import Model
from bertrec.server.online_users import OnlineUsers

SALT = "adversarial-salt"
USER = "forgotten-twice"  # not a training user: only feedback makes them known


class StandInModel:
    """What `OnlineUsers` reads of a loaded version: ids, rows and arrays."""

    def __init__(self, arrays: FactorArrays) -> None:
        self.arrays = arrays
        self.manifest = SimpleNamespace(scoring=SimpleNamespace(rating_range=(1.0, 5.0)))
        self._users = {str(u): row for row, u in enumerate(arrays.user_ids.tolist())}
        self._items = {str(i): row for row, i in enumerate(arrays.item_ids.tolist())}

    def training_row(self, user_id: str) -> int | None:
        return self._users.get(user_id)

    def item_row(self, item_id: str) -> int | None:
        return self._items.get(item_id)


def online_users() -> OnlineUsers:
    rng = np.random.default_rng(7)
    arrays = random_factor_arrays(
        rng,
        user_ids=np.array([f"u{i}" for i in range(4)]),
        item_ids=np.array([f"item-{i}" for i in range(12)]),
        rated_indptr=np.array([0, 2, 4, 6, 8], np.int64),
        rated_indices=np.array([0, 1, 2, 3, 4, 5, 6, 7], np.int32),
        dim=4,
        global_mean=3.5,
    )
    model = cast(Model, StandInModel(arrays))
    return OnlineUsers(model, lambda user_id: salted_hash(SALT, user_id))


def tombstone(seq: int) -> Forgotten:
    return Forgotten(seq, salted_hash(SALT, USER))


def rating(seq: int) -> StoredEvent:
    event = FeedbackEvent(USER, "item-9", FeedbackKind.RATING, 5.0, 1_700_000_000.0, f"k{seq}")
    return StoredEvent(seq, event)


def test_forgets_in_store_order_keep_the_deleted_event_out() -> None:
    users = online_users()
    users.forget(USER, tombstone(1))
    users.forget(USER, tombstone(3))
    users.apply([rating(2)])  # the live delivery of the event, after both forgets
    with pytest.raises(NotFound):
        users.lookup(USER)


def test_forgets_out_of_store_order_keep_the_deleted_event_out() -> None:
    users = online_users()
    users.forget(USER, tombstone(3))  # ForgetUser B's thread gets there first...
    users.forget(USER, tombstone(1))  # ...then ForgetUser A's, whose tombstone is older
    users.apply([rating(2)])  # the event tombstone 3 deleted
    with pytest.raises(NotFound):
        users.lookup(USER)
