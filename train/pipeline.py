"""`bertrec train`: fine-tune the encoder, embed the item texts, fit the ranking and rating
heads (heads.py), evaluate against baselines, and write a training output folder (see
checkpoint.py) that `bertrec export` turns into a model version."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertrec.repository.artifacts import RANKING_SCORE, FactorArrays
from bertrec.train import checkpoint
from bertrec.train.baselines import ImplicitALSScorer, PopularityScorer, implicit_available
from bertrec.train.dataset import Dataset, Split
from bertrec.train.encoder import TextEncoder, load_bert
from bertrec.train.evaluate import Scorer, evaluate
from bertrec.train.finetune import FinetuneConfig, embed_texts, finetune, rating_pairs
from bertrec.train.heads import (
    HeadsConfig,
    HeadsFactors,
    HeadsRatingOrderScorer,
    HeadsScorer,
    fit_heads,
)
from bertrec.train.hybrid import HybridConfig, RatingOrderScorer, train_hybrid
from bertrec.train.indexing import IdIndex, Interactions

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class TrainConfig:
    model_name: str = "bertrec"
    encoder_path: Path | None = None  # None: the packaged all-MiniLM-L6-v2
    max_seq_len: int = 128  # serving-time truncation, recorded in the manifest
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)  # the biased_mf baseline
    baselines: bool = True
    text_to_user_reg: float = 1.0
    progress: bool = True


@dataclass(frozen=True)
class TrainResult:
    out: Path
    metrics: dict[str, Any]
    seconds: dict[str, float]


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(
    dataset: Dataset,
    split: Split,
    cfg: TrainConfig,
    out: Path,
    notes: dict[str, Any] | None = None,
) -> TrainResult:
    """Run the whole training job and write `out` (created; must not hold a previous run).

    `notes` (e.g. what folding a feedback store did) join the metrics, and so the manifest's
    training metrics of every version exported from `out`.
    """
    timer = _Timer()
    device = pick_device()
    log.info(
        "training on %s: %d train, %d test, %d cold-test ratings, %d cold items",
        device,
        len(split.train),
        len(split.test),
        len(split.cold_test),
        len(split.cold_items),
    )
    bert, tokenizer, base_name = load_bert(cfg.encoder_path)
    tokenizer = type(tokenizer)(tokenizer._tokenizer, cfg.max_seq_len)
    dim = cfg.heads.ranking.dim
    encoder = TextEncoder(bert, dim).to(device)

    texts, targets = rating_pairs(
        split.train,
        dataset.item_texts,
        cfg.finetune.samples,
        np.random.default_rng(cfg.finetune.seed),
    )
    ft_metrics = finetune(encoder, tokenizer, texts, targets, cfg.finetune, device, cfg.progress)
    timer.lap("finetune")

    index = IdIndex.build(split.train, dataset.item_texts)
    item_texts = [dataset.item_texts.get(str(i), "") for i in index.item_ids]
    text = item_embeddings(encoder, tokenizer, item_texts, device, cfg.progress)
    timer.lap("embed_items")

    train_rows = Interactions.from_ratings(split.train, index)
    heads = fit_heads(train_rows, index.n_users, index.n_items, text, cfg.heads)
    timer.lap("heads")

    rating_range = _rating_range(train_rows)
    indptr, indices = train_rows.csr(index.n_users)
    metrics = _evaluate_all(split, index, train_rows, (indptr, indices), heads, rating_range, cfg)
    timer.lap("evaluate")
    metrics["finetune"] = ft_metrics
    metrics.update(notes or {})

    projection = heads.text_projection
    if projection is None:  # trained without text: cold items and text queries score 0
        projection = np.zeros((encoder.hidden_size, dim), dtype=np.float32)
    with torch.no_grad():
        encoder.projection.weight.copy_(torch.from_numpy(projection.T))
    ranking = heads.ranking
    text_factors = text @ projection
    arrays = FactorArrays(
        user_ids=index.user_ids,
        item_ids=index.item_ids,
        user_factors=ranking.user_factors,
        item_factors=ranking.item_factors,
        user_bias=heads.rating.user_bias,
        item_bias=heads.rating.item_bias,
        item_rank_bias=heads.item_rank_bias,
        text_to_user=fit_text_to_user(
            ranking.user_factors, text_factors, indptr, indices, cfg.text_to_user_reg
        ),
        rated_indptr=indptr,
        rated_indices=indices,
        global_mean=heads.rating.global_mean,
        rating_user_factors=heads.rating.user_factors,
        rating_item_factors=heads.rating.item_factors,
        item_text_factors=text_factors,
        rank_gramian=heads.rank_gramian,
        rated_confidence=heads.rated_confidence,
    )
    _write(
        out,
        cfg,
        encoder.cpu(),
        tokenizer,
        arrays,
        item_texts,
        base_name,
        metrics,
        rating_range,
        timer.seconds,
    )
    timer.lap("save")
    return TrainResult(out, metrics, timer.seconds)


def item_embeddings(
    encoder: TextEncoder,
    tokenizer: Any,
    item_texts: list[str],
    device: torch.device,
    progress: bool,
) -> np.ndarray:
    """(n_items, H) unit-length pooled embeddings; zero rows for items without text."""
    has_text = np.array([bool(t) for t in item_texts], dtype=bool)
    text = np.zeros((len(item_texts), encoder.hidden_size), dtype=np.float32)
    if has_text.any():
        text[has_text] = embed_texts(
            encoder, tokenizer, [t for t in item_texts if t], device, progress=progress
        )
    return text


def _rating_range(rows: Interactions) -> tuple[float, float]:
    """The scale of the training ratings (MovieLens: 0.5..5), which predictions are clipped to."""
    if len(rows) == 0:
        return (1.0, 5.0)
    return (float(rows.ratings.min()), float(rows.ratings.max()))


def fit_text_to_user(
    user_factors: np.ndarray,
    item_text_vectors: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    reg: float,
) -> np.ndarray:
    """Ridge map M (d, d) from the mean text vector of a user's rated items to the user's
    factor: a text describing what someone likes becomes a user vector M @ enc(text)."""
    counts = np.diff(indptr)
    q = np.zeros((len(counts), item_text_vectors.shape[1]), dtype=np.float64)
    rated = counts > 0  # reduceat needs non-empty segments; CSR rows are grouped by user
    vectors = item_text_vectors[indices].astype(np.float64)
    q[rated] = np.add.reduceat(vectors, indptr[:-1][rated], axis=0)
    q /= np.maximum(counts, 1)[:, None]
    u = user_factors.astype(np.float64)
    gram = q.T @ q + reg * np.eye(q.shape[1])
    return np.linalg.solve(gram, q.T @ u).T.astype(np.float32)


def _evaluate_all(
    split: Split,
    index: IdIndex,
    train_rows: Interactions,
    train_csr: tuple[np.ndarray, np.ndarray],
    heads: HeadsFactors,
    rating_range: tuple[float, float],
    cfg: TrainConfig,
) -> dict[str, Any]:
    test = Interactions.from_ratings(split.test, index)
    cold = Interactions.from_ratings(split.cold_test, index)
    cold_rows = index.item_rows(np.asarray(sorted(split.cold_items), dtype=object))
    cold_rows = cold_rows[cold_rows >= 0]
    scorers: list[Scorer] = [HeadsScorer("hybrid", heads, rating_range)]
    if cfg.baselines:
        scorers.append(HeadsRatingOrderScorer("hybrid_by_predicted_rating", heads, rating_range))
        scorers.append(PopularityScorer(train_rows, index.n_items))
        mf_cfg = HybridConfig(**{**asdict(cfg.hybrid), "rank_weight": 0.0, "use_text": False})
        mf = train_hybrid(
            train_rows, index.n_users, index.n_items, index.n_warm_items, None, mf_cfg
        )
        scorers.append(RatingOrderScorer("biased_mf", mf, rating_range))
        if implicit_available():
            scorers.append(
                ImplicitALSScorer(train_rows, index.n_users, index.n_items, seed=cfg.hybrid.seed)
            )
        else:
            log.warning("baseline implicit_als skipped: install the `implicit` package")
    results = {
        s.name: evaluate(s, index, train_rows, test, cold, cold_rows, train_csr=train_csr)
        for s in scorers
    }
    return {
        "models": results,
        "ranking_score": RANKING_SCORE,
        "split": {
            "train": len(split.train),
            "test": len(split.test),
            "cold_test": len(split.cold_test),
            "cold_items": len(split.cold_items),
        },
    }


def _write(
    out: Path,
    cfg: TrainConfig,
    encoder: TextEncoder,
    tokenizer: Any,
    arrays: FactorArrays,
    item_texts: list[str],
    base_name: str,
    metrics: dict[str, Any],
    rating_range: tuple[float, float],
    seconds: dict[str, float],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save_encoder(out, encoder, tokenizer)
    checkpoint.save_factors(out, arrays, item_texts)
    config = json.loads(json.dumps(asdict(cfg), default=str))
    checkpoint.TrainInfo(
        model_name=cfg.model_name,
        base_encoder=base_name,
        dim=arrays.dim,
        max_seq_len=cfg.max_seq_len,
        global_mean=arrays.global_mean,
        rating_range=rating_range,
        metrics=metrics,
        config=config,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    ).save(out)
    (out / METRICS_FILE).write_text(json.dumps({**metrics, "seconds": seconds}, indent=2))


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now
        log.info("%s took %.1f s", name, self.seconds[name])


def metrics_table(metrics: dict[str, Any]) -> str:
    """A markdown table of every model's warm and cold metrics."""
    cols = [
        ("warm", "rmse"),
        ("warm", "mae"),
        ("warm", "ndcg@10"),
        ("warm", "recall@10"),
        ("cold", "rmse"),
        ("cold", "mae"),
        ("cold", "ndcg@10"),
        ("cold", "recall@10"),
    ]
    head = "| model | " + " | ".join(f"{a} {b}" for a, b in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, m in metrics["models"].items():
        cells = [_fmt(m[a].get(b)) for a, b in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.4f}"
