"""Test helpers: a valid training output folder without training anything."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bertrec.bench.synthetic import random_factor_arrays
from bertrec.repository.artifacts import FactorArrays
from bertrec.train.checkpoint import TrainInfo, save_encoder, save_factors

PHRASES = (
    "quiet warm story about a lighthouse keeper who finds letters from the sea;",
    "fast paced thriller with a detective chasing an art thief across Europe;",
    "cookbook of simple vegetarian dishes for busy weeknights and lazy Sundays;",
    "science fiction epic where colonists wake early on a generation ship;",
    "memoir of a jazz pianist growing up in New Orleans during the sixties",
)
WORDS = tuple(word for phrase in PHRASES for word in phrase.split(" "))


def fake_item_texts(n_items: int, rng: np.random.Generator, max_words: int = 90) -> list[str]:
    """Varied lengths, from two words to longer than a short `max_seq_len` truncates."""
    lengths = np.concatenate([[2, max_words], rng.integers(2, max_words, size=n_items)])
    texts = [" ".join(rng.choice(WORDS, size=int(n))) for n in lengths[:n_items]]
    return [t.capitalize() + "." for t in texts]


def make_trained_output(
    out: Path,
    bert_dir: Path,
    n_users: int = 40,
    n_items: int = 60,
    dim: int = 16,
    seed: int = 0,
    explanation_arrays: bool = False,
) -> Path:
    """Write a training output folder (train/checkpoint.py layout) with random factors.

    The encoder is the BERT at `bert_dir` with a random projection to `dim`; users have rated
    a random handful of items each; `explanation_arrays` adds the optional arrays explanations
    read (item_text_factors, rank_gramian, rated_confidence). Returns `out`.
    """
    import torch

    from bertrec.train.encoder import TextEncoder, load_bert

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    bert, tokenizer, name = load_bert(bert_dir)
    save_encoder(out, TextEncoder(bert, dim).eval(), tokenizer)
    factors = _random_factors(rng, n_users, n_items, dim)
    if explanation_arrays:
        factors = with_explanation_arrays(factors, rng)
    save_factors(out, factors, fake_item_texts(n_items, rng))
    TrainInfo(
        model_name="fake",
        base_encoder=name,
        dim=dim,
        max_seq_len=64,
        global_mean=3.6,
        rating_range=(1.0, 5.0),
        metrics={"rmse": 0.91, "recall@10": 0.12, "ndcg@10": 0.08},
        config={"seed": seed, "fake": True},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    ).save(out)
    return out


def _random_factors(rng: np.random.Generator, n_users: int, n_items: int, dim: int) -> FactorArrays:
    rated = [
        np.sort(rng.choice(n_items, size=rng.integers(1, 8), replace=False)) for _ in range(n_users)
    ]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rated])])
    return random_factor_arrays(
        rng,
        user_ids=np.array([f"u{i:04d}" for i in range(n_users)]),
        item_ids=np.array([f"item-{i:05d}" for i in range(n_items)]),
        rated_indptr=indptr,
        rated_indices=np.concatenate(rated) if rated else np.zeros(0, np.int32),
        dim=dim,
        global_mean=3.6,
    )


def with_explanation_arrays(arrays: FactorArrays, rng: np.random.Generator) -> FactorArrays:
    """`arrays` plus what explanations read: a text part of each item factor, the ridge Gram
    matrix Y^T Y + reg I and rating-like confidences (random, as the factors are)."""
    items = arrays.item_factors.astype(np.float64)
    text = (items * rng.uniform(0.2, 0.8, size=(len(items), 1))).astype(np.float32)
    gramian = items.T @ items + 5.0 * np.eye(items.shape[1])
    stars = rng.integers(1, 6, size=len(arrays.rated_indices))
    confidence = (5.0 * (stars / 5.0) ** 2).astype(np.float32)
    return dataclasses.replace(
        arrays, item_text_factors=text, rank_gramian=gramian, rated_confidence=confidence
    )
