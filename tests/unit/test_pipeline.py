"""`bertrec generate` + `bertrec train` end to end on a tiny random-weight BERT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bertrec.cli import main
from bertrec.repository.artifacts import ARRAY_FILES, FactorArrays
from bertrec.train import checkpoint


def _train(root: Path, extra: list[str]) -> Path:
    data = root / "data"
    generate = ["generate", "--out", str(data), "--users", "300", "--items-count", "200"]
    assert main([*generate, "--seed", "2"]) == 0
    out = root / "trained"
    args = ["train", "--ratings", str(data / "ratings.csv"), "--items", str(data / "items.csv")]
    args += ["--out", str(out), "--dim", "16", "--epochs", "15", "--max-seq-len", "48"]
    assert main([*args, "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    return _train(root, ["--encoder", str(tiny_bert_dir), "--finetune-samples", "64"])


@pytest.fixture(scope="module")
def trained_pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real all-MiniLM-L6-v2, lightly fine-tuned: text must carry cold-start signal."""
    root = tmp_path_factory.mktemp("pipeline-pretrained")
    return _train(root, ["--finetune-samples", "128", "--no-baselines"])


def test_training_output_layout(trained: Path) -> None:
    info = checkpoint.TrainInfo.load(trained)
    assert info.dim == 16 and info.max_seq_len == 48
    for name in ARRAY_FILES:
        assert (trained / "factors" / name).is_file(), name
    arrays = FactorArrays.load(trained / "factors", info.global_mean)
    n_items = len(arrays.item_ids)
    assert arrays.item_factors.shape == (n_items, 16)
    assert arrays.rated_indptr[-1] == len(arrays.rated_indices)
    assert np.isfinite(arrays.item_factors).all()
    texts = checkpoint.load_item_texts(trained / "factors" / "item_texts.jsonl")
    assert len(texts) == n_items and all(texts)


def test_metrics_cover_every_baseline(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())["models"]
    assert set(metrics) >= {"hybrid", "hybrid_by_predicted_rating", "popularity", "biased_mf"}
    for m in metrics.values():
        assert 0.0 <= m["warm"]["ndcg@10"] <= 1.0 and m["warm"]["n_users"] > 0


@pytest.mark.pretrained
def test_training_beats_text_free_baseline_on_cold_start(
    trained_pretrained: Path, trained: Path
) -> None:
    hybrid = json.loads((trained_pretrained / "metrics.json").read_text())["models"]["hybrid"]
    baselines = json.loads((trained / "metrics.json").read_text())["models"]
    # Same generated data and split: the text-free model cannot order unseen items at all.
    assert hybrid["cold"]["ndcg@10"] > baselines["biased_mf"]["cold"]["ndcg@10"] + 0.1
    assert hybrid["cold"]["rmse"] < baselines["biased_mf"]["cold"]["rmse"]
    assert hybrid["warm"]["ndcg@10"] > baselines["popularity"]["warm"]["ndcg@10"]


def test_encoder_projection_is_the_factor_models_text_projection(trained: Path) -> None:
    import torch

    info = checkpoint.TrainInfo.load(trained)
    encoder, tokenizer = checkpoint.load_encoder(trained, info.max_seq_len, info.dim)
    arrays = FactorArrays.load(trained / "factors", info.global_mean)
    n_warm = int(np.max(arrays.rated_indices)) + 1
    texts = checkpoint.load_item_texts(trained / "factors" / "item_texts.jsonl")
    batch = tokenizer(texts[n_warm:])
    with torch.no_grad():
        feed = {k: torch.from_numpy(v) for k, v in batch.as_feed().items()}
        text_part = encoder(**feed).numpy()
    # Cold items (after the warm ones) have factors made of the text projection alone.
    np.testing.assert_allclose(arrays.item_factors[n_warm:], text_part, atol=1e-4)
    # Every item's text part is exported too (explanations split scores with it).
    assert arrays.item_text_factors is not None
    np.testing.assert_allclose(arrays.item_text_factors[n_warm:], text_part, atol=1e-4)


def test_rating_head_is_exported_beside_the_ranking_factors(trained: Path) -> None:
    info = checkpoint.TrainInfo.load(trained)
    arrays = FactorArrays.load(trained / "factors", info.global_mean)
    assert arrays.has_rating_head
    assert arrays.has_attribution  # explanations can name the rated items behind a score
    assert arrays.shape_mismatch(len(arrays.user_ids), len(arrays.item_ids), info.dim) is None
    assert info.rating_range == (1.0, 5.0)  # the generated data's scale


def test_user_mistakes_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "r.csv"
    bad.write_text("user_id,item_id,rating\nu1,i1,five\n")
    assert main(["train", "--ratings", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "r.csv:2" in err and "Traceback" not in err
