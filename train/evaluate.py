"""Offline evaluation: rating error and top-k ranking quality, warm and cold-start.

Ranking protocol: for each test user with at least one relevant held-out item
(rating >= `relevant_threshold`), rank the candidate set minus the items the user rated in
training; NDCG@k uses binary relevance, Recall@k = relevant hits in the top k / relevant items.
Warm candidates are all items with training ratings; cold candidates are the cold items only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bertrec.train.indexing import IdIndex, Interactions


class Scorer(Protocol):
    name: str

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Predicted ratings for (user row, item row) pairs; NaN where it cannot predict."""
        ...

    def rank_scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """(len(users), len(items)) scores whose order within a row is the recommendation."""
        ...


@dataclass(frozen=True)
class EvalSet:
    """Held-out ratings as rows, with the training CSR used to exclude already-rated items."""

    test: Interactions
    candidates: np.ndarray  # item rows that may be recommended
    train_indptr: np.ndarray
    train_indices: np.ndarray


def rating_errors(scorer: Scorer, data: Interactions) -> dict[str, float]:
    if len(data) == 0:
        return {"rmse": float("nan"), "mae": float("nan"), "n_ratings": 0}
    pred = scorer.predict(data.users, data.items)
    err = pred - data.ratings
    err = err[np.isfinite(err)]
    return {
        "rmse": float(np.sqrt(np.mean(err**2))) if len(err) else float("nan"),
        "mae": float(np.mean(np.abs(err))) if len(err) else float("nan"),
        "n_ratings": len(err),
    }


def ranking_metrics(
    scorer: Scorer, ev: EvalSet, k: int = 10, relevant_threshold: float = 4.0, chunk: int = 512
) -> dict[str, float]:
    """Mean NDCG@k and Recall@k over users with a relevant held-out item."""
    rel = ev.test.ratings >= relevant_threshold
    users = np.unique(ev.test.users[rel])
    if len(users) == 0 or len(ev.candidates) == 0:
        return {f"ndcg@{k}": float("nan"), f"recall@{k}": float("nan"), "n_users": 0}
    col = np.full(int(max(ev.candidates.max(), ev.test.items.max())) + 1, -1, dtype=np.int64)
    col[ev.candidates] = np.arange(len(ev.candidates))
    # Fewer candidates than k (e.g. a handful of cold items) -> shorter lists, not a crash.
    discounts = 1.0 / np.log2(np.arange(2, min(k, len(ev.candidates)) + 2))
    ndcgs, recalls = [], []
    for start in range(0, len(users), chunk):
        batch = users[start : start + chunk]
        scores = scorer.rank_scores(batch, ev.candidates).astype(np.float64)
        relevant = np.zeros(scores.shape, dtype=bool)
        row_of = {u: r for r, u in enumerate(batch.tolist())}
        sel = rel & np.isin(ev.test.users, batch) & (col[ev.test.items] >= 0)
        relevant[[row_of[u] for u in ev.test.users[sel].tolist()], col[ev.test.items[sel]]] = True
        for r, u in enumerate(batch.tolist()):
            seen = col[ev.train_indices[ev.train_indptr[u] : ev.train_indptr[u + 1]]]
            scores[r, seen[seen >= 0]] = -np.inf
        top = _top_k(scores, k)
        hits = np.take_along_axis(relevant, top, axis=1)
        n_rel = relevant.sum(axis=1)
        ideal = np.array([discounts[: min(n, len(discounts))].sum() for n in n_rel])
        ok = n_rel > 0
        ndcgs.append((hits * discounts).sum(axis=1)[ok] / ideal[ok])
        recalls.append(hits.sum(axis=1)[ok] / n_rel[ok])
    ndcg = np.concatenate(ndcgs)
    return {
        f"ndcg@{k}": float(ndcg.mean()),
        f"recall@{k}": float(np.concatenate(recalls).mean()),
        "n_users": len(ndcg),
    }


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k best scores per row, best first; ties -> lower column first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    return np.take_along_axis(part, order, axis=1)


def evaluate(
    scorer: Scorer,
    index: IdIndex,
    train: Interactions,
    test: Interactions,
    cold_test: Interactions,
    cold_rows: np.ndarray,
    k: int = 10,
    train_csr: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Warm and cold-start metrics for one scorer.

    `train_csr` is `train.csr(index.n_users)`, when the caller has it already (it costs a
    sort of every training pair).
    """
    indptr, indices = train_csr if train_csr is not None else train.csr(index.n_users)
    warm = EvalSet(test, np.arange(index.n_warm_items), indptr, indices)
    cold = EvalSet(cold_test, cold_rows, indptr, indices)
    return {
        "warm": {**rating_errors(scorer, test), **ranking_metrics(scorer, warm, k)},
        "cold": {**rating_errors(scorer, cold_test), **ranking_metrics(scorer, cold, k)},
    }
