"""The peers bertrec is measured against (issue 9), each tuned on validation, then refit.

Each peer is `fit(train, valid) -> Tuned`: every grid point is fit on `train` and scored on
`valid` (RMSE for rating models, NDCG@10 for ranking models), and the best point is refit on
train + valid, which is the protocol's full train. Grids are small on purpose: all peers
together run in a few minutes on 2 cores for ml-latest-small (100k ratings). The models
themselves are in `quality_models`.

    python -m bertrec.bench.quality_peers --ratings DIR_OR_FILE --out peers.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import isnan, nan
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.bench.quality_models import (
    Params,
    fit_ease,
    fit_implicit_als,
    fit_popularity,
    fit_surprise,
)
from bertrec.bench.quality_protocol import (
    FittedModel,
    HoldoutSplit,
    Quality,
    RatingArrays,
    evaluate,
    holdout_split,
    load_quality_data,
    ranking_metrics,
    rating_metrics,
    validation_split,
)

log = logging.getLogger(__name__)

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
    """Every peer with its grid.

    The grids were centred on ml-latest-small's validation split (the optimum inside each
    axis, not on its edge). SVD++ takes 40-100 s a fit there, so it gets two points:
    surprise's defaults and the regularisation, step and epochs that SVD prefers (validation
    RMSE 0.8996 and 0.8885 on ml-latest-small). `svdpp_grid=False` fits only the second, which
    saves two of its three fits.
    """

    def peer(name: str, build: Builder, stages: Sequence[Sequence[Params]], metric: str) -> Peer:
        return Peer(name, lambda train, valid: tune(name, build, stages, train, valid, metric))

    svdpp: list[Params] = [{"algo": "svdpp", "reg_all": 0.1, "lr_all": 0.01, "n_epochs": 40}]
    if svdpp_grid:
        svdpp.insert(0, {"algo": "svdpp"})
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


@dataclass(frozen=True)
class PeerRun:
    """A tuned peer and its numbers on the test split (per user too, for paired comparisons)."""

    tuned: Tuned
    quality: Quality

    def row(self) -> dict[str, Any]:
        """Metrics, chosen hyper-parameters and timings, for a table or JSON."""
        tuned = self.tuned
        valid_score = None if isnan(tuned.valid_score) else tuned.valid_score
        return {
            "model": tuned.name,
            **self.quality.row(),
            "chosen": tuned.chosen,
            "grid_size": tuned.grid_size,
            "valid_metric": tuned.valid_metric,
            "valid_score": valid_score,
            "tune_s": tuned.tune_s,
            "fit_s": tuned.fit_s,
        }


def run_peers(split: HoldoutSplit, peers: Sequence[Peer]) -> list[PeerRun]:
    """Tune each peer on a validation split cut from `split.train`, refit it on the whole
    train, and score it on `split.test`."""
    valid = validation_split(split.train)
    runs = []
    for peer in peers:
        tuned = peer.fit(valid.train, valid.test)
        runs.append(PeerRun(tuned, evaluate(tuned.model, split.train, split.test)))
        log.info("%s: %s", peer.name, runs[-1].row())
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    """Run every peer on one data set and write their table as JSON (bench/quality.py runs
    them next to bertrec; this is the peers alone)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--ratings", type=Path, required=True, help="MovieLens folder or file")
    parser.add_argument("--items", type=Path, help="item texts file (optional)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--svdpp-fixed", action="store_true", help="one SVD++ point, no grid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = load_quality_data(args.ratings, args.items)
    split = holdout_split(data.ratings)
    runs = run_peers(split, default_peers(args.threads, svdpp_grid=not args.svdpp_fixed))
    rows = [run.row() for run in runs]
    sizes = {"n_users": data.ratings.n_users, "n_items": data.ratings.n_items}
    sizes |= {"n_train": len(split.train), "n_test": len(split.test)}
    result = {"data": str(args.ratings), **sizes, "peers": rows}
    args.out.write_text(json.dumps(result, indent=2, default=json_value) + "\n")
    for row in rows:
        print(json.dumps(row, default=json_value))


def json_value(value: object) -> object:
    """JSON for what `json` cannot write: numpy scalars as numbers, anything else as its repr
    (a result file should never be lost to one odd value at the end of a long run)."""
    if isinstance(value, np.generic):
        return value.item()
    return repr(value)


if __name__ == "__main__":
    main()
