"""The ranking head (iALS with a text prior) and the rating head (SVD++), against exact
solutions and trivial baselines on small data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from bertrec.repository.artifacts import RATING_HEAD_SCORE, RATING_SCORE, FactorArrays
from bertrec.train.ials import IALSConfig, _sweep, confidence_matrix, fit_ials
from bertrec.train.indexing import Interactions
from bertrec.train.rating_head import RatingConfig, fit_rating_head


def _random_conf(rng: np.random.Generator, n_users: int = 30, n_items: int = 40) -> sp.csr_matrix:
    dense = (rng.random((n_users, n_items)) < 0.2) * rng.uniform(0.5, 5.0, (n_users, n_items))
    return sp.csr_matrix(dense)


def test_conjugate_gradient_sweep_solves_the_normal_equations() -> None:
    rng = np.random.default_rng(0)
    conf, d, reg = _random_conf(rng), 6, 0.7
    other = rng.standard_normal((conf.shape[1], d))
    prior = rng.standard_normal((conf.shape[0], d))
    got = _sweep(conf, other, np.zeros((conf.shape[0], d)), reg, prior, steps=d)
    dense = conf.toarray()
    for u in range(conf.shape[0]):
        weights = np.where(dense[u] > 0, dense[u], 1.0)
        target = (dense[u] > 0).astype(float)
        a = other.T @ (weights[:, None] * other) + reg * np.eye(d)
        b = other.T @ (weights * target) + reg * prior[u]
        np.testing.assert_allclose(got[u], np.linalg.solve(a, b), atol=1e-6)


def test_unrated_items_get_factors_from_text_alone() -> None:
    rng = np.random.default_rng(1)
    n_users, n_items, hidden = 30, 40, 5
    text = rng.standard_normal((n_items, hidden)).astype(np.float32)
    conf = _random_conf(rng, n_users, n_items).tolil()
    conf[:, -3:] = 0  # three items nobody rated
    f = fit_ials(conf.tocsr(), IALSConfig(dim=4, reg=1.0, iterations=3), text)
    assert f.text_map is not None
    np.testing.assert_allclose(f.item_factors[-3:], text[-3:] @ f.text_map, rtol=1e-5)
    assert np.abs(f.item_factors[-3:]).sum() > 0


def test_high_ratings_weigh_more() -> None:
    cfg = IALSConfig(alpha=4.0, power=2.0)
    conf = confidence_matrix(np.array([0, 0]), np.array([0, 1]), np.array([5.0, 2.5]), (1, 2), cfg)
    np.testing.assert_allclose(conf.toarray(), [[4.0, 1.0]])


def test_rating_head_beats_the_global_mean() -> None:
    rng = np.random.default_rng(2)
    n_users, n_items = 60, 50
    truth = 3.5 + rng.normal(0, 0.5, n_users)[:, None] + rng.normal(0, 0.7, n_items)[None, :]
    users, items = np.nonzero(rng.random((n_users, n_items)) < 0.4)
    ratings = np.clip(truth[users, items] + rng.normal(0, 0.3, len(users)), 1, 5)
    held = rng.random(len(users)) < 0.2
    train = Interactions(users[~held], items[~held], ratings[~held].astype(np.float32))
    f = fit_rating_head(train, n_users, n_items, RatingConfig(dim=4, steps=200, reg=1.0))
    u, i = users[held], items[held]
    pred = (
        f.global_mean
        + f.user_bias[u]
        + f.item_bias[i]
        + (f.user_factors[u] * f.item_factors[i]).sum(1)
    )
    rmse = np.sqrt(np.mean((pred - ratings[held]) ** 2))
    assert rmse < np.sqrt(np.mean((train.ratings.mean() - ratings[held]) ** 2)) * 0.8


def test_rating_head_arrays_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n_users, n_items, d = 4, 5, 3

    def f32(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    plain = FactorArrays(
        user_ids=np.array(["a", "b", "c", "d"]),
        item_ids=np.array([str(i) for i in range(n_items)]),
        user_factors=f32(n_users, d),
        item_factors=f32(n_items, d),
        user_bias=f32(n_users),
        item_bias=f32(n_items),
        item_rank_bias=f32(n_items),
        text_to_user=f32(d, d),
        rated_indptr=np.zeros(n_users + 1, dtype=np.int64),
        rated_indices=np.zeros(0, dtype=np.int32),
        global_mean=3.0,
    )
    assert plain.rating_score == RATING_SCORE and not plain.has_rating_head
    headed = replace(
        plain, rating_user_factors=f32(n_users, 2), rating_item_factors=f32(n_items, 2)
    )
    assert headed.rating_score == RATING_HEAD_SCORE
    assert headed.shape_mismatch(n_users, n_items, d) is None
    headed.save(tmp_path)
    loaded = FactorArrays.load(tmp_path, 3.0, mmap=False)
    assert loaded.rating_item_factors is not None
    np.testing.assert_array_equal(loaded.rating_item_factors, headed.rating_item_factors)
    bad = replace(headed, rating_item_factors=f32(n_items, 3))
    assert "rating_item_factors" in (bad.shape_mismatch(n_users, n_items, d) or "")
    text = replace(headed, item_text_factors=f32(n_items, d))
    text.save(tmp_path)
    back = FactorArrays.load(tmp_path, 3.0, mmap=False).item_text_factors
    assert back is not None and back.shape == (n_items, d)
    wrong = replace(headed, item_text_factors=f32(n_items, d + 1))
    assert "item_text_factors" in (wrong.shape_mismatch(n_users, n_items, d) or "")
    half = replace(plain, rating_user_factors=f32(n_users, 2))
    assert "both" in (half.shape_mismatch(n_users, n_items, d) or "")
