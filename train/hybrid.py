"""Hybrid matrix factorisation with a text prior, trained to both predict and rank.

    rating(u, i)  = mu + b_u + b_i + u . v_i
    rank(u, i)    = u . v_i + c_i
    v_i = f_i + P e_i,  b_i = g_i + w_b . e_i,  c_i = h_i + w_c . e_i

e_i is the item's unit-length text embedding, so an item without ratings still has
v_i = P e_i. The loss joins squared rating error with a BPR ranking term over observed items
versus sampled unobserved ones, because which items a user rates carries most of the
ranking signal. The free parts (f, g, h) are dropped at random per batch (as DropoutNet does)
so that the text path alone must learn to produce useful factors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bertrec.train.indexing import Interactions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HybridConfig:
    dim: int = 64
    epochs: int = 30
    batch_size: int = 2048
    lr: float = 0.01
    rating_weight: float = 1.0
    rank_weight: float = 2.0  # 0 = plain biased MF (rating loss only)
    reg_user: float = 0.02
    reg_free: float = 0.05
    reg_text: float = 0.001
    free_dropout: float = 0.25  # probability of hiding an item's free parts in a batch
    use_text: bool = True
    seed: int = 0


class HybridMF(nn.Module):
    def __init__(self, n_users: int, n_items: int, text: torch.Tensor | None, cfg: HybridConfig):
        super().__init__()
        d = cfg.dim
        self.text = text  # (n_items, H), fixed
        self.user = nn.Parameter(torch.randn(n_users, d) * 0.05)
        self.user_bias = nn.Parameter(torch.zeros(n_users))
        self.free = nn.Parameter(torch.randn(n_items, d) * 0.05)
        self.free_bias = nn.Parameter(torch.zeros(n_items))
        self.free_rank_bias = nn.Parameter(torch.zeros(n_items))
        hidden = text.shape[1] if text is not None else 1
        self.proj = nn.Parameter(torch.randn(hidden, d) * (0.1 / hidden**0.5))
        self.w_bias = nn.Parameter(torch.zeros(hidden))
        self.w_rank = nn.Parameter(torch.zeros(hidden))

    def items(
        self, rows: torch.Tensor, keep_free: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(v, b, c) for item rows; `keep_free` (0/1 per row) hides the free parts."""
        v, b, c = self.free[rows], self.free_bias[rows], self.free_rank_bias[rows]
        if keep_free is not None:
            v, b, c = v * keep_free[:, None], b * keep_free, c * keep_free
        if self.text is not None:
            e = self.text[rows]
            v = v + e @ self.proj
            b = b + e @ self.w_bias
            c = c + e @ self.w_rank
        return v, b, c


@dataclass(frozen=True)
class HybridFactors:
    """Trained state as numpy arrays (cold items: free parts are exactly zero)."""

    user_factors: np.ndarray
    user_bias: np.ndarray
    item_factors: np.ndarray
    item_bias: np.ndarray
    item_rank_bias: np.ndarray
    text_projection: np.ndarray  # (H, d): P, the encoder's projection head (transposed)
    global_mean: float


def train_hybrid(
    data: Interactions,
    n_users: int,
    n_items: int,
    n_warm_items: int,
    text: np.ndarray | None,
    cfg: HybridConfig,
    progress: bool = False,
) -> HybridFactors:
    """Fit on `data`; negatives are drawn from the warm items only (rows < n_warm_items).

    Runs on one thread: the matrices are small enough that thread hand-offs cost more than
    they save, and a single thread makes training bit-for-bit reproducible.
    """
    with _one_thread():
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        text_t = torch.from_numpy(text).float() if (cfg.use_text and text is not None) else None
        model = HybridMF(n_users, n_items, text_t, cfg)
        mu = float(data.ratings.mean())
        users = torch.from_numpy(data.users)
        items = torch.from_numpy(data.items)
        ratings = torch.from_numpy(data.ratings)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        steps_per_epoch = max(1, len(data) // cfg.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch
        )
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(data), generator=gen)
            total = 0.0
            for step in range(steps_per_epoch):
                rows = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                loss = _batch_loss(
                    model, users[rows], items[rows], ratings[rows], mu, n_warm_items, cfg, gen
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach())
            if progress:
                log.info(
                    "hybrid epoch %d/%d loss %.4f", epoch + 1, cfg.epochs, total / steps_per_epoch
                )
        return _export_factors(model, n_warm_items, mu)


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _batch_loss(
    model: HybridMF,
    u: torch.Tensor,
    i: torch.Tensor,
    r: torch.Tensor,
    mu: float,
    n_warm: int,
    cfg: HybridConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    keep = None
    if model.text is not None and cfg.free_dropout > 0:
        keep = (torch.rand(len(i), generator=gen) >= cfg.free_dropout).float()
    pu, bu = model.user[u], model.user_bias[u]
    v, b, c = model.items(i, keep)
    dot = (pu * v).sum(-1)
    loss = cfg.rating_weight * ((mu + bu + b + dot - r) ** 2).mean()
    reg = cfg.reg_user * (pu**2).sum(-1).mean() + cfg.reg_free * (
        (model.free[i] ** 2).sum(-1).mean() + model.free_bias[i].pow(2).mean()
    )
    if cfg.rank_weight > 0:
        j = torch.randint(0, n_warm, (len(i),), generator=gen)
        vj, _, cj = model.items(j, keep)
        diff = dot + c - (pu * vj).sum(-1) - cj
        loss = loss + cfg.rank_weight * nn.functional.softplus(-diff).mean()
        reg = reg + cfg.reg_free * model.free_rank_bias[i].pow(2).mean()
    if model.text is not None:
        reg = reg + cfg.reg_text * (model.proj**2).sum()
    return loss + reg


@torch.no_grad()
def _export_factors(model: HybridMF, n_warm: int, mu: float) -> HybridFactors:
    n_items = model.free.shape[0]
    keep = torch.zeros(n_items)
    keep[:n_warm] = 1.0  # cold items were never trained: text parts only
    v, b, c = model.items(torch.arange(n_items), keep)
    return HybridFactors(
        user_factors=model.user.detach().numpy().copy(),
        user_bias=model.user_bias.detach().numpy().copy(),
        item_factors=v.numpy().copy(),
        item_bias=b.numpy().copy(),
        item_rank_bias=c.numpy().copy(),
        text_projection=model.proj.detach().numpy().copy(),
        global_mean=mu,
    )


class FactorScorer:
    """Scores from trained factors (implements evaluate.Scorer)."""

    def __init__(self, name: str, f: HybridFactors, rating_range: tuple[float, float] = (1, 5)):
        self.name = name
        self.f = f
        self.lo, self.hi = rating_range

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        f = self.f
        dot = np.einsum("nd,nd->n", f.user_factors[users], f.item_factors[items])
        pred = f.global_mean + f.user_bias[users] + f.item_bias[items] + dot
        return np.clip(pred, self.lo, self.hi)

    def rank_scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        f = self.f
        return f.user_factors[users] @ f.item_factors[items].T + f.item_rank_bias[items]


class RatingOrderScorer(FactorScorer):
    """Ranks by predicted rating: what a rating-only model does."""

    def rank_scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        f = self.f
        return (
            f.user_factors[users] @ f.item_factors[items].T
            + f.item_bias[items]
            + f.user_bias[users][:, None]
        )
