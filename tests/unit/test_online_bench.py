"""The online evaluation's protocol (bench/online_protocol.py): the time split, the stream's
order and sampling, the per-event metrics and the paired lift. No server, no model."""

from __future__ import annotations

import numpy as np
import pytest

from bertrec.bench.online_protocol import (
    paired_lift,
    relevant,
    stream_order,
    target_metrics,
    time_holdout,
)
from bertrec.bench.quality_protocol import RatingArrays


def arrays(users: list[int], items: list[int], stamps: list[int] | None) -> RatingArrays:
    n = len(users)
    return RatingArrays(
        users=np.asarray(users, np.int32),
        items=np.asarray(items, np.int32),
        ratings=np.linspace(1.0, 5.0, n).astype(np.float32),
        timestamps=None if stamps is None else np.asarray(stamps, np.int64),
        rows=np.arange(n, dtype=np.int64),
        n_users=max(users) + 1,
        n_items=max(items) + 1,
    )


def test_time_holdout_keeps_each_users_latest_fifth_out() -> None:
    # user 0: 10 ratings in shuffled file order -> the 2 latest (t=90, t=100) held out;
    # user 1: 4 ratings (< 5) -> all in train; user 2: 5 ratings -> the latest 1 held out.
    stamps0 = [50, 100, 10, 90, 30, 20, 80, 40, 70, 60]
    users = [0] * 10 + [1] * 4 + [2] * 5
    stamps = [*stamps0, 1, 2, 3, 4, 5, 9, 7, 6, 8]
    split = time_holdout(arrays(users, list(range(19)), stamps))
    assert split.test.rows.tolist() == [1, 3, 15]
    assert sorted(split.train.rows.tolist()) == sorted(set(range(19)) - {1, 3, 15})
    assert split.test.timestamps is not None
    for user in (0, 2):  # nothing held out is older than anything kept, per user
        kept = split.train.timestamps[split.train.users == user]
        out = split.test.timestamps[split.test.users == user]
        assert out.min() > kept.max()


def test_time_holdout_breaks_ties_in_time_by_file_order() -> None:
    split = time_holdout(arrays([0] * 5, [0, 1, 2, 3, 4], [7] * 5))
    assert split.test.rows.tolist() == [4]  # the last row of the file among equal stamps


def test_time_holdout_interleaved_users_match_the_offline_count_rule() -> None:
    rng = np.random.default_rng(3)
    users = rng.integers(0, 40, 2000)
    data = arrays(users.tolist(), rng.integers(0, 300, 2000).tolist(),
                  rng.integers(0, 10_000, 2000).tolist())  # fmt: skip
    split = time_holdout(data)
    counts = np.bincount(users, minlength=40)
    held = np.bincount(split.test.users, minlength=40)
    assert held.tolist() == np.maximum(1, counts // 5).tolist()
    assert len(split.train) + len(split.test) == 2000


def test_time_holdout_refuses_ratings_without_timestamps() -> None:
    with pytest.raises(ValueError, match="timestamps"):
        time_holdout(arrays([0] * 5, [0, 1, 2, 3, 4], None))


def test_stream_is_in_global_time_order_and_samples_whole_users() -> None:
    test = arrays([2, 0, 1, 0, 2, 1], [0, 1, 2, 3, 4, 5], [30, 10, 10, 20, 5, 40])
    order = stream_order(test)
    assert test.timestamps is not None
    assert order.tolist() == [4, 1, 2, 3, 0, 5]  # t=10 tie: user 0 before user 1
    assert stream_order(test, max_events=2).tolist() == [4, 1]
    sampled = stream_order(test, users=2, seed=1)
    kept_users = set(test.users[sampled].tolist())
    assert len(kept_users) == 2
    assert (
        sorted(sampled.tolist()) == np.flatnonzero(np.isin(test.users, list(kept_users))).tolist()
    )
    assert stream_order(test, users=2, seed=1).tolist() == sampled.tolist()  # deterministic


def test_target_metrics_hit_and_ndcg_by_rank() -> None:
    ranked = [f"i{n}" for n in range(12)]
    assert target_metrics(ranked, "i0") == (1.0, 1.0)
    assert target_metrics(ranked, "i2") == pytest.approx((1.0, 0.5))  # 1 / log2(4)
    assert target_metrics(ranked, "i9") == pytest.approx((1.0, 1 / np.log2(11)))
    assert target_metrics(ranked, "i10") == (0.0, 0.0)  # ranked, but below the top 10
    assert target_metrics(ranked[:3], "missing") == (0.0, 0.0)


def test_paired_lift_means_and_an_interval_that_holds_the_truth() -> None:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(200), 5)
    base = (rng.random(1000) < 0.1).astype(float)
    ours = np.maximum(base, rng.random(1000) < 0.1)  # fold-in finds more: a true lift
    lift = paired_lift(ours, base, users)
    assert lift.ours == pytest.approx(ours.mean())
    assert lift.base == pytest.approx(base.mean())
    assert lift.diff == pytest.approx(ours.mean() - base.mean())
    assert lift.diff_95[0] < lift.diff < lift.diff_95[1]
    assert lift.diff_95[0] > 0  # the lift is real here
    assert lift.relative_95[0] < lift.relative < lift.relative_95[1]
    assert (lift.n_events, lift.n_users) == (1000, 200)


def test_paired_lift_of_identical_models_is_exactly_zero() -> None:
    values = np.random.default_rng(1).random(300)
    lift = paired_lift(values, values.copy(), np.arange(300) % 7)
    assert lift.diff == 0.0 and lift.diff_95 == (0.0, 0.0) and lift.relative_95 == (0.0, 0.0)


def test_paired_lift_refuses_unpaired_arrays() -> None:
    with pytest.raises(ValueError):
        paired_lift(np.ones(3), np.ones(2), np.zeros(3))
    with pytest.raises(ValueError):
        paired_lift(np.ones(0), np.ones(0), np.zeros(0))


def test_relevant_is_rating_at_least_four() -> None:
    assert relevant(np.array([3.5, 4.0, 5.0, 0.5])).tolist() == [False, True, True, False]


def test_throughput_counts_only_calls_inside_the_window() -> None:
    from bertrec.bench.online_throughput import summarize_calls

    calls = [(0.5, 1.2, 1), (1.0, 1.5, 16), (1.5, 2.0, 16), (2.5, 3.1, 1)]  # (start, end, events)
    result = summarize_calls(calls, begin=1.0, end=3.0)
    assert (result["calls"], result["events"]) == (
        2,
        32,
    )  # the first starts early, the last ends late
    assert result["events_per_s"] == pytest.approx(32 / 1.0)  # wall: begin -> last end (2.0)
    assert result["latency_ms"]["max"] == pytest.approx(500.0)
    assert summarize_calls(calls, begin=5.0, end=6.0) == {"calls": 0}


def test_generated_events_have_unique_keys_and_one_user_per_call() -> None:
    from bertrec.bench.online_throughput import Catalogue, EventMaker

    maker = EventMaker(Catalogue([f"u{n}" for n in range(50)], ["a", "b", "c"]), "t", seed=0)
    batches = [maker.batch(16) for _ in range(20)]
    keys = [key for batch in batches for *_, key in batch]
    assert len(set(keys)) == len(keys) == 320
    assert all(len({user for user, *_ in batch}) == 1 for batch in batches)
    assert len({batch[0][0] for batch in batches}) > 1  # calls spread over users
    assert {rating for batch in batches for _, _, rating, _ in batch} <= set(np.arange(1, 11) / 2)


def test_cache_key_follows_the_training_rows_and_config() -> None:
    from types import SimpleNamespace

    from bertrec.bench.online_model import cache_key
    from bertrec.train.pipeline import TrainConfig

    data = SimpleNamespace(
        user_ids=np.array(["u0", "u1"]), item_ids=np.array(["a", "b"]), item_texts=["x", ""]
    )
    train = arrays([0, 1, 1], [0, 1, 0], [1, 2, 3])
    cfg = TrainConfig(baselines=False, progress=False)
    key = cache_key(data, train, cfg)  # type: ignore[arg-type]
    assert key == cache_key(data, train, TrainConfig(baselines=False, progress=False))  # type: ignore[arg-type]
    assert key != cache_key(data, train.subset(np.array([0, 1])), cfg)  # type: ignore[arg-type]
    assert key != cache_key(
        data, train, TrainConfig(baselines=False, progress=False, max_seq_len=64)
    )  # type: ignore[arg-type]
    other_text = SimpleNamespace(**{**vars(data), "item_texts": ["y", ""]})
    assert key != cache_key(other_text, train, cfg)  # type: ignore[arg-type]
