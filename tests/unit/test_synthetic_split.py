from __future__ import annotations

import numpy as np

from bertrec.train.dataset import Dataset, Ratings
from bertrec.train.split import split_dataset, split_with_test
from bertrec.train.synthetic import SyntheticConfig, generate

SMALL = SyntheticConfig(n_users=200, n_items=150, seed=3)


def test_generator_is_deterministic_and_seed_sensitive() -> None:
    a, _ = generate(SMALL)
    b, _ = generate(SMALL)
    c, _ = generate(SyntheticConfig(n_users=200, n_items=150, seed=4))
    assert np.array_equal(a.ratings.ratings, b.ratings.ratings)
    assert a.item_texts == b.item_texts
    assert not np.array_equal(a.ratings.item_ids[:200], c.ratings.item_ids[:200])


def test_generated_data_is_biased_like_real_data() -> None:
    dataset, truth = generate(SMALL)
    r = dataset.ratings
    assert set(np.unique(r.ratings)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 3.2 < r.ratings.mean() < 4.2
    _, counts = np.unique(r.item_ids, return_counts=True)
    top_decile = np.sort(counts)[::-1][: len(counts) // 10].sum()
    assert top_decile > 0.2 * counts.sum()  # long tail: 10% of items take > 20% of ratings
    # Missing not at random: users rate items of their favourite genre far more often.
    users = np.array([int(u[1:]) for u in r.user_ids])
    items = np.array([int(i[1:]) for i in r.item_ids])
    fav = truth.user_taste.argmax(1)
    rated_share = truth.item_genres[items, fav[users]].mean()
    catalogue_share = truth.item_genres[:, fav].mean()
    assert rated_share > 1.5 * catalogue_share
    assert (np.char.str_len(r.reviews.astype(str)) > 0).mean() > 0.4


def test_split_is_reproducible_and_disjoint() -> None:
    dataset, _ = generate(SMALL)
    s1 = split_dataset(dataset, seed=11)
    s2 = split_dataset(dataset, seed=11)
    s3 = split_dataset(dataset, seed=12)
    assert s1.cold_items == s2.cold_items
    assert np.array_equal(s1.test.user_ids, s2.test.user_ids)
    assert np.array_equal(s1.test.item_ids, s2.test.item_ids)
    assert s1.cold_items != s3.cold_items
    assert len(s1.train) + len(s1.test) + len(s1.cold_test) == len(dataset.ratings)
    assert not (set(s1.train.item_ids.tolist()) & s1.cold_items)
    assert set(s1.cold_test.item_ids.tolist()) <= s1.cold_items
    assert len(s1.cold_items) == round(0.1 * 150)
    train_pairs = set(zip(s1.train.user_ids.tolist(), s1.train.item_ids.tolist(), strict=True))
    test_pairs = set(zip(s1.test.user_ids.tolist(), s1.test.item_ids.tolist(), strict=True))
    assert not train_pairs & test_pairs


def test_per_user_holdout_fraction() -> None:
    dataset, _ = generate(SMALL)
    split = split_dataset(dataset, test_fraction=0.2, seed=0)
    users, train_counts = np.unique(split.train.user_ids, return_counts=True)
    test_counts = dict(zip(*np.unique(split.test.user_ids, return_counts=True), strict=True))
    for user, n_train in zip(users.tolist(), train_counts.tolist(), strict=True):
        n_test = test_counts.get(user, 0)
        total = n_train + n_test
        if total >= 5:
            assert n_test == max(1, int(0.2 * total)), user


def test_external_test_set_marks_unseen_items_cold() -> None:
    train = Dataset(
        Ratings.from_columns(["a", "b"], ["x", "y"], [4.0, 5.0]),
        {"x": "t", "y": "t", "z": "a new item"},
    )
    test = Ratings.from_columns(["a", "b", "a"], ["y", "z", "w"], [3.0, 4.0, 2.0])
    split = split_with_test(train, test)
    assert split.cold_items == frozenset({"z"})  # "w" has no text: cannot be served cold
    assert split.test.item_ids.tolist() == ["y"]
    assert split.cold_test.item_ids.tolist() == ["z"]
