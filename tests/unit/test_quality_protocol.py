"""The quality protocol (split, metrics, masking) and its peers against independent versions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bertrec.bench.quality_models import (
    fit_ease,
    fit_implicit_als,
    fit_popularity,
    fit_surprise,
    surprise_trainset,
)
from bertrec.bench.quality_peers import Peer, Tuned, grid, run_peers, tune
from bertrec.bench.quality_protocol import (
    RankingResult,
    RatingArrays,
    cold_item_split,
    holdout_split,
    index_ratings,
    ranking_metrics,
    rating_metrics,
    relative_gain_interval,
    top_k,
    validation_split,
)
from bertrec.train.dataset import Dataset, Ratings
from bertrec.train.split import split_dataset


def arrays(users: list[int], items: list[int], ratings: list[float], n_items: int) -> RatingArrays:
    return RatingArrays(
        users=np.asarray(users, np.int32),
        items=np.asarray(items, np.int32),
        ratings=np.asarray(ratings, np.float32),
        timestamps=None,
        rows=np.arange(len(users), dtype=np.int64),
        n_users=max(users) + 1,
        n_items=n_items,
    )


def random_ratings(n_users: int, n_items: int, seed: int, per_user: int = 12) -> RatingArrays:
    """Each user rates a distinct random set of `per_user` items (fewer for the first users)."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        count = min(per_user, 2 + u)  # users 0..2 have fewer than 5 ratings
        users += [u] * count
        items += rng.choice(n_items, size=count, replace=False).tolist()
    ratings = rng.integers(1, 11, size=len(users)) / 2
    return arrays(users, items, ratings.tolist(), n_items)


class FixedScores:
    """A model whose scores are a given matrix (and predictions read from it)."""

    def __init__(self, scores: np.ndarray, ranking_only: bool = False) -> None:
        self.scores = scores.astype(np.float32)
        self.ranking_only = ranking_only

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        return None if self.ranking_only else self.scores[users, items]

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return self.scores[users]  # the protocol must not write into this


# ---------------------------------------------------------------------------------- split


def test_holdout_split_is_seeded_keeps_small_users_whole_and_holds_out_20_percent() -> None:
    data = random_ratings(40, 60, seed=1)
    split = holdout_split(data)
    again = holdout_split(data)
    assert np.array_equal(split.test.rows, again.test.rows)
    assert not np.array_equal(split.test.rows, holdout_split(data, seed=5).test.rows)
    assert sorted([*split.train.rows, *split.test.rows]) == list(range(len(data)))
    counts = np.bincount(data.users)
    held = np.bincount(split.test.users, minlength=len(counts))
    assert np.array_equal(held, np.where(counts >= 5, np.floor(0.2 * counts), 0))
    assert held[:3].sum() == 0 and counts[:3].max() < 5


def test_holdout_split_matches_the_trainers_split_with_no_cold_items() -> None:
    # Same rows as bertrec.train.split, so bertrec's own trainer can be fed the same split.
    data = random_ratings(30, 50, seed=2)
    source = Ratings.from_columns(
        [f"u{u}" for u in data.users], [f"i{i}" for i in data.items], data.ratings.tolist()
    )
    indexed = index_ratings(source, {})
    ours = holdout_split(indexed.ratings)
    theirs = split_dataset(Dataset(source), cold_fraction=0.0, seed=0)
    assert indexed.texts_of(ours.test).user_ids.tolist() == theirs.test.user_ids.tolist()
    assert indexed.texts_of(ours.test).item_ids.tolist() == theirs.test.item_ids.tolist()


def test_validation_split_is_cut_from_train_with_another_seed() -> None:
    split = holdout_split(random_ratings(40, 60, seed=3))
    valid = validation_split(split.train)
    assert set(valid.test.rows) | set(valid.train.rows) == set(split.train.rows)
    assert not set(valid.test.rows) & set(split.test.rows)
    same_seed = holdout_split(split.train, seed=0).test.rows
    assert not np.array_equal(valid.test.rows, same_seed)


def test_cold_item_split_sends_every_rating_of_a_cold_item_to_test() -> None:
    data = random_ratings(20, 30, seed=4)
    has_text = np.arange(30) % 3 != 0  # items 0, 3, 6, ... have no text: never cold
    split = cold_item_split(data, has_text, fraction=0.2, seed=0)
    assert len(split.cold_items) == round(0.2 * has_text.sum())
    assert has_text[split.cold_items].all()
    assert np.isin(split.cold_test.items, split.cold_items).all()
    assert not np.isin(split.train.items, split.cold_items).any()
    assert len(split.train) + len(split.cold_test) == len(data)
    assert np.array_equal(split.cold_items, cold_item_split(data, has_text, 0.2, 0).cold_items)


def test_index_ratings_numbers_ids_in_sorted_order_and_aligns_texts() -> None:
    source = Ratings.from_columns(["b", "a", "b"], ["y", "x", "z"], [4.0, 3.0, 5.0])
    data = index_ratings(source, {"x": "text x", "z": "text z"})
    assert data.user_ids.tolist() == ["a", "b"] and data.item_ids.tolist() == ["x", "y", "z"]
    assert data.ratings.users.tolist() == [1, 0, 1] and data.ratings.items.tolist() == [1, 0, 2]
    assert data.item_texts == ["text x", "", "text z"]
    assert data.has_text.tolist() == [True, False, True]
    assert data.ratings.timestamps is None


def test_matrix_keeps_one_entry_per_repeated_pair() -> None:
    data = arrays([0, 0, 1], [2, 2, 0], [3.0, 5.0, 4.0], n_items=3)
    assert data.matrix().toarray().tolist() == [[0, 0, 1], [1, 0, 0]]
    assert data.matrix(binary=False).toarray().tolist() == [[0, 0, 5], [4, 0, 0]]


# -------------------------------------------------------------------------------- metrics


def test_ranking_metrics_by_hand() -> None:
    # User 0 rated item 0 in train; held out: items 2 (5.0), 4 (4.0) relevant, 3 (2.0) not.
    # User 1 has no relevant held-out rating and is not evaluated.
    train = arrays([0, 1], [0, 1], [5.0, 5.0], n_items=6)
    test = arrays([0, 0, 0, 1], [2, 4, 3, 0], [5.0, 4.0, 2.0, 3.5], n_items=6)
    scores = np.array([[9, 5, 4, 3, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=np.float32)
    model = FixedScores(scores)
    result = ranking_metrics(model, train, test, k=2)
    # Item 0 is masked: the top 2 are items 1 and 2, one hit at rank 2 of 2 relevant.
    assert result.users.tolist() == [0]
    assert result.ndcg == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert result.recall == pytest.approx(0.5)
    assert model.scores[0, 0] == 9  # the model's buffer was not overwritten by the mask
    # k = 1: the denominator is min(|relevant|, 1) = 1, so a miss at rank 1 scores 0.
    assert ranking_metrics(model, train, test, k=1).recall == 0.0
    # k = 4: top 1, 2, 3, 4 -> hits at ranks 2 and 4.
    expected = (1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))
    assert ranking_metrics(model, train, test, k=4).ndcg == pytest.approx(expected)


def test_recall_denominator_is_capped_at_k() -> None:
    # Three relevant items, k = 2, both top items relevant: recall 1 and NDCG 1.
    train = arrays([0], [5], [3.0], n_items=6)
    test = arrays([0, 0, 0], [0, 1, 2], [4.0, 4.5, 5.0], n_items=6)
    scores = np.array([[6, 5, 1, 2, 3, 9]], dtype=np.float32)
    result = ranking_metrics(FixedScores(scores), train, test, k=2)
    assert result.recall == pytest.approx(1.0) and result.ndcg == pytest.approx(1.0)


def test_ties_go_to_the_lower_item_and_candidates_restrict_the_ranking() -> None:
    scores = np.array([[1, 3, 3, 3, 0]], dtype=np.float32)
    assert top_k(scores, 2).tolist() == [[1, 2]]
    train = arrays([0], [0], [3.0], n_items=5)
    test = arrays([0, 0], [3, 4], [4.0, 4.0], n_items=5)
    # Only items 3 and 4 may be ranked (cold items): item 3 first, a hit at rank 1 of 2.
    result = ranking_metrics(FixedScores(scores), train, test, k=1, candidates=np.array([3, 4]))
    assert result.ndcg == 1.0 and result.recall == 1.0


def test_rating_metrics_and_ranking_only_models() -> None:
    test = arrays([0, 0], [0, 1], [4.0, 2.0], n_items=2)
    scores = np.array([[3.0, 4.0]])
    result = rating_metrics(FixedScores(scores), test)
    assert result is not None
    assert result.rmse == pytest.approx(np.sqrt((1 + 4) / 2))
    assert result.mae == pytest.approx(1.5)
    assert rating_metrics(FixedScores(scores, ranking_only=True), test) is None


def test_nan_scores_are_refused() -> None:
    train = arrays([0], [0], [3.0], n_items=2)
    test = arrays([0], [1], [5.0], n_items=2)
    with pytest.raises(ValueError, match="NaN"):
        ranking_metrics(FixedScores(np.array([[0.0, np.nan]])), train, test)


# ---------------------------------------------------------------------------------- peers


def ease_by_ridge(x: np.ndarray, lam: float) -> np.ndarray:
    """EASE without the closed form: per item, ridge-regress its column on every other one."""
    n = x.shape[1]
    b = np.zeros((n, n))
    for j in range(n):
        others = np.delete(np.arange(n), j)
        xo = x[:, others]
        b[others, j] = np.linalg.solve(xo.T @ xo + lam * np.eye(n - 1), xo.T @ x[:, j])
    return b


@pytest.mark.parametrize(("n_users", "n_items"), [(30, 8), (6, 20)])  # item side, user side
def test_ease_matches_a_brute_force_ridge_regression(n_users: int, n_items: int) -> None:
    data = random_ratings(n_users, n_items, seed=5, per_user=5)
    x = data.matrix().toarray().astype(np.float64)
    expected = x @ ease_by_ridge(x, lam=3.0)
    model = fit_ease(data, {"lam": 3.0})
    users = np.arange(n_users)
    np.testing.assert_allclose(model.score_users(users), expected, atol=1e-4)
    assert model.predict(users, users) is None


@pytest.mark.parametrize(
    "params",
    [
        {"algo": "baseline", "reg_i": 5, "reg_u": 5, "n_epochs": 5},
        {"algo": "svd", "n_factors": 4, "n_epochs": 5},
        {"algo": "svdpp", "n_factors": 4, "n_epochs": 5},
    ],
)
def test_surprise_predictions_equal_the_librarys_own(params: dict[str, object]) -> None:
    import surprise

    data = random_ratings(25, 30, seed=6)
    train = data.subset(data.items != 7)  # item 7 stays unknown to the model
    model = fit_surprise(train, params)
    options = {k: v for k, v in params.items() if k != "algo"}
    algo = {
        "baseline": lambda: surprise.BaselineOnly({"method": "als", **options}, verbose=False),
        "svd": lambda: surprise.SVD(random_state=0, **options),
        "svdpp": lambda: surprise.SVDpp(random_state=0, cache_ratings=True, **options),
    }[str(params["algo"])]()
    algo.fit(surprise_trainset(train)[0])
    users, items = data.users, data.items
    theirs = [algo.predict(int(u), int(i)).est for u, i in zip(users, items, strict=True)]
    predicted = model.predict(users, items)
    assert predicted is not None
    np.testing.assert_allclose(predicted, theirs, atol=1e-6)
    scores = model.score_users(np.arange(data.n_users))
    ranked = np.clip(scores[users, items], train.ratings.min(), train.ratings.max())
    np.testing.assert_allclose(ranked, theirs, atol=1e-5)


def test_implicit_als_scores_every_item_and_predicts_no_ratings() -> None:
    data = random_ratings(20, 15, seed=7)
    params = {"weight": "rating", "factors": 4, "regularization": 0.1, "alpha": 2.0}
    model = fit_implicit_als(data, {**params, "iterations": 3}, threads=1)
    assert model.score_users(np.array([0, 3])).shape == (2, 15)
    assert model.predict(data.users, data.items) is None


def test_tune_chooses_on_validation_then_refits_on_train_and_validation() -> None:
    data = random_ratings(30, 20, seed=8)
    split = validation_split(data)
    seen: list[int] = []

    def build(train: RatingArrays, params: dict[str, object]) -> FixedScores:
        seen.append(len(train))
        # A "model" that predicts its constant; 3.0 is nearest the ratings' mean (about 3).
        return FixedScores(np.full((train.n_users, train.n_items), float(str(params["c"]))))

    stages = [grid(c=[0.5, 3.0, 5.0]), [{"c": 4.5}]]  # the second stage finds nothing better
    tuned = tune("const", build, stages, split.train, split.test, "rmse")
    assert tuned.chosen == {"c": 3.0} and tuned.grid_size == 4
    assert seen == [len(split.train)] * 4 + [len(data)]
    seen.clear()  # one point: nothing to choose, so no validation fit
    single = tune("const", build, [[{"c": 1.0}]], split.train, split.test, "rmse")
    assert seen == [len(data)] and np.isnan(single.valid_score)


def test_popularity_counts_train_ratings() -> None:
    model = fit_popularity(arrays([0, 1, 1], [2, 2, 0], [1.0, 2.0, 3.0], n_items=3), {})
    assert model.score_users(np.array([0])).tolist() == [[1.0, 0.0, 2.0]]
    assert model.predict(np.array([0]), np.array([0])) is None


def test_relative_gain_interval_pairs_users() -> None:
    users = np.arange(50, dtype=np.int32)
    base = np.random.default_rng(0).random(50)
    theirs = RankingResult(0.0, 0.0, users, base, base)
    ours = RankingResult(0.0, 0.0, users, base * 1.1, base)  # exactly +10% for every user
    low, high = relative_gain_interval(ours, theirs)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
    low, high = relative_gain_interval(ours, theirs, metric="recall")
    assert low == pytest.approx(0.0) and high == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same users"):
        relative_gain_interval(ours, RankingResult(0.0, 0.0, users[:3], base[:3], base[:3]))


def test_ranking_metrics_match_a_per_user_loop_on_random_data() -> None:
    data = random_ratings(25, 40, seed=9)
    split = holdout_split(data)
    scores = np.random.default_rng(10).normal(size=(data.n_users, data.n_items))
    result = ranking_metrics(FixedScores(scores), split.train, split.test, k=5, block=7)
    expected = {}
    for u in range(data.n_users):
        relevant = set(split.test.items[(split.test.users == u) & (split.test.ratings >= 4)])
        if not relevant:
            continue
        rated = set(split.train.items[split.train.users == u])
        ranked = [i for i in np.argsort(-scores[u].astype(np.float32)) if i not in rated][:5]
        dcg = sum(1 / np.log2(r + 2) for r, i in enumerate(ranked) if i in relevant)
        ideal = sum(1 / np.log2(r + 2) for r in range(min(len(relevant), 5)))
        hits = sum(i in relevant for i in ranked)
        expected[u] = (dcg / ideal, hits / min(len(relevant), 5))
    assert len(expected) >= 5 and result.users.tolist() == sorted(expected)
    np.testing.assert_allclose(result.user_ndcg, [expected[u][0] for u in sorted(expected)])
    np.testing.assert_allclose(result.user_recall, [expected[u][1] for u in sorted(expected)])


def test_run_peers_scores_each_tuned_peer_on_the_test_split() -> None:
    split = holdout_split(random_ratings(30, 20, seed=11))

    def popularity(train: RatingArrays, valid: RatingArrays) -> Tuned:
        return tune("popularity", fit_popularity, [[{}]], train, valid, "ndcg@10")

    (run,) = run_peers(split, [Peer("popularity", popularity)])
    expected = ranking_metrics(fit_popularity(split.train, {}), split.train, split.test)
    assert run.quality.ranking.ndcg == expected.ndcg
    row = run.row()
    assert row["model"] == "popularity" and row["rmse"] is None and row["valid_score"] is None
    json.loads(json.dumps(row, allow_nan=False))
