"""The online evaluation's protocol (issue 11): a time split, the replayed stream, its metrics.

No server and no model here, so every rule can be unit-tested on a few rows:

- `time_holdout`: per user with >= 5 ratings, the last 20% of their ratings by timestamp
  (rounded down, at least 1; ties in time broken by file order) are held out; the rest train.
  The count rule is `per_user_holdout`'s, so the split has the offline protocol's size.
- `stream_order`: the held-out events replayed in global time order (ties: user, then file
  order), optionally only a seeded sample of users and the first `max_events` of the stream.
- `target_metrics`: hit@k and NDCG@k of one target item in a ranked list (the one relevant
  item, so the ideal DCG is 1 and NDCG is 1 / log2(rank + 1) for a 1-based rank <= k).
- `paired_lift`: fold-in against frozen on the same events, with a bootstrap interval that
  resamples users (a user's events share their taste, so events are not independent).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bertrec.bench.quality_protocol import (
    MIN_USER_RATINGS,
    RELEVANT_RATING,
    TEST_FRACTION,
    TOP_K,
    HoldoutSplit,
    RatingArrays,
)


def time_holdout(
    data: RatingArrays,
    fraction: float = TEST_FRACTION,
    min_ratings: int = MIN_USER_RATINGS,
) -> HoldoutSplit:
    """Hold out each user's latest `fraction` of ratings (see the module docstring).

    Raises:
        ValueError: the ratings have no timestamps.
    """
    if data.timestamps is None:
        raise ValueError("a time split needs timestamps; this ratings file has none")
    order = np.lexsort((data.rows, data.timestamps, data.users))  # by user, then time
    _, counts = np.unique(data.users, return_counts=True)
    first = np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    rank = np.empty(len(data), dtype=np.int64)  # each row's position in its user's timeline
    rank[order] = np.arange(len(data)) - first
    n_test = np.where(counts >= min_ratings, np.maximum(1, np.floor(fraction * counts)), 0)
    n_per_row = np.empty(len(data), dtype=np.int64)
    n_per_row[order] = np.repeat(n_test.astype(np.int64), counts)
    total = np.empty(len(data), dtype=np.int64)
    total[order] = np.repeat(counts, counts)
    held_out = rank >= total - n_per_row
    return HoldoutSplit(train=data.subset(~held_out), test=data.subset(held_out))


def stream_order(
    test: RatingArrays, users: int | None = None, max_events: int | None = None, seed: int = 0
) -> np.ndarray:
    """Positions in `test` to replay, in global time order.

    Args:
        test: the held-out events (with timestamps).
        users: keep only this many users, drawn with `seed` (None: every user).
        max_events: keep only the first this many events of the (sampled) stream.
        seed: the user sample's seed.
    """
    assert test.timestamps is not None, "time_holdout keeps the timestamps"
    keep = np.arange(len(test))
    present = np.unique(test.users)
    if users is not None and users < len(present):
        chosen = np.random.default_rng(seed).choice(present, size=users, replace=False)
        keep = keep[np.isin(test.users, chosen)]
    order = keep[np.lexsort((test.rows[keep], test.users[keep], test.timestamps[keep]))]
    return order if max_events is None else order[:max_events]


def target_metrics(ranked: list[str], target: str, k: int = TOP_K) -> tuple[float, float]:
    """(hit@k, NDCG@k) of `target` in the ranked ids (best first)."""
    try:
        position = ranked.index(target, 0, k)
    except ValueError:
        return 0.0, 0.0
    return 1.0, float(1.0 / np.log2(position + 2))


@dataclass(frozen=True)
class Lift:
    """Fold-in (`ours`) against frozen (`base`) on the same events: means, the absolute and
    relative difference, and bootstrap 95% intervals of both, resampling users."""

    ours: float
    base: float
    diff: float
    diff_95: tuple[float, float]
    relative: float
    relative_95: tuple[float, float]
    n_events: int
    n_users: int


def paired_lift(
    ours: np.ndarray,
    base: np.ndarray,
    users: np.ndarray,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Lift:
    """Means of two per-event metrics measured on the same events, and their lift.

    The interval resamples whole users with replacement (a cluster bootstrap): each draw
    sums both metrics over the drawn users' events, so the two stay paired and the
    correlation among one user's events is kept.

    Raises:
        ValueError: the arrays differ in length, or there are no events.
    """
    if not len(ours) == len(base) == len(users) or len(users) == 0:
        raise ValueError("paired_lift needs equally long, non-empty per-event arrays")
    ids, inverse = np.unique(users, return_inverse=True)
    sum_ours = np.bincount(inverse, weights=ours, minlength=len(ids))
    sum_base = np.bincount(inverse, weights=base, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    picks = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))
    n = counts[picks].sum(axis=1)
    a, b = sum_ours[picks].sum(axis=1) / n, sum_base[picks].sum(axis=1) / n
    tail = (1.0 - level) / 2 * 100
    mean_ours, mean_base = float(ours.mean()), float(base.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = a / b - 1.0
    return Lift(
        ours=mean_ours,
        base=mean_base,
        diff=mean_ours - mean_base,
        diff_95=_interval(a - b, tail),
        relative=mean_ours / mean_base - 1.0 if mean_base > 0 else float("nan"),
        relative_95=_interval(relative, tail),
        n_events=len(users),
        n_users=len(ids),
    )


def _interval(draws: np.ndarray, tail: float) -> tuple[float, float]:
    finite = draws[np.isfinite(draws)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def relevant(ratings: np.ndarray, threshold: float = RELEVANT_RATING) -> np.ndarray:
    """Mask of the events that count in the "liked" variant (rating >= 4.0)."""
    return np.asarray(ratings >= threshold)
