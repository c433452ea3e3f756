"""bertrec's model: a ranking head and a rating head, fitted separately, served as one version.

    score(u, i)            = dot(x_u, y_i) + c_i                       (ials.py, dimension d)
    predicted_rating(u, i) = mu + b_u + b_i + dot(p_u, q_i)            (rating_head.py, r)

Why two heads: ordering by predicted rating ranks poorly (a rating model is fitted only on
the pairs a user chose to rate, so it never learns what they would not watch), while which
items a user rated carries most of the ranking signal. One factor space asked to do both
does each worse (issue 9's table); two spaces cost one more (n_users + n_items) x r array.
The ranking head's item factors are tied to the text embedding (y_i ~ T e_i), and T is the
encoder's projection, so a cold item or a text query lands in the ranking space from text
alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bertrec.train.ials import (
    IALSConfig,
    IALSFactors,
    attribution_arrays,
    confidence_matrix,
    fit_ials,
)
from bertrec.train.indexing import Interactions
from bertrec.train.rating_head import RatingConfig, RatingFactors, fit_rating_head


@dataclass(frozen=True)
class HeadsConfig:
    ranking: IALSConfig = field(default_factory=IALSConfig)
    rating: RatingConfig = field(default_factory=RatingConfig)
    use_text: bool = True


@dataclass(frozen=True)
class HeadsFactors:
    """Both heads as numpy arrays, in the rows of one IdIndex."""

    ranking: IALSFactors
    rating: RatingFactors
    item_rank_bias: np.ndarray  # float32 (n_items,): c_i
    # For explanations (ials.attribution_arrays): Y^T Y + reg I, and the rated pairs'
    # confidences in the order of the training CSR (Interactions.csr).
    rank_gramian: np.ndarray | None = None
    rated_confidence: np.ndarray | None = None

    @property
    def text_projection(self) -> np.ndarray | None:
        """(H, d): T, the encoder's projection into the ranking space (None without text)."""
        return self.ranking.text_map


def fit_heads(
    data: Interactions,
    n_users: int,
    n_items: int,
    text: np.ndarray | None,
    cfg: HeadsConfig,
) -> HeadsFactors:
    """Fit both heads on the rated pairs in `data`; `text` is (n_items, H) unit embeddings."""
    text = text if cfg.use_text else None
    conf = confidence_matrix(data.users, data.items, data.ratings, (n_users, n_items), cfg.ranking)
    ranking = fit_ials(conf, cfg.ranking, text)
    rating = fit_rating_head(data, n_users, n_items, cfg.rating, text)
    gramian, confidence = attribution_arrays(conf, ranking.item_factors, cfg.ranking.reg)
    bias = np.zeros(n_items, dtype=np.float32)
    return HeadsFactors(ranking, rating, bias, gramian, confidence)


class HeadsScorer:
    """Scores from both heads (implements evaluate.Scorer): what the server computes."""

    def __init__(
        self, name: str, f: HeadsFactors, rating_range: tuple[float, float] = (1.0, 5.0)
    ) -> None:
        self.name = name
        self.f = f
        self.lo, self.hi = rating_range

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        r = self.f.rating
        dot = np.einsum("nd,nd->n", r.user_factors[users], r.item_factors[items])
        pred = r.global_mean + r.user_bias[users] + r.item_bias[items] + dot
        return np.clip(pred, self.lo, self.hi)

    def rank_scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        k = self.f.ranking
        return k.user_factors[users] @ k.item_factors[items].T + self.f.item_rank_bias[items]


class HeadsRatingOrderScorer(HeadsScorer):
    """Ranks by the rating head's prediction: the 'rating model as ranker' reference."""

    def rank_scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        r = self.f.rating
        return r.user_factors[users] @ r.item_factors[items].T + r.item_bias[items]
