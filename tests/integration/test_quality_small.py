"""bertrec trained on a small real-format MovieLens folder, exported, loaded as the server
loads it, and scored through the loaded Model: it must beat the bias-only baseline on RMSE
and popularity on NDCG@10, on the same split."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from bertrec.bench.quality_bertrec import ExportedModel, train_and_load
from bertrec.bench.quality_models import fit_popularity, fit_surprise
from bertrec.bench.quality_protocol import (
    HoldoutSplit,
    QualityData,
    evaluate,
    holdout_split,
    load_quality_data,
    rating_metrics,
)
from bertrec.repository.artifacts import RATING_HEAD_SCORE
from bertrec.server.model import Model, RankQuery
from bertrec.train.finetune import FinetuneConfig
from bertrec.train.pipeline import TrainConfig

ML_SMALL = Path(__file__).resolve().parents[2] / "../shared/data/ml-latest-small"
N_USERS = 40  # the first 40 users: ~5k ratings


@pytest.fixture(scope="module")
def movielens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deterministic subsample of ml-latest-small in MovieLens's own csv layout."""
    if not (ML_SMALL / "ratings.csv").is_file():
        pytest.skip(f"{ML_SMALL} is not present")
    out = tmp_path_factory.mktemp("ml-sub")
    with (ML_SMALL / "ratings.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= N_USERS]
    movies = {r[1] for r in kept[1:]}
    with (out / "ratings.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(kept)
    with (ML_SMALL / "movies.csv").open(newline="") as fh:
        items = list(csv.reader(fh))
    with (out / "movies.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([items[0]] + [r for r in items[1:] if r[0] in movies])
    return out


@pytest.fixture(scope="module")
def trained(
    movielens: Path, tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path
) -> tuple[QualityData, HoldoutSplit, Model]:
    """Trained on the split's train (tiny random BERT: the heads carry the signal here)."""
    data = load_quality_data(movielens)
    split = holdout_split(data.ratings)
    cfg = TrainConfig(
        encoder_path=tiny_bert_dir,
        finetune=FinetuneConfig(samples=32),
        baselines=False,
        progress=False,
    )
    return data, split, train_and_load(data, split.train, tmp_path_factory.mktemp("q"), cfg).model


def test_exported_model_beats_bias_only_and_popularity(
    trained: tuple[QualityData, HoldoutSplit, Model],
) -> None:
    data, split, model = trained
    assert model.manifest.scoring.rating_score == RATING_HEAD_SCORE
    ours = evaluate(ExportedModel(model, data), split.train, split.test)
    bias_only = rating_metrics(fit_surprise(split.train, {"algo": "baseline"}), split.test)
    popularity = evaluate(fit_popularity(split.train, {}), split.train, split.test)
    assert ours.rating is not None and bias_only is not None
    assert ours.rating.rmse < bias_only.rmse
    assert ours.ranking.ndcg > popularity.ranking.ndcg


def test_predictions_are_the_exported_arrays(
    trained: tuple[QualityData, HoldoutSplit, Model],
) -> None:
    """Independent numpy from the version's files: the rating head, clipped to the range."""
    model = trained[2]

    def load(name: str) -> np.ndarray:
        return np.load(model.version_dir / name).astype(np.float64)

    users = [str(u) for u in np.load(model.version_dir / "user_ids.npy")]
    items = [str(i) for i in np.load(model.version_dir / "item_ids.npy")]
    u, rows = users.index("7"), np.array([items.index(i) for i in ("1", "50", "296")])
    expected = (
        model.manifest.scoring.global_mean
        + load("user_bias.npy")[u]
        + load("item_bias.npy")[rows]
        + load("rating_item_factors.npy")[rows] @ load("rating_user_factors.npy")[u]
    )
    low, high = model.manifest.scoring.rating_range
    got = model.predicted_ratings(model.user_vector(u), rows, u)
    np.testing.assert_allclose(got, np.clip(expected, low, high), atol=1e-5)
    assert low <= 1.0 and high == 5.0  # MovieLens half stars: the range is the data's


def test_a_ranking_batch_returns_each_querys_predicted_ratings(
    trained: tuple[QualityData, HoldoutSplit, Model],
) -> None:
    """`Model.rank` fills every query's ratings in one vectorised pass, users and text alike,
    exactly as `predicted_ratings` gives them one query at a time."""
    model = trained[2]
    text_vector = model.fold_text(np.ones(model.arrays.text_to_user.shape[1], np.float32))
    queries = [RankQuery(model.user_vector(u), 5 + u, user_row=u) for u in range(4)]
    queries.append(RankQuery(text_vector, 3))
    for query, result in zip(queries, model.rank(queries), strict=True):
        assert result.ratings is not None and len(result.ratings) == len(result.rows)
        one = model.predicted_ratings(query.vector, result.rows, query.user_row)
        np.testing.assert_allclose(result.ratings, one, atol=1e-5)
