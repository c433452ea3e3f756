"""Fine-tune the BERT encoder on text -> rating, then embed item texts.

Training pairs are reviews with their rating and, so the encoder also sees the kind of
text it will embed, item descriptions with the item's mean training rating.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bertrec.text import TextTokenizer
from bertrec.train.dataset import Ratings
from bertrec.train.encoder import TextEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    # 512 pairs in batches of 32: ~20 s on two cores, so the whole 100k-rating fit stays
    # within 3 minutes; the ranking head gets its text signal from the projection fitted
    # on top of the encoder (ials.py), which is where text matters most.
    samples: int = 512  # text/rating pairs per epoch (reviews first, then item texts)
    epochs: int = 1
    batch_size: int = 32
    lr: float = 3e-5
    max_seq_len: int = 64  # training-time truncation; serving uses the export's max length
    top_layers: int = 2  # transformer layers updated (from the top); 0 = all of them
    seed: int = 0


def rating_pairs(
    ratings: Ratings, item_texts: dict[str, str], n: int, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """Up to `n` (text, rating) pairs: half reviews (where present), the rest item texts."""
    # bool() per review: a fixed-width str copy of the column would be as wide as its longest one.
    reviews = ratings.reviews
    has_review = np.flatnonzero(np.fromiter(map(bool, reviews), dtype=bool, count=len(reviews)))
    n_reviews = min(len(has_review), n // 2 if item_texts else n)
    rows = rng.choice(has_review, size=n_reviews, replace=False) if n_reviews else has_review[:0]
    texts = [str(t) for t in ratings.reviews[rows]]
    targets = list(ratings.ratings[rows].astype(float))
    sums: dict[str, list[float]] = {}
    for item, r in zip(ratings.item_ids.tolist(), ratings.ratings.tolist(), strict=True):
        if item in item_texts:
            sums.setdefault(item, []).append(r)
    items = sorted(sums)
    n_items = min(len(items), n - n_reviews)
    for j in rng.choice(len(items), size=n_items, replace=False) if n_items else []:
        texts.append(item_texts[items[j]])
        targets.append(float(np.mean(sums[items[j]])))
    return texts, np.asarray(targets, dtype=np.float32)


def finetune(
    encoder: TextEncoder,
    tokenizer: TextTokenizer,
    texts: list[str],
    targets: np.ndarray,
    cfg: FinetuneConfig,
    device: torch.device,
    progress: bool = True,
) -> dict[str, float]:
    """Regress standardised ratings from pooled embeddings; updates `encoder.bert` in place."""
    if not texts or cfg.epochs <= 0:
        return {"finetune_pairs": 0}
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    mean, std = float(targets.mean()), float(targets.std() or 1.0)
    y = torch.from_numpy((targets - mean) / std)
    head = nn.Linear(encoder.hidden_size, 1).to(device)
    params = _trainable(encoder.bert, cfg.top_layers) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    train_tok = training_tokenizer(tokenizer, cfg.max_seq_len)
    encoder.train()
    rng = np.random.default_rng(cfg.seed)
    losses: list[float] = []
    steps = cfg.epochs * ((len(texts) + cfg.batch_size - 1) // cfg.batch_size)
    bar = tqdm(total=steps, desc="fine-tune encoder", disable=not progress, unit="batch")
    for _ in range(cfg.epochs):
        for rows in _batches(len(texts), cfg.batch_size, rng):
            batch = train_tok([texts[i] for i in rows])
            pooled = encoder.pooled(*_to_device(batch.as_feed(), device))
            loss = nn.functional.mse_loss(head(pooled).squeeze(-1), y[rows].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    encoder.eval()
    return {"finetune_pairs": len(texts), "finetune_final_loss": float(np.mean(losses[-20:]))}


def training_tokenizer(tokenizer: TextTokenizer, max_seq_len: int) -> TextTokenizer:
    """A copy of `tokenizer` truncating at `max_seq_len`. TextTokenizer configures the
    `tokenizers.Tokenizer` it wraps in place, so wrapping the shared one would leak the
    training truncation into item embedding and export (issue 9's 64-token bug)."""
    from tokenizers import Tokenizer

    return TextTokenizer(Tokenizer.from_str(tokenizer._tokenizer.to_str()), max_seq_len)


def _trainable(bert: nn.Module, top_layers: int) -> list[nn.Parameter]:
    """Parameters of the top `top_layers` transformer layers; the rest are frozen.

    Back-propagating through only the top layers costs a fraction of full fine-tuning on a
    CPU and keeps the pretrained lower layers' general language knowledge intact.
    """
    layers = getattr(getattr(bert, "encoder", None), "layer", None)
    if top_layers <= 0 or layers is None or top_layers >= len(layers):
        return list(bert.parameters())
    for p in bert.parameters():
        p.requires_grad_(False)
    params = [p for layer in layers[-top_layers:] for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _batches(n: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    perm = rng.permutation(n)
    for start in range(0, n, size):
        yield perm[start : start + size]


def _to_device(feed: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.from_numpy(feed[k]).to(device)
        for k in ("input_ids", "attention_mask", "token_type_ids")
    )


@torch.no_grad()
def embed_texts(
    encoder: TextEncoder,
    tokenizer: TextTokenizer,
    texts: list[str],
    device: torch.device,
    batch_size: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """Unit-length pooled embeddings (n, hidden); length-sorted batches, input order kept."""
    from tqdm.auto import tqdm

    encoder.eval()
    out = np.zeros((len(texts), encoder.hidden_size), dtype=np.float32)
    order = np.argsort(tokenizer.lengths(texts), kind="stable")
    for start in tqdm(
        range(0, len(texts), batch_size), desc="embed items", disable=not progress, unit="batch"
    ):
        rows = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in rows])
        out[rows] = encoder.pooled(*_to_device(batch.as_feed(), device)).cpu().numpy()
    return out
