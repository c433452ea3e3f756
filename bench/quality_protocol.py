"""The real-data quality protocol (issue 9): one split, one set of metrics, every model alike.

Ratings are loaded through the project's loaders and turned into integer rows once, so every
model (bertrec's exported arrays and each peer) is scored on exactly the same split:

- per user, a seeded random 20% of the ratings is held out (seed 0); users with fewer than 5
  ratings stay whole in train. `bertrec.train.split.per_user_holdout` picks the rows, as in
  `split_dataset` with no cold items, so bertrec's trainer can be fed the same rows;
- hyper-parameters are chosen on a validation split cut from train by the same rule (seed 1);
- rating metrics: RMSE and MAE over every held-out rating;
- ranking metrics: for every user with a held-out rating >= 4.0, every catalogue item the user
  did not rate in train is ranked; NDCG@10 (binary relevance) and Recall@10 with denominator
  min(|relevant|, 10), averaged over those users.

The catalogue is every item with at least one rating in the file. Scores come from a dense
(users x items) matrix, a block of users at a time, with the user's train items set to -inf.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from bertrec.train.dataset import Ratings
from bertrec.train.loaders import load_dataset
from bertrec.train.split import per_user_holdout

TEST_FRACTION = 0.2
MIN_USER_RATINGS = 5
TEST_SEED = 0
VALID_SEED = 1
RELEVANT_RATING = 4.0
TOP_K = 10


class FittedModel(Protocol):
    """What the protocol needs from a trained model, indexed by the protocol's integer rows."""

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        """Predicted ratings of (user, item) pairs, or None for a ranking-only model."""
        ...

    def score_users(self, users: np.ndarray) -> np.ndarray:
        """(len(users), n_items) float32 scores; a higher score ranks first."""
        ...


@dataclass(frozen=True)
class RatingArrays:
    """Ratings as integer rows into one user and one item index (shared by every split).

    `rows` are the positions in the loaded `Ratings`, so a split can be turned back into the
    string-id form (reviews included) that bertrec's trainer reads.
    """

    users: np.ndarray  # int32
    items: np.ndarray  # int32
    ratings: np.ndarray  # float32
    timestamps: np.ndarray | None  # int64 epoch seconds; None when the file has none
    rows: np.ndarray  # int64
    n_users: int
    n_items: int

    def __len__(self) -> int:
        return len(self.ratings)

    def subset(self, keep: np.ndarray) -> RatingArrays:
        """The ratings at `keep` (an index or boolean mask), in the same index space."""
        stamps = None if self.timestamps is None else self.timestamps[keep]
        return RatingArrays(
            self.users[keep],
            self.items[keep],
            self.ratings[keep],
            stamps,
            self.rows[keep],
            self.n_users,
            self.n_items,
        )

    def concat(self, other: RatingArrays) -> RatingArrays:
        """These ratings followed by `other`'s (e.g. train + validation for the final refit)."""
        if (self.n_users, self.n_items) != (other.n_users, other.n_items):
            raise ValueError("cannot join ratings indexed by different catalogues")
        stamps = None
        if self.timestamps is not None and other.timestamps is not None:
            stamps = np.concatenate([self.timestamps, other.timestamps])
        return RatingArrays(
            np.concatenate([self.users, other.users]),
            np.concatenate([self.items, other.items]),
            np.concatenate([self.ratings, other.ratings]),
            stamps,
            np.concatenate([self.rows, other.rows]),
            self.n_users,
            self.n_items,
        )

    def matrix(self, binary: bool = True) -> sp.csr_matrix:
        """(n_users, n_items) float32 CSR: 1 where rated (`binary`) or the rating value.

        A pair rated twice keeps one entry (1, or its last rating), never a sum.
        """
        values = np.ones(len(self), np.float32) if binary else self.ratings.astype(np.float32)
        shape = (self.n_users, self.n_items)
        coo = sp.coo_matrix((values, (self.users, self.items)), shape=shape)
        if binary:
            out = coo.tocsr()
            out.data[:] = 1.0
            return out
        # CSR construction sums repeated pairs: drop all but the last rating of each first.
        flat = self.users.astype(np.int64) * self.n_items + self.items
        _, last = np.unique(flat[::-1], return_index=True)
        keep = len(flat) - 1 - last
        return sp.csr_matrix((values[keep], (self.users[keep], self.items[keep])), shape=shape)


@dataclass(frozen=True)
class QualityData:
    """All ratings of a data set as integer rows, with the id maps and per-item texts."""

    ratings: RatingArrays
    user_ids: np.ndarray  # str, index -> external id (sorted)
    item_ids: np.ndarray  # str, index -> external id (sorted); the catalogue
    item_texts: list[str]  # per item index; "" where the data set has no text
    source: Ratings  # as loaded; `source.subset(arrays.rows)` is a split in string ids

    @property
    def has_text(self) -> np.ndarray:
        """Per item, whether it has a text (the candidates of `cold_item_split`)."""
        return np.fromiter(map(bool, self.item_texts), dtype=bool, count=len(self.item_texts))

    def texts_of(self, arrays: RatingArrays) -> Ratings:
        """`arrays` as the loader's `Ratings` (string ids, reviews), e.g. for bertrec's trainer."""
        return self.source.subset(arrays.rows)


@dataclass(frozen=True)
class HoldoutSplit:
    """Train and held-out ratings, in one index space."""

    train: RatingArrays
    test: RatingArrays


@dataclass(frozen=True)
class ColdSplit:
    """Every rating of the cold items in `cold_test`; all other ratings in `train`."""

    train: RatingArrays
    cold_test: RatingArrays
    cold_items: np.ndarray  # int32 item indices, sorted


@dataclass(frozen=True)
class RatingResult:
    """Errors over every held-out rating."""

    rmse: float
    mae: float
    n_ratings: int


@dataclass(frozen=True)
class RankingResult:
    """Means over the evaluated users, and the per-user values (for paired comparisons)."""

    ndcg: float
    recall: float
    users: np.ndarray  # int32, the evaluated users, ascending
    user_ndcg: np.ndarray  # float64, aligned with `users`
    user_recall: np.ndarray  # float64

    @property
    def n_users(self) -> int:
        return len(self.users)


@dataclass(frozen=True)
class Quality:
    """One model's numbers on one split; `rating` is None for a ranking-only model."""

    rating: RatingResult | None
    ranking: RankingResult

    def row(self) -> dict[str, float | int | None]:
        """The headline numbers, for a table or JSON."""
        return {
            "rmse": None if self.rating is None else self.rating.rmse,
            "mae": None if self.rating is None else self.rating.mae,
            "ndcg@10": self.ranking.ndcg,
            "recall@10": self.ranking.recall,
            "n_ratings": None if self.rating is None else self.rating.n_ratings,
            "n_users": self.ranking.n_users,
        }


# ------------------------------------------------------------------------------ loading


def load_quality_data(ratings: Path, items: Path | None = None) -> QualityData:
    """A MovieLens folder or a ratings file (any the loaders accept) as integer rows.

    Raises:
        DataError: from the loaders.
    """
    dataset = load_dataset(ratings, items)
    return index_ratings(dataset.ratings, dataset.item_texts)


def index_ratings(source: Ratings, item_texts: dict[str, str]) -> QualityData:
    """Integer rows for `source`: users and rated items numbered in sorted id order."""
    user_ids, users = np.unique(source.user_ids.astype(str), return_inverse=True)
    item_ids, items = np.unique(source.item_ids.astype(str), return_inverse=True)
    stamps = source.timestamps.astype(np.int64)
    arrays = RatingArrays(
        users=users.astype(np.int32),
        items=items.astype(np.int32),
        ratings=source.ratings.astype(np.float32),
        timestamps=stamps if stamps.any() else None,  # the loaders write 0 when unknown
        rows=np.arange(len(source), dtype=np.int64),
        n_users=len(user_ids),
        n_items=len(item_ids),
    )
    texts = [item_texts.get(i, "") for i in item_ids.tolist()]
    return QualityData(arrays, user_ids, item_ids, texts, source)


# ------------------------------------------------------------------------------- splits


def holdout_split(data: RatingArrays, seed: int = TEST_SEED) -> HoldoutSplit:
    """The protocol's test split (seed 0), or with another seed the validation split of a train."""
    rng = np.random.default_rng(seed)
    out = per_user_holdout(data.users, TEST_FRACTION, MIN_USER_RATINGS, rng)
    return HoldoutSplit(train=data.subset(~out), test=data.subset(out))


def validation_split(train: RatingArrays, seed: int = VALID_SEED) -> HoldoutSplit:
    """Cut a validation split from `train` by the test split's rule, for tuning only."""
    return holdout_split(train, seed)


def cold_item_split(
    data: RatingArrays, has_text: np.ndarray, fraction: float = 0.1, seed: int = 0
) -> ColdSplit:
    """Pick a seeded `fraction` of the items that have text; all their ratings go to test.

    Models then rank only the cold items for the users who rated one >= 4.0 (pass
    `candidates=split.cold_items` to `ranking_metrics`): a text-free model has nothing to go on.
    """
    candidates = np.flatnonzero(has_text)
    n_cold = round(fraction * len(candidates))
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(candidates, size=n_cold, replace=False)).astype(np.int32)
    is_cold = np.zeros(data.n_items, dtype=bool)
    is_cold[cold] = True
    rows_cold = is_cold[data.items]
    return ColdSplit(data.subset(~rows_cold), data.subset(rows_cold), cold)


# ------------------------------------------------------------------------------ metrics


def rating_metrics(model: FittedModel, test: RatingArrays) -> RatingResult | None:
    """RMSE and MAE over every held-out rating; None for a ranking-only model.

    Raises:
        ValueError: the model predicted a non-finite rating or the wrong number of them.
    """
    predicted = model.predict(test.users, test.items)
    if predicted is None:
        return None
    predicted = np.asarray(predicted, dtype=np.float64)
    if predicted.shape != (len(test),) or not np.isfinite(predicted).all():
        raise ValueError(f"expected {len(test)} finite predictions, got shape {predicted.shape}")
    error = predicted - test.ratings
    return RatingResult(
        rmse=float(np.sqrt(np.mean(error**2))),
        mae=float(np.mean(np.abs(error))),
        n_ratings=len(test),
    )


def evaluate(model: FittedModel, train: RatingArrays, test: RatingArrays) -> Quality:
    """Rating and ranking metrics of `model`, fit on `train`, on the held-out `test`."""
    return Quality(rating_metrics(model, test), ranking_metrics(model, train, test))


def ranking_metrics(
    model: FittedModel,
    train: RatingArrays,
    test: RatingArrays,
    k: int = TOP_K,
    relevant_rating: float = RELEVANT_RATING,
    candidates: np.ndarray | None = None,
    block: int = 256,
) -> RankingResult:
    """NDCG@k and Recall@k over users with a held-out rating >= `relevant_rating`.

    Each user ranks every item except the ones they rated in `train` (restricted to
    `candidates` when given, e.g. the cold items). Recall's denominator is min(|relevant|, k).

    Raises:
        ValueError: a score matrix of the wrong shape, or NaN scores.
    """
    allowed = np.ones(test.n_items, dtype=bool)
    if candidates is not None:
        allowed[:] = False
        allowed[candidates] = True
    relevant_rows = (test.ratings >= relevant_rating) & allowed[test.items]
    relevant = test.subset(relevant_rows).matrix()
    seen = train.matrix()
    users = np.flatnonzero(np.diff(relevant.indptr)).astype(np.int32)
    ndcg, recall = [], []
    for start in range(0, len(users), block):
        batch = users[start : start + block]
        scores = _masked_scores(model, batch, seen, allowed)
        n, r = _block_metrics(scores, relevant[batch].toarray() > 0, k)
        ndcg.append(n)
        recall.append(r)
    user_ndcg = np.concatenate(ndcg) if ndcg else np.zeros(0)
    user_recall = np.concatenate(recall) if recall else np.zeros(0)
    return RankingResult(
        ndcg=float(user_ndcg.mean()) if len(users) else float("nan"),
        recall=float(user_recall.mean()) if len(users) else float("nan"),
        users=users,
        user_ndcg=user_ndcg,
        user_recall=user_recall,
    )


def _masked_scores(
    model: FittedModel, users: np.ndarray, seen: sp.csr_matrix, allowed: np.ndarray
) -> np.ndarray:
    """The model's scores for `users` (a private copy) with train items and the items outside
    the candidates at -inf."""
    scores = np.array(model.score_users(users), dtype=np.float32)  # never the model's own buffer
    if scores.shape != (len(users), seen.shape[1]):
        raise ValueError(f"score_users returned {scores.shape}, expected ({len(users)}, n_items)")
    if np.isnan(scores).any():
        raise ValueError("score_users returned NaN scores")
    rated = seen[users].tocoo()
    scores[rated.row, rated.col] = -np.inf
    scores[:, ~allowed] = -np.inf
    return scores


def _block_metrics(
    scores: np.ndarray, relevant: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row NDCG@k and Recall@k of a score block against a boolean relevance block."""
    top = top_k(scores, k)
    hits = np.take_along_axis(relevant, top, axis=1)
    hits &= np.isfinite(np.take_along_axis(scores, top, axis=1))  # a masked item never counts
    discounts = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
    ideal = np.cumsum(discounts)
    denominator = np.minimum(relevant.sum(axis=1), k)
    ndcg = (hits * discounts).sum(axis=1) / ideal[np.minimum(denominator, top.shape[1]) - 1]
    return ndcg, hits.sum(axis=1) / denominator


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k best scores, best first; ties go to the lower column."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    # argpartition splits ties at the k-th score arbitrarily: take every tied column instead.
    kth = np.take_along_axis(scores, part, axis=1).min(axis=1, keepdims=True)
    rows, cols = np.nonzero(scores >= kth)
    keys = np.lexsort((cols, -scores[rows, cols], rows))
    rows, cols = rows[keys], cols[keys]
    starts = np.searchsorted(rows, np.arange(scores.shape[0]))
    return cols[starts[:, None] + np.arange(k)]


def relative_gain_interval(
    ours: RankingResult,
    theirs: RankingResult,
    metric: str = "ndcg",
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of mean(ours) / mean(theirs) - 1 (e.g. "+3% NDCG@10"), resampling
    users with both models' values together, so the noise shared by the models cancels.

    Raises:
        ValueError: the two results were not measured on the same users.
    """
    if not np.array_equal(ours.users, theirs.users):
        raise ValueError("paired comparison needs both models measured on the same users")
    a = ours.user_ndcg if metric == "ndcg" else ours.user_recall
    b = theirs.user_ndcg if metric == "ndcg" else theirs.user_recall
    picks = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    gains = a[picks].mean(axis=1) / b[picks].mean(axis=1) - 1.0
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(gains, [tail, 100 - tail])
    return float(low), float(high)
