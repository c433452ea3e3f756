"""Write a Dataset as the CSV files that `bertrec train --ratings/--items` reads."""

from __future__ import annotations

import csv
from pathlib import Path

from bertrec.train.dataset import Dataset

RATINGS_CSV = "ratings.csv"
ITEMS_CSV = "items.csv"


def write_dataset(dataset: Dataset, folder: Path) -> tuple[Path, Path]:
    """Returns (ratings path, items path)."""
    folder.mkdir(parents=True, exist_ok=True)
    r = dataset.ratings
    ratings_path, items_path = folder / RATINGS_CSV, folder / ITEMS_CSV
    with ratings_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "rating", "review", "timestamp"])
        w.writerows(
            zip(
                r.user_ids.tolist(),
                r.item_ids.tolist(),
                r.ratings.tolist(),
                r.reviews.tolist(),
                r.timestamps.tolist(),
                strict=True,
            )
        )
    with items_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "text"])
        w.writerows(sorted(dataset.item_texts.items()))
    return ratings_path, items_path
