"""The factor model on generated data, with the generator's true genre mixtures as the
item "text" (so the test needs no encoder and runs in seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from bertrec.train.evaluate import evaluate
from bertrec.train.hybrid import FactorScorer, HybridConfig, RatingOrderScorer, train_hybrid
from bertrec.train.indexing import IdIndex, Interactions
from bertrec.train.split import split_dataset
from bertrec.train.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def setup() -> tuple:
    dataset, truth = generate(SyntheticConfig(n_users=400, n_items=300, seed=5))
    split = split_dataset(dataset, seed=1)
    index = IdIndex.build(split.train, dataset.item_texts)
    rows = np.array([int(i[1:]) for i in index.item_ids])
    text = truth.item_genres[rows].astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    train = Interactions.from_ratings(split.train, index)
    test = Interactions.from_ratings(split.test, index)
    cold = Interactions.from_ratings(split.cold_test, index)
    cold_rows = index.item_rows(np.array(sorted(split.cold_items)))
    return index, text, train, test, cold, cold_rows


def _fit(setup: tuple, **kw: object) -> dict:
    index, text, train, test, cold, cold_rows = setup
    cfg = HybridConfig(dim=16, epochs=15, **kw)  # type: ignore[arg-type]
    use = text if cfg.use_text else None
    f = train_hybrid(train, index.n_users, index.n_items, index.n_warm_items, use, cfg)
    scorer = FactorScorer("h", f) if cfg.rank_weight > 0 else RatingOrderScorer("mf", f)
    return {"factors": f, **evaluate(scorer, index, train, test, cold, cold_rows)}


def test_hybrid_beats_text_free_mf_on_cold_start_and_ranks_better(setup: tuple) -> None:
    hybrid = _fit(setup)
    plain = _fit(setup, rank_weight=0.0, use_text=False)
    assert hybrid["cold"]["ndcg@10"] > plain["cold"]["ndcg@10"] + 0.1
    assert hybrid["cold"]["rmse"] < plain["cold"]["rmse"]
    assert hybrid["warm"]["ndcg@10"] > 1.5 * plain["warm"]["ndcg@10"]
    assert hybrid["warm"]["rmse"] < plain["warm"]["rmse"] + 0.02


def test_cold_items_get_text_only_factors_and_training_is_seeded(setup: tuple) -> None:
    index, text = setup[0], setup[1]
    a = _fit(setup)["factors"]
    b = _fit(setup)["factors"]
    np.testing.assert_array_equal(a.item_factors, b.item_factors)
    cold = slice(index.n_warm_items, index.n_items)
    np.testing.assert_allclose(a.item_factors[cold], text[cold] @ a.text_projection, atol=1e-5)
