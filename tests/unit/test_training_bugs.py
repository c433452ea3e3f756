"""Regression tests for issue 9's two training bugs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import FixedScorer

from bertrec.cli import main
from bertrec.train.encoder import TextEncoder, load_bert
from bertrec.train.evaluate import EvalSet, ranking_metrics
from bertrec.train.finetune import FinetuneConfig, finetune
from bertrec.train.indexing import Interactions

LONG_TEXT = " ".join(f"word{i}" for i in range(150))  # far more than 64 tokens


def test_ranking_metrics_with_fewer_candidates_than_k() -> None:
    # 3 candidate items, k = 10: the list is 3 long, and the one relevant item ranks second.
    scores = np.array([[3.0, 2.0, 1.0]])
    test = Interactions(np.array([0]), np.array([1]), np.array([5.0]))
    ev = EvalSet(test, np.arange(3), np.array([0, 0]), np.zeros(0, dtype=np.int32))
    m = ranking_metrics(FixedScorer(scores), ev, k=10)
    assert m["ndcg@10"] == pytest.approx(1 / np.log2(3))
    assert m["recall@10"] == pytest.approx(1.0)


def test_train_with_fewer_cold_items_than_k(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """80 items -> 8 cold items, fewer than k = 10: used to crash with a broadcast error."""
    data = tmp_path / "data"
    assert main(["generate", "--out", str(data), "--users", "120", "--items-count", "80"]) == 0
    args = ["train", "--ratings", str(data / "ratings.csv"), "--items", str(data / "items.csv")]
    args += ["--out", str(tmp_path / "out"), "--encoder", str(tiny_bert_dir), "--dim", "8"]
    assert main([*args, "--finetune-samples", "32", "--no-baselines", "--quiet"]) == 0


def test_finetune_truncation_does_not_leak_into_serving_tokenizer(tiny_bert_dir: Path) -> None:
    bert, tokenizer, _ = load_bert(tiny_bert_dir)
    serving = type(tokenizer)(tokenizer._tokenizer, 128)
    before = serving.lengths([LONG_TEXT])[0]
    assert before == 128
    encoder = TextEncoder(bert, 8)
    cfg = FinetuneConfig(samples=4, batch_size=2, max_seq_len=64)
    texts = [LONG_TEXT, "short", LONG_TEXT + " more", "x"]
    targets = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    finetune(encoder, serving, texts, targets, cfg, torch.device("cpu"), progress=False)
    assert serving.lengths([LONG_TEXT])[0] == before
    assert serving([LONG_TEXT]).input_ids.shape[1] == 128
