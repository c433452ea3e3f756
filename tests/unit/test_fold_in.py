"""Fold-in (server/fold_in.py, server/online_users.py) against brute-force numpy.

The ranking vector must be THE minimiser of the implicit-ALS objective over every item of the
catalogue: sum_j c_j (p_j - x . y_j)^2 + reg |x|^2, one term per piece of evidence (a training
pair, the latest rating, each click, purchase or skip) and a term (0 - x . y_i)^2 of weight 1
for every item the user never touched. The reference builds that objective row by row and
hands it to `np.linalg.lstsq`, so it shares nothing with the server's normal equations and
Gram-matrix shortcut. The rating head is checked the same way: plain ridge for a cold user,
ridge around the exported parameters with their training precision for a known one.

`OnlineUsers` is driven through its public `apply`/`forget`/`lookup` with store-like records,
on a stand-in for `Model` that offers only what it reads (ids, rows and arrays); the last
tests attach it to `Feedback` (server/feedback.py) over in-memory stores, where the order in
which the live path, the replay and the follower deliver a tombstone matters.
"""

from __future__ import annotations

import dataclasses
import threading
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from bertrec.bench.synthetic import random_factor_arrays
from bertrec.feedback.events import (
    Appended,
    Erased,
    FeedbackEvent,
    FeedbackKind,
    Forgotten,
    StoredEvent,
)
from bertrec.feedback.store import FeedbackStore, StoreError, salted_hash
from bertrec.repository.artifacts import (
    RANK_ALPHA,
    RANK_POWER,
    RANK_REG,
    RATING_REG,
    RATING_REG_BIAS,
    FactorArrays,
)
from bertrec.server.errors import NotFound
from bertrec.server.fold_in import CLICK_CONFIDENCE, PURCHASE_CONFIDENCE, SKIP_CONFIDENCE
from bertrec.server.model import Model
from bertrec.server.online_users import OnlineUsers

N_USERS, N_ITEMS, DIM, RATING_DIM = 6, 40, 5, 3
TOP = 5.0
SALT = "unit-test-salt"
KNOWN = "u0002"  # a training user (see `arrays`)
COLD = "someone-new"

Terms = dict[int, list[tuple[float, float]]]  # item row -> [(confidence, preference)]


class StandInModel:
    """What `OnlineUsers` reads of a loaded version, over in-memory arrays."""

    def __init__(self, arrays: FactorArrays) -> None:
        self.arrays = arrays
        self.version = 1
        self.manifest = SimpleNamespace(scoring=SimpleNamespace(rating_range=(1.0, TOP)))
        self._users = {str(u): row for row, u in enumerate(arrays.user_ids.tolist())}
        self._items = {str(i): row for row, i in enumerate(arrays.item_ids.tolist())}

    def training_row(self, user_id: str) -> int | None:
        return self._users.get(user_id)

    def item_row(self, item_id: str) -> int | None:
        return self._items.get(item_id)

    def user_vector(self, row: int) -> np.ndarray:
        return np.asarray(self.arrays.user_factors[row], np.float32)

    def rated_rows(self, row: int) -> np.ndarray:
        a = self.arrays
        return np.asarray(a.rated_indices[a.rated_indptr[row] : a.rated_indptr[row + 1]])


def make_arrays(rating_head: bool = True, seed: int = 3) -> FactorArrays:
    """Random factors; each user rated 4 items with random training confidences."""
    rng = np.random.default_rng(seed)
    rated = [np.sort(rng.choice(N_ITEMS, 4, replace=False)) for _ in range(N_USERS)]
    arrays = random_factor_arrays(
        rng,
        user_ids=np.array([f"u{i:04d}" for i in range(N_USERS)]),
        item_ids=np.array([f"item-{i}" for i in range(N_ITEMS)]),
        rated_indptr=np.concatenate([[0], np.cumsum([len(r) for r in rated])]).astype(np.int64),
        rated_indices=np.concatenate(rated).astype(np.int32),
        dim=DIM,
        global_mean=3.5,
    )
    # Larger factors than the synthetic default, so the evidence visibly moves the solution.
    arrays = dataclasses.replace(
        arrays,
        item_factors=(3.0 * arrays.item_factors).astype(np.float32),
        rated_confidence=rng.uniform(0.5, 5.0, len(arrays.rated_indices)).astype(np.float32),
    )
    if not rating_head:
        return arrays
    return dataclasses.replace(
        arrays,
        rating_user_factors=rng.normal(0, 0.4, (N_USERS, RATING_DIM)).astype(np.float32),
        rating_item_factors=rng.normal(0, 0.4, (N_ITEMS, RATING_DIM)).astype(np.float32),
    )


def online(arrays: FactorArrays) -> OnlineUsers:
    return OnlineUsers(cast(Model, StandInModel(arrays)), lambda user: salted_hash(SALT, user))


def item(row: int) -> str:
    return f"item-{row}"


class Log:
    """Store-like records with increasing seqs (and, by default, increasing client times)."""

    def __init__(self) -> None:
        self.seq = 0

    def event(
        self, user: str, row: int, kind: FeedbackKind, rating: float = 0.0, at: float | None = None
    ) -> StoredEvent:
        self.seq += 1
        when = 1_700_000_000.0 + self.seq if at is None else at
        return StoredEvent(
            self.seq, FeedbackEvent(user, item(row), kind, rating, when, f"k{self.seq}")
        )

    def rating(self, user: str, row: int, stars: float, at: float | None = None) -> StoredEvent:
        return self.event(user, row, FeedbackKind.RATING, stars, at)

    def tombstone(self, user: str) -> Forgotten:
        self.seq += 1
        return Forgotten(self.seq, salted_hash(SALT, user))


def rating_confidence(stars: float) -> float:
    """Training's confidence of a rating (train/ials.py): alpha * (r / top) ** power."""
    return RANK_ALPHA * (stars / TOP) ** RANK_POWER


def training_terms(arrays: FactorArrays, user: str) -> Terms:
    row = [str(u) for u in arrays.user_ids.tolist()].index(user)
    start, end = int(arrays.rated_indptr[row]), int(arrays.rated_indptr[row + 1])
    assert arrays.rated_confidence is not None
    return {
        int(j): [(float(c), 1.0)]
        for j, c in zip(
            arrays.rated_indices[start:end], arrays.rated_confidence[start:end], strict=True
        )
    }


def brute_force_vector(arrays: FactorArrays, terms: Terms) -> np.ndarray:
    """argmin_x of the iALS objective over ALL items, one least-squares row per term."""
    y = arrays.item_factors.astype(np.float64)
    rows, targets = [], []
    for j in range(len(y)):
        for confidence, preference in terms.get(j, [(1.0, 0.0)]):
            rows.append(np.sqrt(confidence) * y[j])
            targets.append(np.sqrt(confidence) * preference)
    rows.extend(np.sqrt(RANK_REG) * np.eye(y.shape[1]))
    targets.extend([0.0] * y.shape[1])
    solution, *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
    return solution


def brute_force_rating_head(
    arrays: FactorArrays, ratings: dict[int, float], known_row: int | None
) -> np.ndarray:
    """argmin over theta = (b, p) of sum_new (r - mu - b_i - b - q_i . p)^2 plus the prior:
    reg_bias b^2 + reg |p|^2 for a cold user; for a known user (theta - theta_u)^T A
    (theta - theta_u), A = that prior + the outer products of their training features."""
    q = (
        arrays.rating_item_factors
        if arrays.rating_item_factors is not None
        else arrays.item_factors
    )
    q = q.astype(np.float64)
    dim = q.shape[1]
    prior = np.diag([RATING_REG_BIAS] + [RATING_REG] * dim)
    centre = np.zeros(dim + 1)
    if known_row is not None:
        start, end = int(arrays.rated_indptr[known_row]), int(arrays.rated_indptr[known_row + 1])
        trained = np.hstack([np.ones((end - start, 1)), q[arrays.rated_indices[start:end]]])
        prior = prior + trained.T @ trained
        user = (
            arrays.rating_user_factors
            if arrays.rating_user_factors is not None
            else arrays.user_factors
        )
        centre = np.concatenate([[arrays.user_bias[known_row]], user[known_row]])
    root = np.linalg.cholesky(prior).T  # |root (theta - centre)|^2 is the prior's term
    rows = [np.concatenate([[1.0], q[j]]) for j in ratings]
    targets = [r - arrays.global_mean - float(arrays.item_bias[j]) for j, r in ratings.items()]
    matrix = np.vstack([np.array(rows).reshape(-1, dim + 1), root])
    target = np.concatenate([np.array(targets), root @ centre])
    solution, *_ = np.linalg.lstsq(matrix, target, rcond=None)
    return solution


def score(arrays: FactorArrays, vector: np.ndarray, row: int) -> float:
    return float(arrays.item_factors[row].astype(np.float64) @ vector)


@pytest.fixture
def arrays() -> FactorArrays:
    return make_arrays()


def untouched(arrays: FactorArrays, user: str, n: int) -> list[int]:
    """n item rows the training data has no pair of `user` for."""
    trained = training_terms(arrays, user)
    return [j for j in range(N_ITEMS) if j not in trained][:n]


# ---- the ranking head -------------------------------------------------------------------------


def test_a_cold_users_vector_is_the_brute_force_ials_solution(arrays: FactorArrays) -> None:
    log, users = Log(), online(arrays)
    users.apply([
        log.rating(COLD, 3, 5.0),
        log.rating(COLD, 7, 2.0),
        log.event(COLD, 11, FeedbackKind.CLICK),
        log.event(COLD, 12, FeedbackKind.PURCHASE),
        log.event(COLD, 13, FeedbackKind.SKIP),
    ])  # fmt: skip
    state = users.lookup(COLD)
    expected = brute_force_vector(arrays, {
        3: [(rating_confidence(5.0), 1.0)],
        7: [(rating_confidence(2.0), 1.0)],
        11: [(CLICK_CONFIDENCE, 1.0)],
        12: [(PURCHASE_CONFIDENCE, 1.0)],
        13: [(SKIP_CONFIDENCE, 0.0)],
    })  # fmt: skip
    np.testing.assert_allclose(state.vector, expected, rtol=1e-4, atol=1e-6)
    assert state.row is None and state.vector.dtype == np.float32
    assert state.seen.tolist() == [3, 7, 11, 12, 13]


def test_a_known_users_vector_keeps_their_training_pairs(arrays: FactorArrays) -> None:
    log, users = Log(), online(arrays)
    trained = training_terms(arrays, KNOWN)
    new = untouched(arrays, KNOWN, 2)
    retrained = next(iter(trained))  # a training pair the user now clicks as well
    users.apply([
        log.rating(KNOWN, new[0], 4.0),
        log.event(KNOWN, new[1], FeedbackKind.SKIP),
        log.event(KNOWN, retrained, FeedbackKind.CLICK),
    ])  # fmt: skip
    terms = {**trained, new[0]: [(rating_confidence(4.0), 1.0)], new[1]: [(SKIP_CONFIDENCE, 0.0)]}
    terms[retrained] = [*trained[retrained], (CLICK_CONFIDENCE, 1.0)]
    state = users.lookup(KNOWN)
    np.testing.assert_allclose(
        state.vector, brute_force_vector(arrays, terms), rtol=1e-4, atol=1e-6
    )
    assert state.seen.tolist() == sorted({*trained, *new})
    assert users.has_training_factors(KNOWN)


def test_a_known_user_without_feedback_keeps_the_exported_vector(arrays: FactorArrays) -> None:
    state = online(arrays).lookup(KNOWN)
    row = 2
    assert state.row == row
    np.testing.assert_array_equal(state.vector, arrays.user_factors[row].astype(np.float32))


def test_a_re_rating_replaces_the_earlier_one_by_client_time(arrays: FactorArrays) -> None:
    log, users = Log(), online(arrays)
    # Stored in this order, but the client says the 1-star rating came last.
    users.apply([log.rating(COLD, 5, 1.0, at=2_000.0), log.rating(COLD, 5, 5.0, at=1_000.0)])
    expected = brute_force_vector(arrays, {5: [(rating_confidence(1.0), 1.0)]})
    np.testing.assert_allclose(users.lookup(COLD).vector, expected, rtol=1e-4, atol=1e-6)
    # A re-rating of a training pair replaces the training confidence too.
    trained = next(iter(training_terms(arrays, KNOWN)))
    users.apply([log.rating(KNOWN, trained, 1.0)])
    terms = {**training_terms(arrays, KNOWN), trained: [(rating_confidence(1.0), 1.0)]}
    np.testing.assert_allclose(
        users.lookup(KNOWN).vector, brute_force_vector(arrays, terms), rtol=1e-4, atol=1e-6
    )


def test_clicks_add_up_and_raise_the_items_score(arrays: FactorArrays) -> None:
    log, users = Log(), online(arrays)
    users.apply([log.rating(COLD, 1, 4.0), log.event(COLD, 9, FeedbackKind.CLICK)])
    once = score(arrays, users.lookup(COLD).vector, 9)
    users.apply([log.event(COLD, 9, FeedbackKind.CLICK)])
    twice = users.lookup(COLD).vector
    expected = brute_force_vector(
        arrays, {1: [(rating_confidence(4.0), 1.0)], 9: [(CLICK_CONFIDENCE, 1.0)] * 2}
    )
    np.testing.assert_allclose(twice, expected, rtol=1e-4, atol=1e-6)
    assert score(arrays, twice, 9) > once


def test_a_skip_pushes_the_items_score_down(arrays: FactorArrays) -> None:
    log, users = Log(), online(arrays)
    row = 4
    users.apply([log.rating(COLD, 1, 5.0), log.event(COLD, row, FeedbackKind.CLICK)])
    before = score(arrays, users.lookup(COLD).vector, row)
    users.apply([log.event(COLD, row, FeedbackKind.SKIP)])
    after = users.lookup(COLD).vector
    expected = brute_force_vector(arrays, {
        1: [(rating_confidence(5.0), 1.0)],
        row: [(CLICK_CONFIDENCE, 1.0), (SKIP_CONFIDENCE, 0.0)],
    })  # fmt: skip
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-6)
    assert score(arrays, after, row) < before


def test_the_exported_gramian_is_the_one_used(arrays: FactorArrays) -> None:
    """A version exporting rank_gramian.npy: fold-in solves with it (here the same matrix as
    the catalogue's, so the brute force still applies)."""
    y = arrays.item_factors.astype(np.float64)
    exported = dataclasses.replace(arrays, rank_gramian=y.T @ y + RANK_REG * np.eye(DIM))
    log, users = Log(), online(exported)
    users.apply([log.rating(COLD, 2, 3.0), log.event(COLD, 8, FeedbackKind.SKIP)])
    expected = brute_force_vector(
        arrays, {2: [(rating_confidence(3.0), 1.0)], 8: [(SKIP_CONFIDENCE, 0.0)]}
    )
    np.testing.assert_allclose(users.lookup(COLD).vector, expected, rtol=1e-4, atol=1e-6)


# ---- the rating head --------------------------------------------------------------------------


@pytest.mark.parametrize("rating_head", [True, False])
def test_a_cold_users_rating_head_is_plain_ridge(rating_head: bool) -> None:
    arrays = make_arrays(rating_head)
    log, users = Log(), online(arrays)
    ratings = {3: 5.0, 7: 1.0, 20: 4.0}
    users.apply([log.rating(COLD, j, r) for j, r in ratings.items()])
    users.apply([log.event(COLD, 21, FeedbackKind.CLICK)])  # no rating: not in the rating head
    rating = users.lookup(COLD).rating
    assert rating is not None
    expected = brute_force_rating_head(arrays, ratings, None)
    assert rating.bias == pytest.approx(expected[0], rel=1e-6, abs=1e-9)
    if rating_head:
        assert rating.vector is not None
        np.testing.assert_allclose(rating.vector, expected[1:], rtol=1e-4, atol=1e-6)
    else:  # predicted ratings use the ranking vector; only the bias is the user's own
        assert rating.vector is None


def test_a_known_users_rating_head_moves_from_the_exported_one(arrays: FactorArrays) -> None:
    log, users = Log(), online(arrays)
    new = untouched(arrays, KNOWN, 2)
    ratings = {new[0]: 5.0, new[1]: 1.0}
    users.apply([log.rating(KNOWN, j, r) for j, r in ratings.items()])
    rating = users.lookup(KNOWN).rating
    assert rating is not None and rating.vector is not None
    expected = brute_force_rating_head(arrays, ratings, known_row=2)
    assert rating.bias == pytest.approx(expected[0], rel=1e-6, abs=1e-9)
    np.testing.assert_allclose(rating.vector, expected[1:], rtol=1e-4, atol=1e-6)
    # ...and a known user without new ratings keeps exactly the exported parameters.
    users.apply([log.event(KNOWN, new[0], FeedbackKind.CLICK)])
    assert users.lookup("u0003").rating is None
    users.apply([log.event("u0003", new[0], FeedbackKind.CLICK)])
    unrated = users.lookup("u0003").rating
    assert unrated is not None and unrated.vector is not None
    assert unrated.bias == pytest.approx(float(arrays.user_bias[3]))
    assert arrays.rating_user_factors is not None
    np.testing.assert_allclose(unrated.vector, arrays.rating_user_factors[3], rtol=1e-6)


# ---- OnlineUsers: idempotence, order, tombstones ----------------------------------------------


def test_applying_the_same_seq_twice_changes_nothing(arrays: FactorArrays) -> None:
    log, users = Log(), online(arrays)
    records = [log.rating(COLD, 3, 5.0), log.event(COLD, 9, FeedbackKind.CLICK)]
    assert users.apply(records) == 1
    first = users.lookup(COLD)
    assert users.apply(records) == 0  # the replay and the live path overlapping
    assert users.apply(records[1:]) == 0
    assert users.lookup(COLD) is first
    # A second OnlineUsers fed the records in two overlapping pages agrees exactly.
    other = online(arrays)
    other.apply(records[:1])
    other.apply(records)
    np.testing.assert_array_equal(other.lookup(COLD).vector, first.vector)
    assert users.folded_users == 1


def test_a_replay_older_than_the_tombstone_is_ignored(arrays: FactorArrays) -> None:
    """The live forget reached this version before a replay page read earlier still held the
    user's events: those events must not bring the user back."""
    log, users = Log(), online(arrays)
    stale = [log.rating(COLD, 3, 5.0), log.rating(KNOWN, 3, 5.0)]
    for user in (COLD, KNOWN):
        users.forget(user, log.tombstone(user))
    users.apply(stale)
    for user in (COLD, KNOWN):
        with pytest.raises(NotFound):
            users.lookup(user)
    assert not users.has_training_factors(KNOWN)
    assert users.folded_users == 0


def test_a_replayed_tombstone_drops_the_user_and_masks_the_training_row(
    arrays: FactorArrays,
) -> None:
    """Replay or another replica: the tombstone comes with a hash only, never the id."""
    log, users = Log(), online(arrays)
    records = [
        log.rating(COLD, 3, 5.0),
        log.rating(KNOWN, 3, 5.0),
        log.tombstone(COLD),
        log.tombstone(KNOWN),
        log.rating("u0004", 3, 5.0),  # someone else, kept
    ]
    users.apply(records)
    for user in (COLD, KNOWN):
        with pytest.raises(NotFound):
            users.lookup(user)
    assert not users.has_training_factors(KNOWN)
    assert users.has_training_factors("u0004") and users.lookup("u0004").row is None
    assert users.folded_users == 1


def test_an_event_after_the_tombstone_makes_a_cold_user_without_training_pairs(
    arrays: FactorArrays,
) -> None:
    log, users = Log(), online(arrays)
    trained = training_terms(arrays, KNOWN)
    users.apply([log.event(KNOWN, untouched(arrays, KNOWN, 1)[0], FeedbackKind.CLICK)])
    users.forget(KNOWN, log.tombstone(KNOWN))
    assert users.folded_users == 0
    row = next(iter(trained))  # an item they rated in training: now just a new rating
    users.apply([log.rating(KNOWN, row, 2.0)])
    state = users.lookup(KNOWN)
    expected = brute_force_vector(arrays, {row: [(rating_confidence(2.0), 1.0)]})
    np.testing.assert_allclose(state.vector, expected, rtol=1e-4, atol=1e-6)
    assert state.row is None and state.seen.tolist() == [row]
    rating = state.rating
    assert rating is not None
    assert rating.bias == pytest.approx(brute_force_rating_head(arrays, {row: 2.0}, None)[0])
    assert not users.has_training_factors(KNOWN)  # the training row stays masked


def test_a_replay_of_the_whole_log_rebuilds_the_same_users(arrays: FactorArrays) -> None:
    """What a restart does: a fresh OnlineUsers fed the log (events, tombstones, later events)
    ends where the live one did."""
    log, live = Log(), online(arrays)
    records: list[Any] = [
        log.rating(KNOWN, 5, 4.0),
        log.event(COLD, 6, FeedbackKind.PURCHASE),
        log.tombstone(KNOWN),
        log.rating(KNOWN, 7, 3.0),
        log.event(COLD, 8, FeedbackKind.SKIP),
    ]
    for record in records:
        if isinstance(record, Forgotten):
            live.forget(KNOWN, record)
        else:
            live.apply([record])
    replayed = online(arrays)
    replayed.apply(records)
    for user in (KNOWN, COLD):
        np.testing.assert_array_equal(replayed.lookup(user).vector, live.lookup(user).vector)
        assert replayed.lookup(user).seen.tolist() == live.lookup(user).seen.tolist()
    assert replayed.lookup(KNOWN).seen.tolist() == [7]
    assert not replayed.has_training_factors(KNOWN)


def test_an_item_missing_from_this_version_is_skipped(arrays: FactorArrays) -> None:
    """A record written against another version's catalogue folds in what this one knows."""
    users = online(arrays)
    event = FeedbackEvent(COLD, "not-in-this-catalogue", FeedbackKind.CLICK, 0.0, 1.0, "x")
    assert users.apply([StoredEvent(1, event)]) == 0
    with pytest.raises(NotFound):
        users.lookup(COLD)


def test_a_late_tombstone_keeps_events_newer_than_itself(arrays: FactorArrays) -> None:
    """The store's tombstone deletes only events with a smaller seq; delivered late, it must
    not take a newer event with it. Order of arrival here: the live forget (seq 2), the live
    RecordFeedback after it (seq 3), then the follower's page holding the tombstone (seq 2)."""
    log, users = Log(), online(arrays)
    users.apply([log.rating(COLD, 3, 5.0)])
    tombstone = log.tombstone(COLD)
    users.forget(COLD, tombstone)
    comeback = log.rating(COLD, 4, 2.0)
    users.apply([comeback])
    users.apply([tombstone])
    expected = brute_force_vector(arrays, {4: [(rating_confidence(2.0), 1.0)]})
    np.testing.assert_allclose(users.lookup(COLD).vector, expected, rtol=1e-4, atol=1e-6)


def test_a_late_live_forget_keeps_events_newer_than_its_tombstone(arrays: FactorArrays) -> None:
    """ForgetUser and RecordFeedback of one user racing on one server: the store writes the
    tombstone (seq 2) and then the event (seq 3); the follower delivers both; only then does
    the ForgetUser thread reach `OnlineUsers.forget` with the tombstone."""
    log, users = Log(), online(arrays)
    tombstone = log.tombstone(COLD)
    comeback = log.rating(COLD, 4, 2.0)
    users.apply([tombstone, comeback])
    users.forget(COLD, tombstone)
    expected = brute_force_vector(arrays, {4: [(rating_confidence(2.0), 1.0)]})
    np.testing.assert_allclose(users.lookup(COLD).vector, expected, rtol=1e-4, atol=1e-6)


class FailingReplayStore:
    """A store whose second page of the replay fails (Redis gone mid-load)."""

    url = "fake://"

    def read_since(self, cursor: int, limit: int = 10_000) -> list[Any]:
        if cursor == 0:
            event = FeedbackEvent(COLD, item(1), FeedbackKind.CLICK, 0.0, 1.0, "k1")
            return [StoredEvent(1, event)]
        raise StoreError("the store went away")

    def user_hash(self, user_id: str) -> str:
        return salted_hash(SALT, user_id)


def test_a_version_whose_replay_fails_is_not_kept_attached(arrays: FactorArrays) -> None:
    """Where the version's users meet the store (server/feedback.py): a failed replay fails the
    load, and nothing of that version may stay alive behind it."""
    import gc
    import weakref

    from prometheus_client import CollectorRegistry

    from bertrec.server.feedback import Feedback
    from bertrec.server.feedback_metrics import FeedbackMetrics

    store = cast(FeedbackStore, FailingReplayStore())
    feedback = Feedback(store, FeedbackMetrics(CollectorRegistry()), poll_interval_s=1.0)
    model = StandInModel(arrays)
    alive = weakref.ref(model)
    try:  # not pytest.raises: its traceback would keep the model alive
        feedback.users_for(cast(Model, model))
        raise AssertionError("the replay did not fail")
    except StoreError:
        pass
    del model
    gc.collect()
    assert alive() is None


class FollowedStore:
    """An in-memory log whose `forget` returns only once the follower has read past the
    tombstone (its next read starts after it), the order a SQLite forget's WAL checkpoint or a
    slow Redis reply leaves room for."""

    url = "memory://"

    def __init__(self) -> None:
        self.log: list[Any] = []
        self.reads_after: list[int] = []
        self.read = threading.Condition()

    def append(self, events: list[FeedbackEvent], timeout_s: float | None = None) -> Appended:
        with self.read:
            seqs = []
            for event in events:
                self.log.append(StoredEvent(len(self.log) + 1, event))
                seqs.append(len(self.log))
            return Appended(tuple(seqs))

    def forget(self, user_id: str, timeout_s: float | None = None) -> Erased:
        with self.read:
            tombstone = Forgotten(len(self.log) + 1, self.user_hash(user_id))
            self.log.append(tombstone)
            followed = self.read.wait_for(
                lambda: any(c >= tombstone.seq for c in self.reads_after), timeout=10.0
            )
        assert followed, "the follower never read past the tombstone"
        return Erased(0, tombstone)

    def read_since(self, cursor: int, limit: int = 10_000) -> list[Any]:
        with self.read:
            self.reads_after.append(cursor)
            self.read.notify_all()
            return [r for r in self.log if r.seq > cursor][:limit]

    def user_hash(self, user_id: str) -> str:
        return salted_hash(SALT, user_id)

    def close(self) -> None:
        pass


def test_forget_reports_training_factors_whoever_applies_the_tombstone_first(
    arrays: FactorArrays,
) -> None:
    from prometheus_client import CollectorRegistry

    from bertrec.server.feedback import Feedback
    from bertrec.server.feedback_metrics import FeedbackMetrics

    store = FollowedStore()
    feedback = Feedback(
        cast(FeedbackStore, store), FeedbackMetrics(CollectorRegistry()), poll_interval_s=0.001
    )
    users = feedback.users_for(cast(Model, StandInModel(arrays)))
    feedback.start()
    try:
        _, had = feedback.forget(KNOWN, timeout_s=10.0)
        assert not users.has_training_factors(KNOWN)
        assert had, "KNOWN had training factors until this forget"
        _, again = feedback.forget(KNOWN, timeout_s=10.0)
        assert not again
    finally:
        feedback.close()
