"""The on-disk contract of one model version, shared by the exporter and the server.

A version lives at `<repo>/<model>/<version>/` and holds the files named below plus
`manifest.json`. Everything here is numpy/json only: the server imports it without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1

ENCODER_ONNX = "encoder.onnx"  # fp32: input_ids, attention_mask, token_type_ids -> embedding
ENCODER_INT8_ONNX = "encoder.int8.onnx"  # optional dynamically quantised variant
TOKENIZER = "tokenizer.json"  # Hugging Face `tokenizers` format

USER_FACTORS = "user_factors.npy"  # float32 (n_users, d)
ITEM_FACTORS = "item_factors.npy"  # float32 (n_items, d); cold items: text projection only
USER_BIAS = "user_bias.npy"  # float32 (n_users,)
ITEM_BIAS = "item_bias.npy"  # float32 (n_items,)   rating bias b_i
ITEM_RANK_BIAS = "item_rank_bias.npy"  # float32 (n_items,)   ranking bias c_i
TEXT_TO_USER = "text_to_user.npy"  # float32 (d, d): folds a text vector into user space
USER_IDS = "user_ids.npy"  # unicode (n_users,): row -> external id
ITEM_IDS = "item_ids.npy"  # unicode (n_items,): row -> external id
RATED_INDPTR = "rated_indptr.npy"  # int64 (n_users + 1,): CSR of each user's rated items
RATED_INDICES = "rated_indices.npy"  # int32 (nnz,): item rows, sorted within each user
# Optional rating head (versions trained since issue 9): its own space of another dimension,
# so `score` (ranking) and `predicted_rating` each come from the head fitted for them.
RATING_USER_FACTORS = "rating_user_factors.npy"  # float32 (n_users, r)
RATING_ITEM_FACTORS = "rating_item_factors.npy"  # float32 (n_items, r)
# Optional: each item's text part T e_i in the ranking space (= the encoder's output for its
# text), so a score splits exactly into a text part dot(u, T e_i) and a collaborative part
# dot(u, item_factors[i] - T e_i), for explanations.
ITEM_TEXT_FACTORS = "item_text_factors.npy"  # float32 (n_items, d)
# Optional, both or neither: what attributing a user's score to their rated items needs
# (server/explain.py). The ranking head's user vector solves the ridge system
# (rank_gramian + Y_u^T diag(c_u - 1) Y_u) x_u = Y_u^T c_u over the user's rated items Y_u.
RANK_GRAMIAN = "rank_gramian.npy"  # float64 (d, d): Y^T Y + reg I over the exported Y
RATED_CONFIDENCE = "rated_confidence.npy"  # float32 (nnz,): c_uj, aligned with rated_indices
ITEM_TEXTS = "item_texts.jsonl"  # {"item_id", "text"} per line, row order
ENCODER_OPTIMIZED_ONNX = "encoder.opt.onnx"  # optional: ORT transformer-optimised fp32 graph
PARITY_TEXTS = "parity_texts.json"  # {"max_seq_len": int, "batches": [[text, ...], ...]}
PARITY_EXPECTED = "parity_expected.npy"  # float32 (n_texts, dim): PyTorch outputs, batch order

ARRAY_FILES = (
    USER_FACTORS,
    ITEM_FACTORS,
    USER_BIAS,
    ITEM_BIAS,
    ITEM_RANK_BIAS,
    TEXT_TO_USER,
    USER_IDS,
    ITEM_IDS,
    RATED_INDPTR,
    RATED_INDICES,
)
RATING_HEAD_FILES = (RATING_USER_FACTORS, RATING_ITEM_FACTORS)  # both or neither
EXPLAIN_FILES = (RANK_GRAMIAN, RATED_CONFIDENCE)  # both or neither
OPTIONAL_FILES = (*RATING_HEAD_FILES, ITEM_TEXT_FACTORS, *EXPLAIN_FILES)

# How scores are formed; recorded in the manifest under "scoring" so readers need no guessing.
RANKING_SCORE = "dot(user_factors[u], item_factors[i]) + item_rank_bias[i]"
RATING_SCORE = "global_mean + user_bias[u] + item_bias[i] + dot(user_factors[u], item_factors[i])"
RATING_HEAD_SCORE = (
    "global_mean + user_bias[u] + item_bias[i]"
    " + dot(rating_user_factors[u], rating_item_factors[i])"
)
TEXT_QUERY_SCORE = "dot(text_to_user @ encoder(text), item_factors[i]) + item_rank_bias[i]"


# Training hyper-parameters that serving must match to fold new users in (server/fold_in.py):
# the ranking head's confidence of a rating r is RANK_ALPHA * (r / top) ** RANK_POWER and its
# ridge penalty RANK_REG (train/ials.IALSConfig); the rating head's penalties on p_u and b_u
# (train/rating_head.RatingConfig). The training configs take their defaults from here.
RANK_ALPHA = 5.0
RANK_POWER = 2.0
RANK_REG = 30.0
RATING_REG = 20.0
RATING_REG_BIAS = 5.0


@dataclass(frozen=True)
class FactorArrays:
    """The numeric state of a trained hybrid model, in row order of `user_ids`/`item_ids`."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_bias: np.ndarray
    item_bias: np.ndarray
    item_rank_bias: np.ndarray
    text_to_user: np.ndarray
    rated_indptr: np.ndarray
    rated_indices: np.ndarray
    global_mean: float
    rating_user_factors: np.ndarray | None = None  # None: ratings use the ranking factors
    rating_item_factors: np.ndarray | None = None
    item_text_factors: np.ndarray | None = None  # None: no text/collaborative split
    rank_gramian: np.ndarray | None = None  # None: no per-rated-item attribution
    rated_confidence: np.ndarray | None = None

    @property
    def has_attribution(self) -> bool:
        """Whether scores can be attributed to rated items (RANK_GRAMIAN, RATED_CONFIDENCE)."""
        return self.rank_gramian is not None and self.rated_confidence is not None

    @property
    def dim(self) -> int:
        return int(self.item_factors.shape[1])

    @property
    def has_rating_head(self) -> bool:
        return self.rating_user_factors is not None and self.rating_item_factors is not None

    @property
    def rating_score(self) -> str:
        """The formula of predicted ratings for these arrays (for the manifest)."""
        return RATING_HEAD_SCORE if self.has_rating_head else RATING_SCORE

    def arrays(self) -> dict[str, np.ndarray]:
        """File name -> array, exactly as saved."""
        return {
            USER_IDS: np.asarray(self.user_ids, dtype=str),
            ITEM_IDS: np.asarray(self.item_ids, dtype=str),
            USER_FACTORS: np.ascontiguousarray(self.user_factors, dtype=np.float32),
            ITEM_FACTORS: np.ascontiguousarray(self.item_factors, dtype=np.float32),
            USER_BIAS: np.ascontiguousarray(self.user_bias, dtype=np.float32),
            ITEM_BIAS: np.ascontiguousarray(self.item_bias, dtype=np.float32),
            ITEM_RANK_BIAS: np.ascontiguousarray(self.item_rank_bias, dtype=np.float32),
            TEXT_TO_USER: np.ascontiguousarray(self.text_to_user, dtype=np.float32),
            RATED_INDPTR: np.ascontiguousarray(self.rated_indptr, dtype=np.int64),
            RATED_INDICES: np.ascontiguousarray(self.rated_indices, dtype=np.int32),
            **self._rating_head_arrays(),
        }

    def _rating_head_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        if self.rating_user_factors is not None and self.rating_item_factors is not None:
            out[RATING_USER_FACTORS] = np.ascontiguousarray(self.rating_user_factors, np.float32)
            out[RATING_ITEM_FACTORS] = np.ascontiguousarray(self.rating_item_factors, np.float32)
        if self.item_text_factors is not None:
            out[ITEM_TEXT_FACTORS] = np.ascontiguousarray(self.item_text_factors, np.float32)
        if self.rank_gramian is not None and self.rated_confidence is not None:
            out[RANK_GRAMIAN] = np.ascontiguousarray(self.rank_gramian, np.float64)
            out[RATED_CONFIDENCE] = np.ascontiguousarray(self.rated_confidence, np.float32)
        return out

    def shape_mismatch(self, n_users: int, n_items: int, dim: int) -> str | None:
        """The first array whose shape disagrees with the given sizes, described; else None."""
        expected = {
            "user_ids": (self.user_ids.shape, (n_users,)),
            "item_ids": (self.item_ids.shape, (n_items,)),
            "user_factors": (self.user_factors.shape, (n_users, dim)),
            "item_factors": (self.item_factors.shape, (n_items, dim)),
            "user_bias": (self.user_bias.shape, (n_users,)),
            "item_bias": (self.item_bias.shape, (n_items,)),
            "item_rank_bias": (self.item_rank_bias.shape, (n_items,)),
            "text_to_user": (self.text_to_user.shape, (dim, dim)),
            "rated_indptr": (self.rated_indptr.shape, (n_users + 1,)),
        }
        for name, (actual, want) in expected.items():
            if tuple(actual) != want:
                return f"{name} has shape {tuple(actual)}, expected {want}"
        text = self.item_text_factors
        if text is not None and tuple(text.shape) != (n_items, dim):
            return f"item_text_factors has shape {tuple(text.shape)}, expected {(n_items, dim)}"
        return self._attribution_mismatch(dim) or self._rating_head_mismatch(n_users, n_items)

    def _attribution_mismatch(self, dim: int) -> str | None:
        gramian, confidence = self.rank_gramian, self.rated_confidence
        if gramian is None and confidence is None:
            return None
        if gramian is None or confidence is None:
            return "attribution needs both rank_gramian and rated_confidence"
        if tuple(gramian.shape) != (dim, dim):
            return f"rank_gramian has shape {tuple(gramian.shape)}, expected {(dim, dim)}"
        if tuple(confidence.shape) != tuple(self.rated_indices.shape):
            want = tuple(self.rated_indices.shape)
            return f"rated_confidence has shape {tuple(confidence.shape)}, expected {want}"
        return None

    def _rating_head_mismatch(self, n_users: int, n_items: int) -> str | None:
        users, items = self.rating_user_factors, self.rating_item_factors
        if users is None and items is None:
            return None
        if users is None or items is None:
            return "the rating head needs both rating_user_factors and rating_item_factors"
        if users.ndim != 2 or users.shape[0] != n_users:
            return f"rating_user_factors has shape {users.shape}, expected ({n_users}, r)"
        if items.shape != (n_items, users.shape[1]):
            want = (n_items, users.shape[1])
            return f"rating_item_factors has shape {items.shape}, expected {want}"
        return None

    def save(self, directory: Path) -> None:
        for name, array in self.arrays().items():
            np.save(directory / name, array, allow_pickle=False)

    @staticmethod
    def load(directory: Path, global_mean: float, mmap: bool = True) -> FactorArrays:
        """Memory-map every array (read-only) so a large catalogue costs no load time."""
        mode: Any = "r" if mmap else None

        def get(name: str) -> np.ndarray:
            return np.load(directory / name, mmap_mode=mode, allow_pickle=False)

        def optional(name: str) -> np.ndarray | None:
            return get(name) if (directory / name).is_file() else None

        return FactorArrays(
            user_ids=get(USER_IDS),
            item_ids=get(ITEM_IDS),
            user_factors=get(USER_FACTORS),
            item_factors=get(ITEM_FACTORS),
            user_bias=get(USER_BIAS),
            item_bias=get(ITEM_BIAS),
            item_rank_bias=get(ITEM_RANK_BIAS),
            text_to_user=get(TEXT_TO_USER),
            rated_indptr=get(RATED_INDPTR),
            rated_indices=get(RATED_INDICES),
            global_mean=global_mean,
            rating_user_factors=optional(RATING_USER_FACTORS),
            rating_item_factors=optional(RATING_ITEM_FACTORS),
            item_text_factors=optional(ITEM_TEXT_FACTORS),
            rank_gramian=optional(RANK_GRAMIAN),
            rated_confidence=optional(RATED_CONFIDENCE),
        )


def save_item_texts(path: Path, item_ids: list[str], texts: list[str]) -> None:
    """Write ITEM_TEXTS: one {"item_id", "text"} object per line, in catalogue row order."""
    with path.open("w", encoding="utf-8") as fh:
        for item_id, text in zip(item_ids, texts, strict=True):
            fh.write(json.dumps({"item_id": item_id, "text": text}, ensure_ascii=False) + "\n")


def load_item_texts(path: Path) -> list[str]:
    """Texts in row order (as saved with `save_item_texts`)."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]
