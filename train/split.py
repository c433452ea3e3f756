"""Reproducible evaluation splits: per-user holdout on warm items plus held-out cold items."""

from __future__ import annotations

import numpy as np

from bertrec.train.dataset import Dataset, Ratings, Split


def split_dataset(
    dataset: Dataset,
    test_fraction: float = 0.2,
    cold_fraction: float = 0.1,
    min_user_ratings: int = 5,
    seed: int = 0,
) -> Split:
    """Hold out `cold_fraction` of the items that have text (all their ratings go to
    `cold_test`) and, per user with at least `min_user_ratings` warm ratings, a random
    `test_fraction` of that user's ratings. Same inputs and seed -> same split."""
    ratings = dataset.ratings
    rng = np.random.default_rng(seed)
    cold = _pick_cold_items(dataset, cold_fraction, rng)
    is_cold = np.fromiter((i in cold for i in ratings.item_ids), dtype=bool, count=len(ratings))
    warm_rows = np.flatnonzero(~is_cold)
    test_mask = per_user_holdout(ratings.user_ids[warm_rows], test_fraction, min_user_ratings, rng)
    return Split(
        train=ratings.subset(warm_rows[~test_mask]),
        test=ratings.subset(warm_rows[test_mask]),
        cold_test=ratings.subset(np.flatnonzero(is_cold)),
        cold_items=frozenset(cold),
    )


def split_with_test(train: Dataset, test: Ratings) -> Split:
    """Use an external test file: cold items are test items never seen in training."""
    seen = set(train.ratings.item_ids.tolist())
    is_cold = np.fromiter((i not in seen for i in test.item_ids), dtype=bool, count=len(test))
    cold = frozenset(i for i in test.item_ids[is_cold].tolist() if i in train.item_texts)
    keep_cold = np.fromiter((i in cold for i in test.item_ids), dtype=bool, count=len(test))
    return Split(
        train=train.ratings,
        test=test.subset(~is_cold),
        cold_test=test.subset(keep_cold),
        cold_items=cold,
    )


def _pick_cold_items(dataset: Dataset, fraction: float, rng: np.random.Generator) -> set[str]:
    candidates = sorted(set(dataset.ratings.item_ids.tolist()) & set(dataset.item_texts))
    n_cold = round(fraction * len(candidates))
    if n_cold == 0:
        return set()
    return {candidates[i] for i in rng.choice(len(candidates), size=n_cold, replace=False)}


def per_user_holdout(
    users: np.ndarray, fraction: float, min_ratings: int, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of held-out rows: per user with >= `min_ratings` rows, a random `fraction`
    (rounded down, at least 1) of them. The quality benchmark's protocol cuts its splits with
    this too, so bertrec's trainer can be fed exactly the benchmark's rows."""
    _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
    noise = rng.random(len(users))
    # Rank each row within its user by random noise; hold out the lowest ranks.
    order = np.lexsort((noise, inverse))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(users), dtype=np.int64)
    rank[order] = np.arange(len(users)) - np.repeat(first, counts)
    n_test = np.where(counts >= min_ratings, np.maximum(1, np.floor(fraction * counts)), 0)
    return rank < n_test[inverse]
