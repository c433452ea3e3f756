"""Forgetting reaches a fresh export: a user forgotten in the feedback store leaves no byte of
their id in the store files, the training output or the model version built after it.

The ids are long and unique, so finding their bytes anywhere means the id leaked. They are
searched in every encoding the artifacts use: UTF-8 (JSON, SQLite text) and UTF-32 (numpy
unicode arrays such as user_ids.npy), which the kept user proves the search can see.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from bertrec.cli import main
from bertrec.feedback.events import FeedbackEvent, FeedbackKind
from bertrec.feedback.store import open_store
from bertrec.repository.artifacts import USER_IDS

FORGOTTEN = "forget-me-user-5c0f3e9a71b24d86a3f1c7e2b9d04a68"
NEWCOMER = "newcomer-from-feedback-8e2a6d4f19c3b7051e9f2a6c4d8b3e70"
MODEL = "forgetful"


def _encodings(text: str) -> list[bytes]:
    return [text.encode(codec) for codec in ("utf-8", "utf-16-le", "utf-32-le")]


def _files_holding(folder: Path, text: str) -> list[str]:
    needles = _encodings(text)
    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and any(n in path.read_bytes() for n in needles)
    )


def _add_ratings(ratings_csv: Path, user: str, items: list[str]) -> None:
    with ratings_csv.open("a", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([user, item, 4.0, "", 1000 + n] for n, item in enumerate(items))


def _events(user: str, items: list[str], at: float) -> list[FeedbackEvent]:
    kinds = [FeedbackKind.RATING, FeedbackKind.CLICK]
    return [
        FeedbackEvent(user, item, kinds[n % 2], 5.0 if n % 2 == 0 else 0.0, at + n, f"{user}/{n}")
        for n, item in enumerate(items)
    ]


def test_forgotten_user_is_absent_from_store_and_fresh_export(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    data, store_dir = tmp_path / "data", tmp_path / "store"
    assert main(["generate", "--out", str(data), "--users", "120", "--items-count", "80"]) == 0
    with (data / "ratings.csv").open(encoding="utf-8") as fh:
        items = sorted({row["item_id"] for row in csv.DictReader(fh)})
    _add_ratings(data / "ratings.csv", FORGOTTEN, items[:12])

    url = f"sqlite://{store_dir / 'feedback.db'}"
    store = open_store(url)
    try:
        store.append(_events(FORGOTTEN, items[12:18], 2000.0))
        store.append(_events(NEWCOMER, items[20:30], 3000.0))
        assert _files_holding(store_dir, FORGOTTEN), "the search cannot see the stored events"
        erased = store.forget(FORGOTTEN)
        assert erased.events_deleted == 6
    finally:
        store.close()
    assert _files_holding(store_dir, FORGOTTEN) == []

    trained, repo = tmp_path / "trained", tmp_path / "repo"
    train = ["train", "--ratings", str(data / "ratings.csv"), "--items", str(data / "items.csv")]
    train += ["--out", str(trained), "--encoder", str(tiny_bert_dir), "--dim", "8"]
    train += ["--finetune-samples", "32", "--no-baselines", "--quiet", "--feedback", url]
    assert main(train) == 0
    assert main(["export", "--trained", str(trained), "--repo", str(repo), "--model", MODEL]) == 0
    version = repo / MODEL / "1"

    user_ids = np.load(next(version.rglob(USER_IDS))).tolist()
    assert FORGOTTEN not in user_ids and NEWCOMER in user_ids
    assert any(USER_IDS in f for f in _files_holding(version, NEWCOMER))
    for folder in (version, trained, store_dir):
        assert _files_holding(folder, FORGOTTEN) == [], folder

    manifest = json.loads((version / "manifest.json").read_text())
    folded = manifest["training_metrics"]["feedback"]
    assert folded["users_forgotten"] == 1 and folded["file_ratings_forgotten"] == 12
    assert folded["ratings_used"] == 5 and folded["new_users"] == 1
    assert folded["skipped"] == {"click_not_used": 5}
