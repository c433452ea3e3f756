"""Folding a feedback store into training data (train/feedback_data.py): latest rating wins,
new users, unknown items, implicit kinds, tombstones, and paging through a real store (SQLite
and a real redis-server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_harness import need_redis_server, redis_server

from bertrec.errors import BertrecError
from bertrec.feedback.events import FeedbackEvent, FeedbackKind, StoredEvent
from bertrec.feedback.store import open_store, salted_hash
from bertrec.train.dataset import Dataset, Ratings
from bertrec.train.feedback_data import FeedbackLog, fold_feedback, merge_feedback, read_log

RATING = FeedbackKind.RATING


def _hash(user: str) -> str:
    return salted_hash("test-salt", user)


def _event(
    seq: int, user: str, item: str, rating: float, at: float, kind: FeedbackKind = RATING
) -> StoredEvent:
    return StoredEvent(seq, FeedbackEvent(user, item, kind, rating, at, f"k{seq}"))


def _dataset(
    rows: list[tuple[str, str, float, int]], texts: dict[str, str] | None = None
) -> Dataset:
    users, items, ratings, stamps = (list(c) for c in zip(*rows, strict=True))
    return Dataset(Ratings.from_columns(users, items, ratings, timestamps=stamps), texts or {})


def _rows(ratings: Ratings) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for u, i, r in zip(ratings.user_ids, ratings.item_ids, ratings.ratings, strict=True):
        out.setdefault((str(u), str(i)), []).append(float(r))
    return out


def test_latest_rating_wins_between_the_file_and_the_store() -> None:
    data = _dataset([("ann", "i1", 3.0, 100), ("ann", "i2", 4.0, 500), ("ann", "i3", 2.0, 700)])
    events = (
        _event(1, "ann", "i1", 5.0, 200.0),  # newer than the file: replaces it
        _event(2, "ann", "i2", 1.0, 300.0),  # older than the file's 500: loses
        _event(3, "ann", "i1", 2.0, 150.0),  # recorded later but occurred earlier than seq 1
        _event(4, "ann", "i3", 4.5, 700.0),  # same time as the file: the store wins
    )
    merged, summary = merge_feedback(data, FeedbackLog(events, {}), _hash)
    assert _rows(merged.ratings) == {
        ("ann", "i1"): [5.0],
        ("ann", "i2"): [4.0],
        ("ann", "i3"): [4.5],
    }
    assert summary.ratings_used == 2 and summary.file_ratings_replaced == 2
    assert summary.skipped == {"superseded": 2} and summary.new_users == 0
    assert merged.ratings.timestamps[list(merged.ratings.ratings).index(5.0)] == 200


def test_new_users_unknown_items_and_implicit_kinds() -> None:
    data = _dataset([("ann", "i1", 3.0, 0)], texts={"i1": "one", "t9": "text only"})
    events = (
        _event(1, "bob", "t9", 4.0, 10.0),  # new user, an item known only by its text
        _event(2, "bob", "nope", 4.0, 11.0),  # not in the catalogue
        _event(3, "bob", "i1", 0.0, 12.0, FeedbackKind.CLICK),
        _event(4, "ann", "i1", 0.0, 13.0, FeedbackKind.PURCHASE),
        _event(5, "ann", "t9", 0.0, 14.0, FeedbackKind.SKIP),
        _event(6, "ann", "i1", float("nan"), 15.0),
    )
    merged, summary = merge_feedback(data, FeedbackLog(events, {}), _hash)
    assert _rows(merged.ratings) == {("ann", "i1"): [3.0], ("bob", "t9"): [4.0]}
    assert merged.item_texts == data.item_texts
    assert summary.events == 6 and summary.ratings_used == 1 and summary.new_users == 1
    assert summary.skipped == {
        "unknown_item": 1,
        "click_not_used": 1,
        "purchase_not_used": 1,
        "skip_not_used": 1,
        "bad_rating": 1,
    }
    assert "1 ratings used" in summary.line() and "1 unknown_item" in summary.line()


def test_tombstones_leave_out_the_files_rows_but_keep_later_events() -> None:
    data = _dataset(
        [("cat", "i1", 5.0, 1), ("cat", "i2", 1.0, 2), ("dan", "i1", 3.0, 3), ("eve", "i2", 2.0, 4)]
    )
    events = (
        _event(1, "cat", "i1", 4.0, 50.0),  # before cat's tombstone (seq 2): the store kept it
        _event(3, "cat", "i2", 3.0, 60.0),  # after the forget: cat is a new user again
        _event(4, "dan", "i2", 4.0, 70.0),
    )
    tombstones = {_hash("cat"): 2, _hash("someone-else"): 9}
    merged, summary = merge_feedback(data, FeedbackLog(events, tombstones), _hash)
    assert _rows(merged.ratings) == {
        ("cat", "i2"): [3.0],
        ("dan", "i1"): [3.0],
        ("dan", "i2"): [4.0],
        ("eve", "i2"): [2.0],
    }
    assert summary.users_forgotten == 2
    assert summary.file_users_forgotten == 1 and summary.file_ratings_forgotten == 2
    assert summary.skipped == {"before_forget": 1}
    assert summary.new_users == 1  # cat, whose file rows are gone
    assert all(isinstance(v, (int, dict)) for v in summary.as_metrics().values())


def _append(store_url: str, events: list[tuple[str, str, float, float]]) -> None:
    store = open_store(store_url)
    try:
        batch = [FeedbackEvent(u, i, RATING, r, at, f"{u}-{i}-{at}") for u, i, r, at in events]
        assert store.append(batch).accepted == len(batch)
    finally:
        store.close()


@pytest.fixture(params=["sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store of each kind."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'feedback.db'}"
        return
    need_redis_server()
    with redis_server(tmp_path / "redis") as server:
        yield server.url


def test_fold_feedback_pages_through_a_store(url: str) -> None:
    _append(url, [("fay", "i1", 4.0, 1.0), ("gus", "i1", 2.0, 2.0), ("gus", "i2", 5.0, 3.0)])
    store = open_store(url)
    try:
        store.forget("fay")
        store.forget("gus")
    finally:
        store.close()
    _append(url, [("gus", "i2", 1.0, 4.0), ("hal", "i1", 3.0, 5.0), ("hal", "i2", 3.5, 6.0)])
    store = open_store(url)
    try:
        log = read_log(store, page=2)  # 3 pages plus a partial one
        assert [s.event.user_id for s in log.events] == ["gus", "hal", "hal"]
        assert set(log.tombstones) == {store.user_hash("fay"), store.user_hash("gus")}
    finally:
        store.close()

    data = _dataset([("fay", "i1", 5.0, 0), ("gus", "i2", 5.0, 0), ("ivy", "i1", 1.0, 0)])
    test = Ratings.from_columns(["fay", "ivy", "gus"], ["i2", "i2", "i1"], [1.0, 2.0, 3.0])
    folded = fold_feedback(url, data, test)
    assert _rows(folded.dataset.ratings) == {
        ("gus", "i2"): [1.0],
        ("hal", "i1"): [3.0],
        ("hal", "i2"): [3.5],
        ("ivy", "i1"): [1.0],
    }
    assert folded.test is not None and folded.test.user_ids.tolist() == ["ivy"]
    assert folded.summary.file_users_forgotten == 2
    assert folded.summary.test_ratings_forgotten == 2


def test_a_missing_sqlite_store_is_an_error_not_an_empty_store(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    with pytest.raises(BertrecError, match="no such file"):
        fold_feedback(f"sqlite://{missing}", _dataset([("ann", "i1", 3.0, 0)]))
    assert not missing.exists()
