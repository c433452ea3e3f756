"""Dense integer rows for external ids: users seen in training, and the whole item catalogue."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bertrec.train.dataset import Ratings


@dataclass(frozen=True)
class IdIndex:
    """Row numbers for users and items; items seen in training come first, then text-only items."""

    user_ids: np.ndarray  # str, row -> id
    item_ids: np.ndarray  # str, row -> id
    n_warm_items: int  # rows [0, n_warm_items) have training ratings

    @staticmethod
    def build(train: Ratings, item_texts: dict[str, str]) -> IdIndex:
        users = np.unique(train.user_ids.astype(str))
        warm = np.unique(train.item_ids.astype(str))
        warm_set = set(warm.tolist())
        text_only = np.asarray(sorted(i for i in item_texts if i not in warm_set), dtype=str)
        items = np.concatenate([warm, text_only]) if len(text_only) else warm
        return IdIndex(users, items, len(warm))

    def user_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `ids`, -1 where unknown."""
        return _lookup(self.user_ids, ids)

    def item_rows(self, ids: np.ndarray) -> np.ndarray:
        return _lookup(self.item_ids, ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


def _lookup(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    mapping = {k: r for r, k in enumerate(table.tolist())}
    return np.fromiter((mapping.get(str(x), -1) for x in ids), dtype=np.int64, count=len(ids))


@dataclass(frozen=True)
class Interactions:
    """Training ratings as integer rows (only pairs whose user and item are indexed)."""

    users: np.ndarray  # int64
    items: np.ndarray  # int64
    ratings: np.ndarray  # float32

    @staticmethod
    def from_ratings(ratings: Ratings, index: IdIndex) -> Interactions:
        u = index.user_rows(ratings.user_ids)
        i = index.item_rows(ratings.item_ids)
        keep = (u >= 0) & (i >= 0)
        return Interactions(u[keep], i[keep], ratings.ratings[keep].astype(np.float32))

    def __len__(self) -> int:
        return len(self.users)

    def csr(self, n_users: int) -> tuple[np.ndarray, np.ndarray]:
        """(indptr, indices): each user's distinct item rows, sorted."""
        pairs = np.unique(np.stack([self.users, self.items], axis=1), axis=0)
        counts = np.bincount(pairs[:, 0], minlength=n_users)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return indptr, pairs[:, 1].astype(np.int32)
