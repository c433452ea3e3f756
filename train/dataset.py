"""Typed containers for interaction data, shared by loaders, the generator, training and eval."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Ratings:
    """Explicit feedback as parallel columns (one row per rating).

    Ids are the external string ids as they appear in the source files.
    `reviews[i]` is "" when rating i has no review text; `timestamps` is 0 when unknown.
    """

    user_ids: np.ndarray  # dtype object/str, shape (n,)
    item_ids: np.ndarray  # dtype object/str, shape (n,)
    ratings: np.ndarray  # float32, shape (n,)
    reviews: np.ndarray  # dtype object/str, shape (n,)
    timestamps: np.ndarray  # int64, shape (n,)

    def __post_init__(self) -> None:
        n = len(self.ratings)
        for name in ("user_ids", "item_ids", "reviews", "timestamps"):
            if len(getattr(self, name)) != n:
                got = len(getattr(self, name))
                raise ValueError(f"Ratings.{name} has {got} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.ratings)

    def subset(self, rows: np.ndarray) -> Ratings:
        """The ratings at `rows` (an index or boolean mask)."""
        return Ratings(
            user_ids=self.user_ids[rows],
            item_ids=self.item_ids[rows],
            ratings=self.ratings[rows],
            reviews=self.reviews[rows],
            timestamps=self.timestamps[rows],
        )

    @staticmethod
    def from_columns(
        user_ids: list[str],
        item_ids: list[str],
        ratings: list[float],
        reviews: list[str] | None = None,
        timestamps: list[int] | None = None,
    ) -> Ratings:
        n = len(ratings)
        return Ratings(
            user_ids=np.asarray(user_ids, dtype=object),
            item_ids=np.asarray(item_ids, dtype=object),
            ratings=np.asarray(ratings, dtype=np.float32),
            reviews=np.asarray(reviews if reviews is not None else [""] * n, dtype=object),
            timestamps=np.asarray(
                timestamps if timestamps is not None else [0] * n, dtype=np.int64
            ),
        )


@dataclass(frozen=True)
class Dataset:
    """Ratings plus item texts (title, description, genres... joined into one string)."""

    ratings: Ratings
    item_texts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Split:
    """A reproducible train/test partition.

    `test` holds per-user held-out ratings of warm items; `cold_test` holds every rating of the
    cold-start items, which never appear in `train`.
    """

    train: Ratings
    test: Ratings
    cold_test: Ratings
    cold_items: frozenset[str]
