"""The ranking head: implicit ALS (Hu, Koren, Volinsky 2008) with rating-aware confidence and
an optional text prior on the item factors, solved by conjugate gradient in numpy/scipy.

    minimise  sum_(u,i) w_ui (p_ui - x_u . y_i)^2 + reg (|x_u|^2 + |y_i - T e_i|^2) + reg_t |T|^2

p_ui = 1 for a rated pair and 0 otherwise; w_ui = 1 for an unrated pair and
alpha * (r_ui / r_max)^power for a rated one. Which items a user rated carries most of the
ranking signal; how they rated them says which of those the user liked, so a 5-star rating
pulls harder than a 1-star one (on ml-latest-small this alone lifts validation NDCG@10 by
~10% over binary iALS). The text prior T e_i ties item factors to their text embedding, so a
rarely rated item borrows from its text and an unrated one gets y = T e_i from text alone.

Every step is a few sparse products over the rated pairs and dense products over the
factors, so one sweep costs O(nnz * d + (users + items) * d^2): linear in the ratings.
The unrated pairs enter only through the Gram matrix Y^T Y (the usual iALS trick).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from bertrec.repository.artifacts import RANK_ALPHA, RANK_POWER, RANK_REG


@dataclass(frozen=True)
class IALSConfig:
    dim: int = 64
    reg: float = RANK_REG
    alpha: float = RANK_ALPHA  # confidence of a top-rated pair (unrated pairs weigh 1)
    power: float = RANK_POWER  # confidence = alpha * (rating / max rating) ** power
    iterations: int = 15
    cg_steps: int = 3
    text_reg: float = 1.0  # ridge penalty on the text map T
    seed: int = 0


@dataclass(frozen=True)
class IALSFactors:
    user_factors: np.ndarray  # float32 (n_users, d)
    item_factors: np.ndarray  # float32 (n_items, d); items without ratings: T e_i (or 0)
    text_map: np.ndarray | None  # float32 (H, d): T, item factor prior from a text embedding


def confidence_matrix(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    shape: tuple[int, int],
    cfg: IALSConfig,
) -> sp.csr_matrix:
    """Sparse (n_users, n_items) matrix of the confidences of the rated pairs."""
    top = float(ratings.max()) if len(ratings) else 1.0
    weight = cfg.alpha * (ratings.astype(np.float64) / top) ** cfg.power
    conf = sp.csr_matrix((weight, (users, items)), shape=shape)
    conf.sum_duplicates()  # a pair rated twice counts with both ratings' weight
    return conf


def fit_ials(conf: sp.csr_matrix, cfg: IALSConfig, text: np.ndarray | None = None) -> IALSFactors:
    """Alternate user and item sweeps; `text` (n_items, H) adds the text prior on items."""
    n_users, n_items = conf.shape
    rng = np.random.default_rng(cfg.seed)
    x = (rng.standard_normal((n_users, cfg.dim)) * 0.01).astype(np.float64)
    y = (rng.standard_normal((n_items, cfg.dim)) * 0.01).astype(np.float64)
    conf_t = conf.T.tocsr()
    text_map = None
    prior = np.zeros_like(y)
    for _ in range(cfg.iterations):
        x = _sweep(conf, y, x, cfg.reg, None, cfg.cg_steps)
        y = _sweep(conf_t, x, y, cfg.reg, prior, cfg.cg_steps)
        if text is not None:
            text_map = _ridge(text, y, cfg.text_reg)
            prior = text @ text_map
    rated = np.asarray(conf_t.getnnz(axis=1)) > 0
    if text is not None and text_map is not None:
        y[~rated] = text[~rated] @ text_map
    else:
        y[~rated] = 0.0
    return IALSFactors(
        x.astype(np.float32),
        y.astype(np.float32),
        None if text_map is None else text_map.astype(np.float32),
    )


def _sweep(
    conf: sp.csr_matrix,
    other: np.ndarray,
    current: np.ndarray,
    reg: float,
    prior: np.ndarray | None,
    steps: int,
) -> np.ndarray:
    """A few conjugate-gradient steps on every row's normal equations at once, warm-started
    from `current` (as implicit's CG solver does: 3 steps per sweep are enough)."""
    gram = other.T @ other + reg * np.eye(other.shape[1])
    rows = np.repeat(np.arange(conf.shape[0]), np.diff(conf.indptr))
    cols = conf.indices
    extra = conf.data - 1.0  # rated pairs: weight w instead of the 1 counted in the Gram matrix

    def apply(v: np.ndarray) -> np.ndarray:
        dots = np.einsum("nd,nd->n", v[rows], other[cols]) * extra
        weighted = sp.csr_matrix((dots, conf.indices, conf.indptr), shape=conf.shape)
        return v @ gram + weighted @ other

    rhs = conf @ other
    if prior is not None:
        rhs = rhs + reg * prior
    x = current.copy()
    r = rhs - apply(x)
    p = r.copy()
    rs = np.einsum("nd,nd->n", r, r)
    for _ in range(steps):
        ap = apply(p)
        step = rs / np.maximum(np.einsum("nd,nd->n", p, ap), 1e-20)
        x += step[:, None] * p
        r -= step[:, None] * ap
        rs_new = np.einsum("nd,nd->n", r, r)
        p = r + (rs_new / np.maximum(rs, 1e-20))[:, None] * p
        rs = rs_new
    return x


def _ridge(features: np.ndarray, targets: np.ndarray, reg: float) -> np.ndarray:
    """argmin_T |features @ T - targets|^2 + reg |T|^2."""
    f = features.astype(np.float64)
    gram = f.T @ f + reg * np.eye(f.shape[1])
    return np.linalg.solve(gram, f.T @ targets)


def attribution_arrays(
    conf: sp.csr_matrix, item_factors: np.ndarray, reg: float
) -> tuple[np.ndarray, np.ndarray]:
    """(gramian, confidence) for explanations: Y^T Y + reg I over the item factors as exported
    (float64, d x d) and each rated pair's confidence in CSR order (float32, nnz).

    With them a user's ridge solution x_u = W_u Y_u^T c_u, W_u = (Y^T Y + reg I +
    Y_u^T diag(c_u - 1) Y_u)^-1, splits over the rated items j exactly (contribution of j to
    item i: c_uj y_i^T W_u y_j, as implicit's `explain`). The served x_u was reached by a few
    CG steps against the previous sweep's Y, so it is close to, not equal to, that solution.
    """
    canonical = conf.copy()
    canonical.sum_duplicates()  # sorted, distinct items per user: the order of rated_indices
    y = item_factors.astype(np.float64)
    gramian = y.T @ y + reg * np.eye(y.shape[1])
    return gramian, canonical.data.astype(np.float32)
