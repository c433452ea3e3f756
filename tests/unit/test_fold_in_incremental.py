"""Folding events in one call at a time (rank-1 updates of the user's normal equations and a
cached rating prior) gives the same user as folding them all at once from scratch."""

from __future__ import annotations

import numpy as np
import pytest
from unit.test_fold_in import COLD, KNOWN, N_ITEMS, SALT, Log, make_arrays, online

from bertrec.feedback.events import FeedbackKind, Forgotten
from bertrec.feedback.store import salted_hash

KINDS = (FeedbackKind.RATING, FeedbackKind.CLICK, FeedbackKind.PURCHASE, FeedbackKind.SKIP)


def _events(seed: int, user: str, n: int, log: Log) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        rating = float(rng.integers(1, 6)) if kind is FeedbackKind.RATING else 0.0
        # Client times out of order and items repeated (training items included), so the
        # latest-rating rule and merging both matter.
        at = 1_700_000_000.0 + float(rng.integers(0, 50))
        out.append(log.event(user, int(rng.integers(0, 12)), kind, rating, at=at))
    return out


@pytest.mark.parametrize("user", [KNOWN, COLD])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_at_a_time_equals_all_at_once(user: str, seed: int) -> None:
    arrays = make_arrays()
    events = _events(seed, user, 40, Log())
    stepwise, batch = online(arrays), online(arrays)
    for event in events:
        stepwise.apply([event])
    batch.apply(events)
    a, b = stepwise.lookup(user), batch.lookup(user)
    np.testing.assert_allclose(a.vector, b.vector, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.seen, b.seen)
    assert a.rating is not None and b.rating is not None
    assert a.rating.bias == pytest.approx(b.rating.bias, rel=1e-6, abs=1e-9)
    assert a.rating.vector is not None and b.rating.vector is not None
    np.testing.assert_allclose(a.rating.vector, b.rating.vector, rtol=1e-5, atol=1e-6)


def test_a_forget_between_events_rebuilds_without_the_training_row() -> None:
    arrays = make_arrays()
    log = Log()
    before = _events(5, KNOWN, 10, log)
    log.seq += 1
    tombstone = Forgotten(log.seq, salted_hash(SALT, KNOWN))
    after = _events(6, KNOWN, 10, log)
    stepwise, fresh = online(arrays), online(arrays)
    for record in [*before, tombstone, *after]:
        stepwise.apply([record])
    fresh.apply([tombstone, *after])  # what a replay after the forget sees
    a, b = stepwise.lookup(KNOWN), fresh.lookup(KNOWN)
    np.testing.assert_allclose(a.vector, b.vector, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.seen, b.seen)
    assert set(a.seen.tolist()) <= set(range(N_ITEMS))
