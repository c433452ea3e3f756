"""bertrec in the quality benchmark, scored as exported: train -> export into a temporary
model repository -> `bertrec.server.model.load_model` -> the loaded Model's public methods.

Nothing here reads the torch module or the training arrays: rankings come from `Model.rank`
with the user's rated items excluded (what Recommend does) and ratings from
`Model.predicted_ratings` (what Recommend and ScoreItems return), so the numbers are the
served model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertrec.bench.quality_protocol import TOP_K, QualityData, RatingArrays
from bertrec.server.model import Model, RankQuery
from bertrec.train.dataset import Dataset, Split
from bertrec.train.pipeline import TrainConfig


@dataclass(frozen=True)
class Trained:
    """A served bertrec version and what it cost to make."""

    model: Model
    seconds: dict[str, float]  # per training stage, plus "train" (all) and "export"


def train_and_load(
    data: QualityData,
    train: RatingArrays,
    workdir: Path,
    cfg: TrainConfig,
    cold: RatingArrays | None = None,
    cold_items: np.ndarray | None = None,
) -> Trained:
    """Train on `train` (with every item text), export, and load the version as the server
    does. `cold`/`cold_items` describe a cold-item split for the trainer's own metrics."""
    from bertrec.export.onnx_export import export_model
    from bertrec.server.config import ServerConfig
    from bertrec.server.model import load_model
    from bertrec.train.pipeline import train as run_training

    texts = {str(i): t for i, t in zip(data.item_ids.tolist(), data.item_texts, strict=True) if t}
    empty = data.texts_of(train.subset(np.zeros(0, dtype=np.int64)))
    split = Split(
        train=data.texts_of(train),
        test=empty,
        cold_test=data.texts_of(cold) if cold is not None else empty,
        cold_items=frozenset(() if cold_items is None else data.item_ids[cold_items].tolist()),
    )
    start = time.monotonic()
    result = run_training(Dataset(split.train, texts), split, cfg, workdir / "trained")
    trained_s = time.monotonic() - start
    repo = workdir / "repo"
    repo.mkdir()
    start = time.monotonic()
    export_model(result.out, repo, "bertrec", int8=False)
    export_s = time.monotonic() - start
    model = load_model(ServerConfig(model_repo=repo, model="bertrec"))
    seconds = {**result.seconds, "train": round(trained_s, 1), "export": round(export_s, 1)}
    return Trained(model, seconds)


class ExportedModel:
    """The protocol's FittedModel over a loaded version: protocol rows <-> version rows by id.

    `score_users` ranks with `Model.rank` (top k, rated items excluded, optionally only
    `allow`ed items) and returns those k scores in a row of -inf: the protocol only reads
    the top k, and this way the ranking is the server's own, ties and all.
    """

    def __init__(self, model: Model, data: QualityData, allow: np.ndarray | None = None) -> None:
        self.model = model
        self.n_items = len(data.item_ids)
        users = {str(u): r for r, u in enumerate(model.arrays.user_ids.tolist())}
        self.user_rows = _rows(users, data.user_ids)
        self.item_rows = _rows({i: r for r, i in enumerate(model.item_ids)}, data.item_ids)
        self.column = np.full(model.n_items, -1, dtype=np.int64)  # version row -> protocol row
        known = self.item_rows >= 0
        self.column[self.item_rows[known]] = np.flatnonzero(known)
        self.allow = None if allow is None else self.item_rows[allow][self.item_rows[allow] >= 0]
        # Items the version has but the protocol's catalogue lacks (texts without ratings):
        # ask for that many more so that k catalogue items remain after dropping them.
        self.k = TOP_K + int((self.column < 0).sum()) if allow is None else TOP_K

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray | None:
        out = np.empty(len(users), dtype=np.float64)
        for user in np.unique(users):
            at = np.flatnonzero(users == user)
            out[at] = self._ratings(int(user), items[at])
        return out

    def _ratings(self, user: int, items: np.ndarray) -> np.ndarray:
        m = self.model
        row = int(self.user_rows[user])
        rows = self.item_rows[items]
        known = rows >= 0
        out = np.full(len(items), m.manifest.scoring.global_mean, dtype=np.float64)
        if row < 0:
            vector = np.zeros(m.dim, dtype=np.float32)
            out[known] = m.predicted_ratings(vector, rows[known], None)
        else:
            out[known] = m.predicted_ratings(m.user_vector(row), rows[known], row)
        return out

    def score_users(self, users: np.ndarray) -> np.ndarray:
        m = self.model
        scores = np.full((len(users), self.n_items), -np.inf, dtype=np.float32)
        queries, at = [], []
        for n, user in enumerate(users.tolist()):
            row = int(self.user_rows[user])
            if row < 0:
                continue
            queries.append(RankQuery(m.user_vector(row), self.k, m.rated_rows(row), self.allow))
            at.append(n)
        for n, result in zip(at, m.rank(queries) if queries else [], strict=True):
            cols = self.column[result.rows]
            keep = cols >= 0
            scores[n, cols[keep]] = result.scores[keep]
        return scores


def _rows(index: dict[str, int], ids: np.ndarray) -> np.ndarray:
    return np.asarray([index.get(str(i), -1) for i in ids.tolist()], dtype=np.int64)
