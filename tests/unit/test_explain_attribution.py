"""server/explain.py on in-memory arrays: the score split is exact, and on a converged iALS
fit the rated-item attribution sums to the served dot product (the ridge regression that
train/ials.py solves is the one explain inverts)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp

from bertrec.repository.artifacts import FactorArrays
from bertrec.server.explain import explain
from bertrec.train.ials import IALSConfig, attribution_arrays, fit_ials

N_USERS, N_ITEMS, DIM = 40, 30, 5


def _ials_arrays(cfg: IALSConfig, seed: int = 0) -> tuple[FactorArrays, sp.csr_matrix]:
    rng = np.random.default_rng(seed)
    stars = rng.integers(1, 6, (N_USERS, N_ITEMS)) * (rng.random((N_USERS, N_ITEMS)) < 0.25)
    users, items = np.nonzero(stars)
    weight = cfg.alpha * (stars[users, items] / 5.0) ** cfg.power
    conf = sp.csr_matrix((weight, (users, items)), shape=(N_USERS, N_ITEMS))
    f = fit_ials(conf, cfg)
    gramian, confidence = attribution_arrays(conf, f.item_factors, cfg.reg)
    arrays = FactorArrays(
        user_ids=np.array([f"u{i}" for i in range(N_USERS)]),
        item_ids=np.array([f"i{i}" for i in range(N_ITEMS)]),
        user_factors=f.user_factors,
        item_factors=f.item_factors,
        user_bias=np.zeros(N_USERS, np.float32),
        item_bias=np.zeros(N_ITEMS, np.float32),
        item_rank_bias=rng.normal(0, 0.1, N_ITEMS).astype(np.float32),
        text_to_user=np.eye(DIM, dtype=np.float32),
        rated_indptr=conf.indptr.astype(np.int64),
        rated_indices=conf.indices.astype(np.int32),
        global_mean=3.0,
        item_text_factors=(0.3 * f.item_factors).astype(np.float32),
        rank_gramian=gramian,
        rated_confidence=confidence,
    )
    return arrays, conf


def _scores(a: FactorArrays, u: int, rows: np.ndarray) -> np.ndarray:
    return a.item_factors[rows] @ a.user_factors[u] + a.item_rank_bias[rows]


def test_parts_sum_to_the_score_and_match_their_definitions() -> None:
    a, _ = _ials_arrays(IALSConfig(dim=DIM, reg=2.0, iterations=3))
    rows = np.array([3, 0, 17, 29])
    out = explain(a, [str(i) for i in a.item_ids], a.user_factors[5], 5, rows)
    total = np.array([e.bias_part + e.collaborative_part + e.text_part for e in out])
    np.testing.assert_allclose(total, _scores(a, 5, rows), atol=1e-5)
    assert a.item_text_factors is not None
    text = a.item_text_factors[rows].astype(np.float64) @ a.user_factors[5]
    np.testing.assert_allclose([e.text_part for e in out], text, atol=1e-6)
    np.testing.assert_allclose([e.bias_part for e in out], a.item_rank_bias[rows], atol=1e-7)


def test_attribution_sums_to_the_score_of_a_converged_fit() -> None:
    # Enough sweeps and CG steps that x_u is the ridge solution against the final Y.
    cfg = IALSConfig(dim=DIM, reg=2.0, iterations=60, cg_steps=DIM)
    a, conf = _ials_arrays(cfg)
    ids = [str(i) for i in a.item_ids]
    for u in (0, 7, 21):
        rows = np.arange(N_ITEMS)
        out = explain(a, ids, a.user_factors[u], u, rows)
        dots = [e.collaborative_part + e.text_part for e in out]
        totals = [e.contributions_total for e in out]
        np.testing.assert_allclose(totals, dots, atol=2e-3)
        rated = {ids[j] for j in conf[u].indices}
        for e in out:
            assert len(e.contributions) == min(3, len(rated))
            assert {c.item_id for c in e.contributions} <= rated
            values = [c.contribution for c in e.contributions]
            assert values == sorted(values, reverse=True)


def test_a_few_cg_steps_leave_a_small_gap_the_response_reports() -> None:
    a, _ = _ials_arrays(IALSConfig(dim=DIM, reg=2.0, iterations=15, cg_steps=3))
    out = explain(a, [str(i) for i in a.item_ids], a.user_factors[2], 2, np.arange(N_ITEMS))
    gap = np.array([e.contributions_total - (e.collaborative_part + e.text_part) for e in out])
    scale = np.abs([e.collaborative_part + e.text_part for e in out]).max()
    assert np.abs(gap).max() < 0.2 * scale  # close, not exact: documented in the proto


def test_text_queries_and_old_versions_have_no_contributions() -> None:
    a, _ = _ials_arrays(IALSConfig(dim=DIM, reg=2.0, iterations=3))
    ids = [str(i) for i in a.item_ids]
    rows = np.array([1, 2])
    vector = np.ones(DIM, np.float32)
    for e in explain(a, ids, vector, None, rows):
        assert e.contributions == () and e.contributions_total is None
    old = dataclasses.replace(a, item_text_factors=None, rank_gramian=None, rated_confidence=None)
    out = explain(old, ids, a.user_factors[4], 4, rows)
    assert [e.text_part for e in out] == [0.0, 0.0]
    assert all(e.contributions == () and e.contributions_total is None for e in out)
    total = [e.bias_part + e.collaborative_part for e in out]
    np.testing.assert_allclose(total, _scores(old, 4, rows), atol=1e-5)


def test_a_user_without_ratings_gets_an_empty_attribution() -> None:
    a, conf = _ials_arrays(IALSConfig(dim=DIM, reg=2.0, iterations=3))
    empty = np.flatnonzero(np.diff(conf.indptr) == 0)
    indptr = a.rated_indptr.copy()
    if not len(empty):  # make user 0 rate nothing
        assert a.rated_confidence is not None
        n = int(indptr[1])
        a = dataclasses.replace(
            a,
            rated_indptr=indptr - np.minimum(indptr, n),
            rated_indices=a.rated_indices[n:],
            rated_confidence=a.rated_confidence[n:],
        )
        empty = np.array([0])
    out = explain(a, [str(i) for i in a.item_ids], a.user_factors[0], int(empty[0]), np.arange(3))
    assert all(e.contributions == () and e.contributions_total == 0.0 for e in out)


def test_fit_heads_confidences_follow_the_training_csr() -> None:
    from bertrec.train.heads import HeadsConfig, fit_heads
    from bertrec.train.indexing import Interactions
    from bertrec.train.rating_head import RatingConfig

    rng = np.random.default_rng(3)
    n = 300
    users, items = rng.integers(0, 20, n), rng.integers(0, 25, n)  # some pairs rated twice
    ratings = rng.integers(1, 6, n).astype(np.float32)
    data = Interactions(users.astype(np.int64), items.astype(np.int64), ratings)
    cfg = HeadsConfig(IALSConfig(dim=4, iterations=2), RatingConfig(dim=3), use_text=False)
    heads = fit_heads(data, 20, 25, None, cfg)
    indptr, indices = data.csr(20)
    assert heads.rated_confidence is not None and heads.rank_gramian is not None
    assert heads.rated_confidence.shape == indices.shape
    for u in (0, 5, 19):
        for n_row in range(indptr[u], indptr[u + 1]):
            item = indices[n_row]
            mask = (users == u) & (items == item)
            want = (cfg.ranking.alpha * (ratings[mask] / ratings.max()) ** cfg.ranking.power).sum()
            assert heads.rated_confidence[n_row] == pytest.approx(want, rel=1e-5)
    y = heads.ranking.item_factors.astype(np.float64)
    np.testing.assert_allclose(heads.rank_gramian, y.T @ y + cfg.ranking.reg * np.eye(4))


def test_no_rows_and_mismatched_arrays() -> None:
    a, _ = _ials_arrays(IALSConfig(dim=DIM, reg=2.0, iterations=2))
    assert explain(a, list(map(str, a.item_ids)), a.user_factors[1], 1, np.zeros(0, np.int64)) == []
    assert a.rated_confidence is not None
    half = dataclasses.replace(a, rank_gramian=None)
    assert "both" in (half.shape_mismatch(N_USERS, N_ITEMS, DIM) or "")
    short = dataclasses.replace(a, rated_confidence=a.rated_confidence[:-1])
    assert "rated_confidence" in (short.shape_mismatch(N_USERS, N_ITEMS, DIM) or "")
    assert a.shape_mismatch(N_USERS, N_ITEMS, DIM) is None
