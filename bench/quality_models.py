"""The peers' models (issue 9): each fits on integer rating rows and scores every item.

- popularity: the number of train ratings of each item (ranking only);
- scikit-surprise BaselineOnly (ALS biases), SVD and SVD++: the real library; predictions come
  from its learned arrays, vectorised, and equal its own `predict` (clipped to the rating scale);
- implicit's ALS (`implicit.cpu.als`): confidence 1 + alpha * r, r binary or the rating;
- EASE (Steck 2019): B = I - P / diag(P), P = (X^T X + lambda I)^-1, X the binary train matrix.
  With fewer users than items the same scores come from the users' side (Woodbury), which
  turns a 9.7k-item inverse into a 610-user one.

Every `fit_*` takes the train rows and a dict of hyper-parameters, so `quality_peers.tune` can
search them alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from bertrec.bench.quality_protocol import RatingArrays

Params = dict[str, Any]


# -------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class PopularityModel:
    """Everyone gets the most-rated items; no rating predictions."""

    counts: np.ndarray  # float32, per item

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        return None

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts)))


@dataclass(frozen=True)
class BiasedFactorModel:
    """mu + b_u + b_i + p_u . q_i, with zeros for users and items the fit never saw (as
    surprise does); predictions clipped to the rating scale as surprise's `predict` does,
    ranking scores left unclipped so they do not tie."""

    mu: float
    user_bias: np.ndarray  # (n_users,)
    item_bias: np.ndarray  # (n_items,)
    user_factors: np.ndarray  # (n_users, f); f may be 0
    item_factors: np.ndarray  # (n_items, f)
    low: float
    high: float

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        dot = np.einsum("ij,ij->i", self.user_factors[users], self.item_factors[items])
        raw = self.mu + self.user_bias[users] + self.item_bias[items] + dot
        return np.clip(raw, self.low, self.high)

    def score_users(self, users: np.ndarray) -> np.ndarray:
        scores = self.user_factors[users] @ self.item_factors.T
        scores += (self.mu + self.user_bias[users])[:, None] + self.item_bias[None, :]
        return scores.astype(np.float32)


@dataclass(frozen=True)
class FactorModel:
    """Dot products of user and item factors (implicit's ALS); no rating predictions."""

    user_factors: np.ndarray
    item_factors: np.ndarray

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        return None

    def score_users(self, users: np.ndarray) -> np.ndarray:
        return (self.user_factors[users] @ self.item_factors.T).astype(np.float32)


@dataclass(frozen=True)
class EaseModel:
    """EASE scores: X[u] @ B (item side), or the same rows precomputed (user side)."""

    history: sp.csr_matrix  # binary train matrix X
    weights: np.ndarray | None  # B, (n_items, n_items), when solved on the item side
    user_scores: np.ndarray | None  # X @ B, (n_users, n_items), when solved on the user side

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        return None

    def score_users(self, users: np.ndarray) -> np.ndarray:
        if self.user_scores is not None:
            return self.user_scores[users]
        assert self.weights is not None
        return np.asarray(self.history[users] @ self.weights, dtype=np.float32)


# ----------------------------------------------------------------------------- fitting


def fit_popularity(train: RatingArrays, params: Params) -> PopularityModel:
    counts = np.bincount(train.items, minlength=train.n_items).astype(np.float32)
    return PopularityModel(counts)


def fit_ease(train: RatingArrays, params: Params, threads: int = 2) -> EaseModel:
    """EASE with L2 weight `params["lam"]`, solved on whichever side is smaller."""
    lam = float(params["lam"])
    x = train.matrix(binary=True).astype(np.float64)
    with threadpool_limits(threads, "blas"):
        if train.n_items <= train.n_users:
            gram = (x.T @ x).toarray() + lam * np.eye(train.n_items)
            p = np.linalg.inv(gram)
            weights = -p / np.diag(p)
            np.fill_diagonal(weights, 0.0)
            return EaseModel(x.tocsr(), weights.astype(np.float32), None)
        # (lam I + X^T X)^-1 = (I - X^T M X) / lam with M = (lam I + X X^T)^-1, so
        # X P = M X and diag(P)_j = (1 - x_j^T M x_j) / lam: only users x users is inverted.
        m = np.linalg.inv((x @ x.T).toarray() + lam * np.eye(train.n_users))
        mx = np.asarray(x.T.dot(m).T)  # M X, dense (n_users, n_items)
        diag_p = (1.0 - np.asarray(x.multiply(mx).sum(axis=0)).ravel()) / lam
        scores = x.toarray() - mx / diag_p
    return EaseModel(x.tocsr(), None, scores.astype(np.float32))


def fit_implicit_als(train: RatingArrays, params: Params, threads: int = 2) -> FactorModel:
    """implicit's CPU ALS; `params["weight"]` is "binary" (r = 1) or "rating" (r = rating)."""
    from implicit.cpu.als import AlternatingLeastSquares

    user_items = train.matrix(binary=params["weight"] == "binary")
    with threadpool_limits(1, "blas"):  # implicit runs its own threads; BLAS's would fight them
        model = AlternatingLeastSquares(
            factors=int(params["factors"]),
            regularization=float(params["regularization"]),
            alpha=float(params["alpha"]),
            iterations=int(params["iterations"]),
            num_threads=threads,
            random_state=0,
        )
        model.fit(user_items, show_progress=False)
    return FactorModel(np.asarray(model.user_factors), np.asarray(model.item_factors))


def fit_surprise(train: RatingArrays, params: Params) -> BiasedFactorModel:
    """scikit-surprise's `params["algo"]` ("baseline", "svd", "svdpp") with the other params."""
    import surprise

    trainset, users, items = surprise_trainset(train)
    options = {k: v for k, v in params.items() if k != "algo"}
    algo: Any
    if params["algo"] == "baseline":
        algo = surprise.BaselineOnly(bsl_options={"method": "als", **options}, verbose=False)
    elif params["algo"] == "svd":
        algo = surprise.SVD(random_state=0, **options)
    else:
        algo = surprise.SVDpp(random_state=0, cache_ratings=True, **options)
    algo.fit(trainset)
    return _biased_model(algo, trainset, train, users, items)


def surprise_trainset(train: RatingArrays) -> tuple[Any, np.ndarray, np.ndarray]:
    """A surprise Trainset whose raw ids are the protocol's indices; and, per inner id, the
    index of each user and item it knows."""
    from surprise import Trainset

    users, inner_u = np.unique(train.users, return_inverse=True)
    items, inner_i = np.unique(train.items, return_inverse=True)
    ur: dict[int, list[tuple[int, float]]] = {u: [] for u in range(len(users))}
    ir: dict[int, list[tuple[int, float]]] = {i: [] for i in range(len(items))}
    for u, i, r in zip(inner_u.tolist(), inner_i.tolist(), train.ratings.tolist(), strict=True):
        ur[u].append((i, r))
        ir[i].append((u, r))
    trainset = Trainset(
        ur,
        ir,
        len(users),
        len(items),
        len(train),
        (float(train.ratings.min()), float(train.ratings.max())),
        {int(raw): k for k, raw in enumerate(users.tolist())},
        {int(raw): k for k, raw in enumerate(items.tolist())},
    )
    return trainset, users, items


def _biased_model(
    algo: Any, trainset: Any, train: RatingArrays, users: np.ndarray, items: np.ndarray
) -> BiasedFactorModel:
    """The learned arrays of a surprise algorithm, spread onto the full index."""
    user_bias = np.zeros(train.n_users)
    item_bias = np.zeros(train.n_items)
    if hasattr(algo, "pu"):
        bu, bi = algo.bu, algo.bi
        p, q = np.asarray(algo.pu), np.asarray(algo.qi)
    else:  # BaselineOnly
        bu, bi = algo.compute_baselines()
        p, q = np.zeros((len(users), 0)), np.zeros((len(items), 0))
    if hasattr(algo, "yj"):  # SVD++: p_u + |N(u)|^-1/2 sum_j y_j over the user's rated items
        rows = [u for u, rated in trainset.ur.items() for _ in rated]
        cols = [j for rated in trainset.ur.values() for j, _ in rated]
        n_u = np.bincount(rows, minlength=len(users))
        norm = sp.csr_matrix(
            (1.0 / np.sqrt(n_u[rows]), (rows, cols)), shape=(len(users), len(items))
        )
        p = p + norm @ np.asarray(algo.yj)
    user_bias[users], item_bias[items] = bu, bi
    user_factors = np.zeros((train.n_users, p.shape[1]))
    item_factors = np.zeros((train.n_items, q.shape[1]))
    user_factors[users], item_factors[items] = p, q
    low, high = trainset.rating_scale
    return BiasedFactorModel(
        trainset.global_mean, user_bias, item_bias, user_factors, item_factors, low, high
    )
