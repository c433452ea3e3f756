"""Baselines trained on the same split: popularity and implicit-feedback ALS."""

from __future__ import annotations

import logging

import numpy as np

from bertrec.train.indexing import Interactions

log = logging.getLogger(__name__)


class PopularityScorer:
    """Everyone gets the most-rated items; predicts the item's mean rating."""

    name = "popularity"

    def __init__(self, data: Interactions, n_items: int) -> None:
        self.counts = np.bincount(data.items, minlength=n_items).astype(np.float64)
        sums = np.bincount(data.items, weights=data.ratings, minlength=n_items)
        mu = float(data.ratings.mean())
        self.item_mean = np.where(self.counts > 0, (sums + 5 * mu) / (self.counts + 5), mu)

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.item_mean[items]

    def rank_scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts[items], (len(users), len(items)))


class ImplicitALSScorer:
    """`implicit`'s AlternatingLeastSquares on the rated/not-rated matrix (no rating values)."""

    name = "implicit_als"

    def __init__(
        self,
        data: Interactions,
        n_users: int,
        n_items: int,
        # Best of an 18-point grid (factors 32/64, reg 0.01-1, alpha 1-40) on the default data.
        factors: int = 32,
        regularization: float = 1.0,
        alpha: float = 1.0,
        iterations: int = 20,
        seed: int = 0,
    ) -> None:
        import scipy.sparse as sp
        from implicit.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        matrix = sp.csr_matrix(
            (np.ones(len(data), dtype=np.float32), (data.users, data.items)),
            shape=(n_users, n_items),
        )
        with threadpool_limits(1, "blas"):  # implicit runs its own threads; BLAS's fight them
            model = AlternatingLeastSquares(
                factors=factors,
                regularization=regularization,
                alpha=alpha,
                iterations=iterations,
                random_state=seed,
            )
            model.fit(matrix, show_progress=False)
        self.users = np.asarray(model.user_factors)
        self.items = np.asarray(model.item_factors)

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.full(len(users), np.nan)

    def rank_scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.users[users] @ self.items[items].T


def implicit_available() -> bool:
    try:
        import implicit  # noqa: F401
    except ImportError:
        return False
    return True
