from __future__ import annotations

import numpy as np
import pytest

from bertrec.train.evaluate import EvalSet, ranking_metrics, rating_errors
from bertrec.train.indexing import Interactions


class FixedScorer:
    name = "fixed"

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = scores

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.scores[users, items]

    def rank_scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.scores[np.ix_(users, items)]


def test_ndcg_and_recall_by_hand() -> None:
    # One user, 5 items; trained on item 0; relevant held-out items 2 and 4 (rating >= 4).
    scores = np.array([[9.0, 5.0, 4.0, 3.0, 1.0]])
    test = Interactions(np.array([0, 0, 0]), np.array([2, 4, 3]), np.array([5.0, 4.0, 2.0]))
    ev = EvalSet(test, np.arange(5), np.array([0, 1]), np.array([0], dtype=np.int32))
    m = ranking_metrics(FixedScorer(scores), ev, k=2)
    # Item 0 is excluded (already rated), so the top 2 are items 1 and 2: one hit at rank 2.
    ideal = 1 + 1 / np.log2(3)
    assert m["ndcg@2"] == pytest.approx((1 / np.log2(3)) / ideal)
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["n_users"] == 1


def test_rating_errors() -> None:
    scores = np.array([[3.0, 4.0]])
    data = Interactions(np.array([0, 0]), np.array([0, 1]), np.array([4.0, 2.0]))
    m = rating_errors(FixedScorer(scores), data)
    assert m["rmse"] == pytest.approx(np.sqrt((1 + 4) / 2))
    assert m["mae"] == pytest.approx(1.5)
