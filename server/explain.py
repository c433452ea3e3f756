"""Explanations of ranking scores, computed for the k returned items only, when asked.

The score is dot(u, item_factors[i]) + item_rank_bias[i]; it splits exactly into a bias part,
a text part dot(u, item_text_factors[i]) and the collaborative rest. For a known user the
ranking head's ridge regression also attributes dot(u*, y_i) to each rated item j:
c_uj y_i^T W_u y_j with W_u = (G + Y_u^T diag(c_u - 1) Y_u)^-1 (G = Y^T Y + reg I, exported
as rank_gramian.npy; see train/ials.attribution_arrays). One d x d solve per request, then
one (n_rated, k) product: microseconds to a millisecond for d = 64.
"""

from __future__ import annotations

import numpy as np

from bertrec.explanation import Contribution, Explanation
from bertrec.repository.artifacts import RANK_REG, FactorArrays

TOP_CONTRIBUTORS = 3


def explain(
    arrays: FactorArrays,
    item_ids: list[str],
    vector: np.ndarray,
    user_row: int | None,
    rows: np.ndarray,
    touches: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> list[Explanation]:
    """Explanations of the scores of item `rows` for `vector` (a user's, or a folded text).

    Args:
        arrays: the version's arrays.
        item_ids: row -> external item id.
        vector: the query vector in user space, float32 (d,).
        user_row: the user's row; None for a text query (no rated items to attribute to).
        rows: the returned item rows, int64 (k,).
        touches: a folded user's (item rows, weights, preferences) (server/fold_in.py),
            attributed the same way as a training user's rated items.
    """
    items = arrays.item_factors[rows]
    bias = arrays.item_rank_bias[rows].astype(np.float64)
    total = items.astype(np.float64) @ vector.astype(np.float64)
    if arrays.item_text_factors is None:
        text = np.zeros(len(rows))
    else:
        text = arrays.item_text_factors[rows].astype(np.float64) @ vector.astype(np.float64)
    collab = total - text
    if touches is not None:
        rated, contrib = _folded_attribution(arrays, touches, items)
    elif user_row is not None and arrays.has_attribution:
        rated, contrib = _attribution(arrays, user_row, items)
    else:
        parts = zip(bias.tolist(), collab.tolist(), text.tolist(), strict=True)
        return [Explanation(b, c, t) for b, c, t in parts]
    order = np.argsort(-contrib, axis=0, kind="stable")[:TOP_CONTRIBUTORS]
    sums = contrib.sum(axis=0)
    return [
        Explanation(
            float(bias[n]),
            float(collab[n]),
            float(text[n]),
            tuple(Contribution(item_ids[rated[j]], float(contrib[j, n])) for j in order[:, n]),
            float(sums[n]),
        )
        for n in range(len(rows))
    ]


def _attribution(
    arrays: FactorArrays, user_row: int, items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(rated rows (n,), contributions (n, k)): c_j y_j^T W_u y_i for rated j, returned i."""
    assert arrays.rank_gramian is not None and arrays.rated_confidence is not None
    start, end = int(arrays.rated_indptr[user_row]), int(arrays.rated_indptr[user_row + 1])
    rated = np.asarray(arrays.rated_indices[start:end], dtype=np.int64)
    conf = np.asarray(arrays.rated_confidence[start:end], dtype=np.float64)
    y_rated = arrays.item_factors[rated].astype(np.float64)
    system = arrays.rank_gramian + (y_rated.T * (conf - 1.0)) @ y_rated
    solved = np.linalg.solve(system, items.astype(np.float64).T)  # W_u y_i, (d, k)
    return rated, conf[:, None] * (y_rated @ solved)


def _folded_attribution(
    arrays: FactorArrays, touches: tuple[np.ndarray, np.ndarray, np.ndarray], items: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`_attribution` for a folded user: w_j p_j y_j^T W_u y_i over the items they touched
    (a skip, p = 0, shapes W_u but contributes no term of its own)."""
    rated, weights, prefs = touches
    y_rated = arrays.item_factors[rated].astype(np.float64)
    gramian = arrays.rank_gramian
    if gramian is None:  # older versions: fold-in's own G (server/fold_in.py)
        y = arrays.item_factors.astype(np.float64)
        gramian = y.T @ y + RANK_REG * np.eye(y.shape[1])
    system = gramian + (y_rated.T * (weights - 1.0)) @ y_rated
    solved = np.linalg.solve(system, items.astype(np.float64).T)
    return rated, (weights * prefs)[:, None] * (y_rated @ solved)
