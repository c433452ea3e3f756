"""The peers bertrec is measured against (issue 9), each tuned on validation, then refit.

Each peer is `fit(train, valid) -> Tuned`: every grid point is fit on `train` and scored on
`valid` (RMSE for rating models, NDCG@10 for ranking models), and the best point is refit on
train + valid, which is the protocol's full train. Grids are small on purpose: all peers
together run in a few minutes on 2 cores for ml-latest-small (100k ratings).

- popularity: the number of train ratings of each item (ranking only);
- scikit-surprise BaselineOnly (ALS biases), SVD and SVD++: the real library; predictions come
  from its learned arrays, vectorised, and equal its own `predict` (clipped to the rating scale);
- implicit's ALS (`implicit.cpu.als`): confidence 1 + alpha * r, r binary or the rating;
- EASE (Steck 2019): B = I - P / diag(P), P = (X^T X + lambda I)^-1, X the binary train matrix.
  With fewer users than items the same scores come from the users' side (Woodbury), which
  turns a 9.7k-item inverse into a 610-user one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import nan
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from bertrec.bench.quality_protocol import (
    FittedModel,
    HoldoutSplit,
    RatingArrays,
    evaluate,
    holdout_split,
    load_quality_data,
    ranking_metrics,
    rating_metrics,
    validation_split,
)

log = logging.getLogger(__name__)

Params = dict[str, Any]
Builder = Callable[[RatingArrays, Params], FittedModel]


@dataclass(frozen=True)
class Tuned:
    """A peer refit on the full train with the hyper-parameters chosen on validation."""

    name: str
    model: FittedModel
    chosen: Params
    grid_size: int
    valid_metric: str  # "rmse" (lower is better) or "ndcg@10"
    valid_score: float
    tune_s: float  # every grid point, fit and scored
    fit_s: float  # the final refit on train + valid


@dataclass(frozen=True)
class Peer:
    name: str
    fit: Callable[[RatingArrays, RatingArrays], Tuned]


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


# ------------------------------------------------------------------------------ tuning


def grid(**axes: Sequence[Any]) -> list[Params]:
    """Every combination of the axes' values, e.g. grid(a=[1, 2], b=[3]) -> 2 points."""
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]


def tune(
    name: str,
    build: Builder,
    stages: Sequence[Sequence[Params]],
    train: RatingArrays,
    valid: RatingArrays,
    metric: str,
) -> Tuned:
    """Search `stages` in turn, then refit the best point on train + valid.

    A stage's points override the best so far, which stays a candidate, so a later stage can
    vary one axis at a time. `metric` is "rmse" (minimised) or "ndcg@10" (maximised). With a
    single point there is nothing to choose: it is fit once, on train + valid, and its
    validation score is NaN.
    """
    sign = 1.0 if metric == "rmse" else -1.0
    scored: list[tuple[float, Params]] = []
    size = sum(len(stage) for stage in stages)
    start = time.perf_counter()
    for stage in stages if size > 1 else []:
        best = min(scored, key=lambda s: sign * s[0])[1] if scored else {}
        for point in stage:
            params = {**best, **point}
            scored.append((_validation_score(build(train, params), train, valid, metric), params))
            log.info("%s %s: %s %.4f", name, params, metric, scored[-1][0])
    best_score, best = min(scored, key=lambda s: sign * s[0]) if scored else (nan, stages[0][0])
    tune_s = time.perf_counter() - start
    start = time.perf_counter()
    model = build(train.concat(valid), best)
    fit_s = time.perf_counter() - start
    return Tuned(name, model, best, size, metric, best_score, tune_s, fit_s)


def _validation_score(
    model: FittedModel, train: RatingArrays, valid: RatingArrays, metric: str
) -> float:
    if metric == "rmse":
        result = rating_metrics(model, valid)
        if result is None:
            raise ValueError("tuning on RMSE needs a model that predicts ratings")
        return result.rmse
    return ranking_metrics(model, train, valid).ndcg


# ------------------------------------------------------------------------------- peers


def default_peers(threads: int = 2, svdpp_grid: bool = True) -> list[Peer]:
    """Every peer with its grid; `svdpp_grid=False` fits SVD++ with surprise's defaults only.

    The grids were centred on ml-latest-small's validation split (the optimum inside each
    axis, not on its edge). SVD++ takes ~40 s a fit there, so it gets two points: surprise's
    defaults and the regularisation, step and epochs that SVD prefers.
    """

    def peer(name: str, build: Builder, stages: Sequence[Sequence[Params]], metric: str) -> Peer:
        return Peer(name, lambda train, valid: tune(name, build, stages, train, valid, metric))

    svdpp: list[Params] = [{"algo": "svdpp"}]
    if svdpp_grid:
        svdpp.append({"algo": "svdpp", "reg_all": 0.1, "lr_all": 0.01, "n_epochs": 40})
    return [
        peer("popularity", fit_popularity, [[{}]], "ndcg@10"),
        peer(
            "surprise BaselineOnly",
            fit_surprise,
            [grid(algo=["baseline"], reg_i=[1, 2, 5, 10], reg_u=[2, 5, 15], n_epochs=[10])],
            "rmse",
        ),
        peer(
            "surprise SVD",
            fit_surprise,
            [
                grid(
                    algo=["svd"],
                    n_factors=[50, 100],
                    reg_all=[0.05, 0.1, 0.15],
                    lr_all=[0.01],
                    n_epochs=[40],
                ),
                [{"lr_all": 0.005}, {"lr_all": 0.02}, {"n_epochs": 20}, {"n_epochs": 60}],
            ],
            "rmse",
        ),
        peer("surprise SVD++", fit_surprise, [svdpp], "rmse"),
        peer(
            "implicit ALS",
            lambda t, p: fit_implicit_als(t, p, threads),
            [
                # Quality follows the ratio of regularisation to alpha: search both around it.
                grid(
                    weight=["binary"],
                    factors=[128],
                    regularization=[5.0, 10.0, 20.0],
                    alpha=[0.5, 1.0, 2.0, 4.0],
                    iterations=[15],
                ),
                [{"factors": 64}, {"factors": 256}],
                [{"weight": "rating"}, {"iterations": 30}],
            ],
            "ndcg@10",
        ),
        peer(
            "EASE",
            lambda t, p: fit_ease(t, p, threads),
            [grid(lam=[50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0])],
            "ndcg@10",
        ),
    ]


def describe(tuned: Tuned) -> dict[str, Any]:
    """The chosen hyper-parameters and timings, for the benchmark's JSON."""
    return {
        "chosen": tuned.chosen,
        "grid_size": tuned.grid_size,
        "valid_metric": tuned.valid_metric,
        "valid_score": tuned.valid_score,
        "tune_s": tuned.tune_s,
        "fit_s": tuned.fit_s,
    }


def run_peers(split: HoldoutSplit, peers: Sequence[Peer]) -> list[dict[str, Any]]:
    """Tune each peer on a validation split cut from `split.train`, refit it on the whole
    train, and score it on `split.test`: one row of metrics, choices and timings per peer."""
    valid = validation_split(split.train)
    rows = []
    for peer in peers:
        tuned = peer.fit(valid.train, valid.test)
        quality = evaluate(tuned.model, split.train, split.test)
        rows.append({"model": peer.name, **quality.row(), **describe(tuned)})
        log.info("%s: %s", peer.name, rows[-1])
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Run every peer on one data set and write their table as JSON (bench/quality.py runs
    them next to bertrec; this is the peers alone)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--ratings", type=Path, required=True, help="MovieLens folder or file")
    parser.add_argument("--items", type=Path, help="item texts file (optional)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--svdpp-defaults", action="store_true", help="no SVD++ grid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = load_quality_data(args.ratings, args.items)
    split = holdout_split(data.ratings)
    rows = run_peers(split, default_peers(args.threads, svdpp_grid=not args.svdpp_defaults))
    sizes = {"n_users": data.ratings.n_users, "n_items": data.ratings.n_items}
    sizes |= {"n_train": len(split.train), "n_test": len(split.test)}
    result = {"data": str(args.ratings), **sizes, "peers": rows}
    args.out.write_text(json.dumps(result, indent=2, default=_json_value) + "\n")
    for row in rows:
        print(json.dumps(row, default=_json_value))


def _json_value(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    return repr(value)


if __name__ == "__main__":
    main()
