"""`--ranker-precision int8` serves the same answers as fp32: rows, order and scores to the bit
(the compact scan re-scores in fp32 whatever its proven error bound leaves in reach)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from server_harness import MODEL

from bertrec.server.config import ConfigError, ServerConfig, load_config
from bertrec.server.model import RankQuery, load_model
from bertrec.server.ranking import Ranker
from bertrec.server.ranking_compact import CompactRanker


def test_int8_ranking_answers_exactly_as_fp32(model_repo: Path) -> None:
    config = ServerConfig(model_repo=model_repo, model=MODEL, providers=("CPUExecutionProvider",))
    fp32 = load_model(config)
    int8 = load_model(dataclasses.replace(config, ranker_precision="int8"))
    assert isinstance(fp32.ranker, Ranker) and isinstance(int8.ranker, CompactRanker)
    users = range(min(fp32.n_users, 32))
    for batch in ([0], list(users)):  # one query alone, and a batch
        queries = [RankQuery(fp32.user_vector(u), 10, fp32.rated_rows(u), None, u) for u in batch]
        expected, got = fp32.rank(queries), int8.rank(queries)
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_array_equal(g.rows, e.rows)
            np.testing.assert_array_equal(g.scores, e.scores)
            assert e.ratings is not None and g.ratings is not None
            np.testing.assert_array_equal(g.ratings, e.ratings)


def test_an_unknown_precision_is_a_config_error(model_repo: Path) -> None:
    with pytest.raises(ConfigError, match="ranker_precision"):
        load_config({"model_repo": model_repo, "model": MODEL, "ranker_precision": "int4"})
