"""Fold-in: a user's vectors re-solved against a version's fixed item factors, numpy only.

Ranking head (implicit ALS, train/ials.py): with the item factors Y fixed, a user's vector is
the exact minimiser of sum_j w_j (p_j - x . y_j)^2 + sum_unrated (x . y_i)^2 + reg |x|^2,

    (G + Y_u^T diag(w - 1) Y_u) x = Y_u^T (w * p),     G = Y^T Y + reg I (rank_gramian.npy)

over the items j the user touched: training pairs (their exported confidence), ratings (the
confidence training gives that rating), clicks and purchases (fixed confidences, p = 1) and
skips (weight, p = 0: an explicit "not this"). A later rating of an item replaces the earlier
one; other events add their weight. One d x d solve: ~0.1 ms at d = 64.

Rating head: the exported (b_u, p_u) is the centre of a Gaussian whose precision is what the
user's training ratings gave it, A = diag(reg_bias, reg) + sum_train [1, q_j][1, q_j]^T; new
ratings update it like one Kalman step: argmin sum_new (r - mu - b_i - b - q . p)^2 +
(theta - theta_u)^T A (theta - theta_u). A user with 300 training ratings moves a little per
new rating, a cold user (theta_u = 0) gets the plain ridge solution, and the SVD++ implicit
part of theta_u is kept, which a refit from ratings alone would lose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bertrec.feedback.events import FeedbackKind
from bertrec.repository.artifacts import (
    RANK_ALPHA,
    RANK_POWER,
    RANK_REG,
    RATING_REG,
    RATING_REG_BIAS,
    FactorArrays,
)

# Confidences of the kinds without a rating, on the scale of a rating's alpha * (r / top)^power
# (5.0 for a top rating with the training defaults): a click is weaker evidence than a top
# rating, a purchase as strong; a skip weighs like a middling rating toward "not this".
CLICK_CONFIDENCE = 0.4 * RANK_ALPHA
PURCHASE_CONFIDENCE = RANK_ALPHA
SKIP_CONFIDENCE = 0.5 * RANK_ALPHA
# Training pairs of versions exported without rated_confidence.npy: a typical rating's weight.
DEFAULT_TRAINING_CONFIDENCE = RANK_ALPHA * 0.6


@dataclass(frozen=True)
class Touch:
    """One user-item pair's evidence, merged over all its events."""

    weight: float  # w: sum of the confidences
    preference: float  # p: weighted mean of the preferences (1 liked, 0 skipped)


@dataclass(frozen=True)
class RatingUser:
    """A folded user's rating-head parameters (replacing the version's arrays for them)."""

    bias: float
    vector: np.ndarray | None  # float32 (r,); None when the version has no rating head


class FoldIn:
    """The per-version constants fold-in needs, computed once when the version loads.

    Args:
        arrays: the version's arrays.
        rating_top: the top of the rating range (the `top` of the confidence formula).
    """

    def __init__(self, arrays: FactorArrays, rating_top: float) -> None:
        self.arrays = arrays
        self.rating_top = rating_top
        y = np.asarray(arrays.item_factors, dtype=np.float64)
        if arrays.rank_gramian is not None:
            self.gramian = np.asarray(arrays.rank_gramian, dtype=np.float64)
        else:  # older versions: the same Gram matrix, computed here
            self.gramian = y.T @ y + RANK_REG * np.eye(y.shape[1])
        self._rating_items = (
            arrays.rating_item_factors
            if arrays.rating_item_factors is not None
            else arrays.item_factors
        )
        self._rating_prior = np.diag([RATING_REG_BIAS] + [RATING_REG] * _rating_dim(arrays)).astype(
            np.float64
        )

    def confidence(self, kind: FeedbackKind, rating: float) -> Touch:
        """The evidence one event gives: weight and preference."""
        if kind is FeedbackKind.RATING:
            scaled = max(rating, 0.0) / self.rating_top
            return Touch(RANK_ALPHA * scaled**RANK_POWER, 1.0)
        if kind is FeedbackKind.CLICK:
            return Touch(CLICK_CONFIDENCE, 1.0)
        if kind is FeedbackKind.PURCHASE:
            return Touch(PURCHASE_CONFIDENCE, 1.0)
        return Touch(SKIP_CONFIDENCE, 0.0)

    def training_touches(self, row: int | None) -> dict[int, Touch]:
        """The training pairs of a known user (item row -> evidence); {} for None."""
        if row is None:
            return {}
        a = self.arrays
        start, end = int(a.rated_indptr[row]), int(a.rated_indptr[row + 1])
        items = np.asarray(a.rated_indices[start:end]).tolist()
        if a.rated_confidence is not None:
            weights = np.asarray(a.rated_confidence[start:end], dtype=np.float64).tolist()
        else:
            weights = [DEFAULT_TRAINING_CONFIDENCE] * len(items)
        return {item: Touch(w, 1.0) for item, w in zip(items, weights, strict=True)}

    def ranking_vector(self, touches: dict[int, Touch]) -> np.ndarray:
        """The exact implicit-ALS user vector for these pairs (float32, d)."""
        return self.solve(*self.normal_equations(touches))

    def normal_equations(self, touches: dict[int, Touch]) -> tuple[np.ndarray, np.ndarray]:
        """(G + Y_u^T diag(w - 1) Y_u, Y_u^T (w p)) for these pairs: float64 (d, d), (d,)."""
        system, rhs = self.gramian.copy(), np.zeros(self.gramian.shape[0])
        if not touches:
            return system, rhs
        rows = np.fromiter(touches.keys(), np.int64, len(touches))
        w = np.fromiter((t.weight for t in touches.values()), np.float64, len(touches))
        p = np.fromiter((t.preference for t in touches.values()), np.float64, len(touches))
        y = np.asarray(self.arrays.item_factors[rows], dtype=np.float64)
        system += (y.T * (w - 1.0)) @ y
        rhs += y.T @ (w * p)
        return system, rhs

    def update(
        self,
        system: np.ndarray,
        rhs: np.ndarray,
        item: int,
        old: Touch | None,
        new: Touch | None,
    ) -> None:
        """Change one pair's evidence in the normal equations, in place: a rank-1 update, so a
        new event costs O(d^2) instead of a rebuild over every pair the user touched."""
        y = np.asarray(self.arrays.item_factors[item], dtype=np.float64)
        was_w, was_wp = (
            (0.0, 0.0) if old is None else (old.weight - 1.0, old.weight * old.preference)
        )
        now_w, now_wp = (
            (0.0, 0.0) if new is None else (new.weight - 1.0, new.weight * new.preference)
        )
        if now_w != was_w:
            system += (now_w - was_w) * np.outer(y, y)
        if now_wp != was_wp:
            rhs += (now_wp - was_wp) * y

    def solve(self, system: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        return np.linalg.solve(system, rhs).astype(np.float32)

    def rating_user(self, row: int | None, ratings: dict[int, float]) -> RatingUser:
        """The rating-head parameters after the user's new ratings (item row -> rating).

        Known users start from their exported parameters with their training precision; cold
        users from zero with the prior's precision only.
        """
        return self.rating_step(self.rating_prior(row), ratings)

    def rating_prior(self, row: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(centre, precision) of the rating head before any feedback: the exported [b_u, p_u]
        and what the user's training ratings made it weigh (cached per user by the caller)."""
        a = self.arrays
        dim = _rating_dim(a)
        centre = np.zeros(dim + 1)
        precision = self._rating_prior.copy()
        if row is not None:
            centre[0] = float(a.user_bias[row])
            if a.rating_user_factors is not None:
                centre[1:] = a.rating_user_factors[row]
            else:
                centre[1:] = a.user_factors[row]
            trained = np.asarray(
                a.rated_indices[int(a.rated_indptr[row]) : int(a.rated_indptr[row + 1])]
            )
            features = _features(self._rating_items, trained)
            precision += features.T @ features
        return centre, precision

    def rating_step(
        self, prior: tuple[np.ndarray, np.ndarray], ratings: dict[int, float]
    ) -> RatingUser:
        """One Kalman-style step from `prior` over the new ratings (module docstring)."""
        a = self.arrays
        centre, precision = prior
        if ratings:
            rows = np.fromiter(ratings.keys(), np.int64, len(ratings))
            values = np.fromiter(ratings.values(), np.float64, len(ratings))
            features = _features(self._rating_items, rows)
            residual = values - a.global_mean - np.asarray(a.item_bias[rows], np.float64)
            centre = np.linalg.solve(
                precision + features.T @ features, precision @ centre + features.T @ residual
            )
        vector = centre[1:].astype(np.float32) if a.rating_user_factors is not None else None
        return RatingUser(float(centre[0]), vector)


def _rating_dim(arrays: FactorArrays) -> int:
    factors = arrays.rating_item_factors
    return int(factors.shape[1]) if factors is not None else arrays.dim


def _features(items: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[1, q_j] per row: the bias and the item's rating-head factors."""
    q = np.asarray(items[rows], dtype=np.float64)
    return np.hstack([np.ones((len(rows), 1)), q])
