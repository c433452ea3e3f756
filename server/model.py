"""One loaded model version: verified files, memory-mapped arrays, id maps, ranker and encoder.

`load_model` resolves `<repo>/<model>/<version>`, reads and verifies the manifest (sizes and
SHA-256 of every file), memory-maps the factor arrays, indexes the ids (`id_index`) and creates
the ranking and encoder runtimes. `Model` then offers the batch computations the batchers run
(`rank`, `similar`, `encode`) and the small per-request ones (`predicted_ratings`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertrec.errors import ArtifactError
from bertrec.repository.artifacts import (
    ITEM_FACTORS,
    ITEM_IDS,
    ITEM_RANK_BIAS,
    TOKENIZER,
    USER_IDS,
    FactorArrays,
)
from bertrec.repository.manifest import Manifest
from bertrec.repository.opened import open_version
from bertrec.server.config import ServerConfig
from bertrec.server.encoder_runtime import EncoderRuntime
from bertrec.server.errors import NotFound
from bertrec.server.fold_in import RatingUser
from bertrec.server.id_index import IdIndex, IdList
from bertrec.server.providers import choose_providers
from bertrec.server.ranking import PREPACK_MAX_BYTES, Ranker
from bertrec.server.ranking_compact import CompactRanker
from bertrec.server.shared_layout import LayoutCache, layout_dir_from_env
from bertrec.server.wire import WIRE_FROM, RecommendWire
from bertrec.text import TextTokenizer

log = logging.getLogger(__name__)

WARMUP_TEXTS = (
    "a",
    "a short warm-up text",
    "a longer warm-up text that makes the encoder see a few more tokens in one batch " * 8,
)


@dataclass(frozen=True)
class RankQuery:
    """One ranking query: a vector in user space and the candidate restrictions."""

    vector: np.ndarray  # float32 (d,)
    k: int
    exclude: np.ndarray | None = None  # item rows never returned
    allow: np.ndarray | None = None  # if set, only these item rows are ranked
    user_row: int | None = None  # whose predicted ratings `rank` returns (None: a text query)
    rating: RatingUser | None = None  # a folded user's rating head (instead of `user_row`'s)
    wire: bool = False  # `rank` may also encode the query's RecommendResponse (`server.wire`)


@dataclass(frozen=True)
class RankResult:
    """Top rows and their scores for one query, best first (may hold fewer than k).

    `rank` also fills the predicted ratings, computed for the whole batch at once, so the
    request thread only turns arrays into the response (`similar` leaves them None).
    """

    rows: np.ndarray  # int64 (n,)
    scores: np.ndarray  # float32 (n,)
    ratings: np.ndarray | None = None  # float32 (n,): predicted ratings of `rows`
    wire: bytes | None = None  # the serialized RecommendResponse, where `rank` encoded it


class Model:
    """A loaded, verified model version and the computations over it.

    With `layout_dir` (a worker of `bertrec serve --workers N`), what the version derives
    from its arrays (the Ranker's layout, the id indexes) is one mapped file per run shared
    by every worker (`shared_layout`); without, it is built on the heap.
    """

    def __init__(
        self,
        version_dir: Path,
        manifest: Manifest,
        arrays: FactorArrays,
        encoder: EncoderRuntime,
        encoder_file: str,
        ranker_threads: int = 0,
        ranker_precision: str = "fp32",
        layout_dir: Path | None = None,
    ) -> None:
        self.version_dir = version_dir
        self.manifest = manifest
        self.name = manifest.model_name
        self.version = manifest.version
        self.arrays = arrays = _plain_views(arrays)
        self.encoder = encoder
        self.encoder_file = encoder_file

        def shared(*files: str) -> LayoutCache | None:
            if layout_dir is None:
                return None
            return LayoutCache(layout_dir, tuple(manifest.files[f].sha256 for f in files))

        self._users = IdIndex(arrays.user_ids, "user", version_dir, shared(USER_IDS))
        self._items = IdIndex(arrays.item_ids, "item", version_dir, shared(ITEM_IDS))
        self.item_ids: IdList = self._items.list
        self._wire = RecommendWire(arrays.item_ids, self.name, self.version)
        # The ranker's layout is the one copy of the item factors besides the mmap (on the heap,
        # or shared by the workers); cosines scan that same matrix with a per-item 1 / |item|
        # instead of a normalised copy (`Ranker.scaled`).
        exact = Ranker(
            arrays.item_factors, arrays.item_rank_bias, threads=ranker_threads,
            layout=shared(ITEM_FACTORS, ITEM_RANK_BIAS),
            # int8 ranks with its own sessions: `exact` only lends its layout to the cosines.
            prepack_max_bytes=0 if ranker_precision == "int8" else PREPACK_MAX_BYTES,
        )  # fmt: skip
        self._inverse_norms = _inverse_norms(arrays.item_factors)
        self.similarity = exact.scaled(self._inverse_norms)
        # int8: Recommend and text queries scan an int8 copy and re-score in fp32 whatever a
        # proven bound leaves in reach, with the fp32 Ranker's answers to the bit
        # (server/ranking_compact.py); SimilarItems keeps the fp32 scan (no cosine twin yet).
        self.ranker: Ranker | CompactRanker = exact
        if ranker_precision == "int8":
            self.ranker = CompactRanker(
                arrays.item_factors, arrays.item_rank_bias, threads=ranker_threads,
                max_batch_rows=exact.max_batch_rows,
                exclude_fetch_limit=exact.exclude_fetch_limit,
                single_row_batches=exact.single_row_batches,
            )  # fmt: skip
            # Not `layout=`: codes read in place from the run's file save ~70 MB per worker at
            # 1M x 64 but scan batches of 32-64 5-9% slower (bench/results/worker_memory.json).

    @property
    def dim(self) -> int:
        return self.arrays.dim

    @property
    def n_users(self) -> int:
        return len(self._users)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user_row(self, user_id: str) -> int:
        """Row of an external user id. Raises NotFound."""
        row = self._users.row(user_id)
        if row is None:
            raise NotFound(f"unknown user_id {user_id!r}")
        return row

    def training_row(self, user_id: str) -> int | None:
        """Row of a user of the training data, or None."""
        return self._users.row(user_id)

    def training_rows(self, user_ids: list[str]) -> np.ndarray:
        """Rows (int64) of many users of the training data at once, -1 for the others."""
        return self._users.rows(user_ids)

    def item_row(self, item_id: str) -> int | None:
        """Row of an item of the catalogue, or None."""
        return self._items.row(item_id)

    def item_rows(self, item_ids: list[str]) -> np.ndarray:
        """Rows (int64) of external item ids, same order. Raises NotFound naming the first."""
        rows = self._items.rows(item_ids)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            raise NotFound(f"unknown item_id {item_ids[int(missing[0])]!r}")
        return rows

    def item_ids_of(self, rows: np.ndarray) -> list[str]:
        """External ids of item rows (int, in range), in one vectorised gather."""
        return self.item_ids.of(rows)

    def rated_rows(self, user_row: int) -> np.ndarray:
        a = self.arrays
        return np.asarray(a.rated_indices[a.rated_indptr[user_row] : a.rated_indptr[user_row + 1]])

    def user_vector(self, user_row: int) -> np.ndarray:
        return np.asarray(self.arrays.user_factors[user_row], dtype=np.float32)

    def fold_text(self, text_vector: np.ndarray) -> np.ndarray:
        """Text vector (item space) -> user space: text_to_user @ v."""
        return np.asarray(self.arrays.text_to_user @ text_vector, dtype=np.float32)

    def unit_item(self, row: int) -> np.ndarray:
        """The item's factor vector scaled to unit length (a zero vector stays zero)."""
        return np.asarray(self.arrays.item_factors[row] * self._inverse_norms[row], np.float32)

    def predicted_ratings(
        self,
        user_vector: np.ndarray,
        rows: np.ndarray,
        user_row: int | None,
        rating: RatingUser | None = None,
    ) -> np.ndarray:
        """Predicted ratings of item `rows` for a user (`user_row`) or a text query (None).

        A version with a rating head (artifacts.RATING_HEAD_SCORE) predicts from its own
        factors, clipped to the manifest's rating range: global_mean + user_bias[u] +
        item_bias[i] + dot(rating_user_factors[u], rating_item_factors[i]); a text query has
        no user there, so it gets global_mean + item_bias[i]. `user_vector` (ranking space)
        is then unused. Older versions: global_mean + user_bias[u] + item_bias[i] +
        dot(user_vector, item_factors[i]), with user_bias 0 without a user. A folded user
        (`rating`) brings their own bias and rating-head vector.
        """
        a = self.arrays
        if rating is not None:
            user_bias = rating.bias
        else:
            user_bias = float(a.user_bias[user_row]) if user_row is not None else 0.0
        base = a.global_mean + user_bias + a.item_bias[rows]
        if a.rating_user_factors is None or a.rating_item_factors is None:
            return (base + a.item_factors[rows] @ user_vector).astype(np.float32)
        if rating is not None and rating.vector is not None:
            base = base + a.rating_item_factors[rows] @ rating.vector
        elif user_row is not None:
            base = base + a.rating_item_factors[rows] @ a.rating_user_factors[user_row]
        low, high = self.manifest.scoring.rating_range
        return np.clip(base, low, high).astype(np.float32)

    def rank(self, queries: list[RankQuery]) -> list[RankResult]:
        """One matrix product over the catalogue for all queries, then top-k per row, then
        every query's predicted ratings in one vectorised pass."""
        rows, scores, counts = _topk(self.ranker, queries)
        ratings = self._batch_ratings(queries, np.maximum(rows, 0))  # padding rated as row 0
        wires = self._responses(queries, rows, scores, ratings, counts)
        return [
            RankResult(rows[i, :n], scores[i, :n], ratings[i, :n], wires.get(i))
            for i, n in enumerate(counts)
        ]

    def _responses(
        self,
        queries: list[RankQuery],
        rows: np.ndarray,
        scores: np.ndarray,
        ratings: np.ndarray,
        counts: list[int],
    ) -> dict[int, bytes]:
        """The serialized RecommendResponse of each query that asked for one, by position in
        the batch; none for fewer than WIRE_FROM of them (a vectorised pass's fixed cost is
        more than protobuf's per query there) or a batch `RecommendWire` leaves to protobuf."""
        wanted = [i for i, q in enumerate(queries) if q.wire]
        if len(wanted) < WIRE_FROM:
            return {}
        encoded = self._wire.responses(
            rows[wanted], scores[wanted], ratings[wanted], [counts[i] for i in wanted]
        )
        return {} if encoded is None else dict(zip(wanted, encoded, strict=True))

    def _batch_ratings(self, queries: list[RankQuery], rows: np.ndarray) -> np.ndarray:
        """`predicted_ratings` of item `rows` (queries, width) for every query at once."""
        users = np.array([-1 if q.user_row is None else q.user_row for q in queries], np.int64)
        known = users >= 0
        a = self.arrays
        user_bias = np.where(known, a.user_bias[np.maximum(users, 0)], 0.0)
        folded = [i for i, q in enumerate(queries) if q.rating is not None]
        for i in folded:
            user_bias[i] = queries[i].rating.bias  # type: ignore[union-attr]
        base = a.global_mean + user_bias[:, None] + a.item_bias[rows]
        if a.rating_user_factors is None or a.rating_item_factors is None:
            vectors = np.stack([q.vector for q in queries])
            return (base + np.einsum("qkd,qd->qk", a.item_factors[rows], vectors)).astype(
                np.float32
            )
        user_vectors = a.rating_user_factors[np.maximum(users, 0)] * known[:, None]
        for i in folded:
            vector = queries[i].rating.vector  # type: ignore[union-attr]
            user_vectors[i] = 0.0 if vector is None else vector
        base = base + np.einsum("qkd,qd->qk", a.rating_item_factors[rows], user_vectors)
        low, high = self.manifest.scoring.rating_range
        return np.clip(base, low, high).astype(np.float32)

    def similar(self, queries: list[RankQuery]) -> list[RankResult]:
        """Like `rank`, over unit-length item vectors (so scores are cosines)."""
        rows, scores, counts = _topk(self.similarity, queries)
        return [RankResult(rows[i, :n], scores[i, :n]) for i, n in enumerate(counts)]

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Encoder vectors (item space), one float32 (d,) array per text."""
        return list(self.encoder.encode(texts))

    def warm_up(self, iterations: int, ranker_batch: int, encoder_batch: int) -> None:
        """Run every computation a few times so first calls pay no one-off costs."""
        rng = np.random.default_rng(0)
        texts = [WARMUP_TEXTS[i % len(WARMUP_TEXTS)] for i in range(encoder_batch)]
        for _ in range(iterations):
            for n in {1, encoder_batch}:
                self.encode(texts[:n])
            for n in {1, ranker_batch}:
                vectors = rng.standard_normal((n, self.dim)).astype(np.float32)
                queries = [RankQuery(v, min(10, self.n_items), wire=True) for v in vectors]
                self.rank(queries)
                self.similar(queries)


def _plain_views(arrays: FactorArrays) -> FactorArrays:
    """The same memory-mapped data as plain ndarrays: indexing a `np.memmap` runs Python code
    (`__getitem__`, `__array_finalize__`) on every access, a few microseconds per request."""
    views = {
        f.name: np.asarray(value)
        for f in dataclasses.fields(arrays)
        if isinstance(value := getattr(arrays, f.name), np.ndarray)
    }
    return dataclasses.replace(arrays, **views)


def _inverse_norms(factors: np.ndarray) -> np.ndarray:
    """float32 1 / |row| of every row; a zero row has no direction, and its 1e12 keeps its
    cosine with anything 0. einsum sums the squares without the (n, d) temporary that
    `np.linalg.norm` allocates, so loading never holds a second matrix even briefly."""
    squares = np.einsum("ij,ij->i", factors, factors)
    return (1.0 / np.maximum(np.sqrt(squares), 1e-12)).astype(np.float32)


def _topk(
    ranker: Ranker | CompactRanker, queries: list[RankQuery]
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The batch's top rows and scores (B, max k), and how many of each row's leading entries
    are its answer: at most its own k, without padding or non-finite scores. Those are
    compacted to the front of a row first, in the rare batch that has any after a kept entry
    (an item whose score overflowed), so every answer is a prefix."""
    vectors = np.stack([q.vector for q in queries]).astype(np.float32, copy=False)
    k = max(q.k for q in queries)
    exclude = None if all(q.exclude is None for q in queries) else [q.exclude for q in queries]
    allow = None if all(q.allow is None for q in queries) else [q.allow for q in queries]
    rows, scores = ranker.topk(vectors, k, exclude=exclude, allow=allow)
    keep = (rows >= 0) & np.isfinite(scores)
    if keep.all():  # the usual batch: every query has k answers
        return rows, scores, [q.k for q in queries]
    kept = np.count_nonzero(keep, axis=1)
    if not keep[np.arange(k) < kept[:, None]].all():  # a dropped entry before a kept one
        order = np.argsort(~keep, axis=1, kind="stable")
        rows = np.take_along_axis(rows, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
    return rows, scores, [min(q.k, n) for q, n in zip(queries, kept.tolist(), strict=True)]


def load_model(config: ServerConfig) -> Model:
    """Resolve, verify and load the configured model version.

    Raises:
        ArtifactError: missing version, bad manifest, hash mismatch or inconsistent arrays.
        BertrecError: no usable encoder variant or execution provider.
    """
    start = time.monotonic()
    opened = open_version(config.model_repo, config.model, config.version)
    version_dir, manifest, arrays = opened.folder, opened.manifest, opened.arrays
    encoder_file = _encoder_file(manifest, config.encoder_variant, version_dir)
    tokenizer = TextTokenizer.from_file(version_dir / TOKENIZER, manifest.dims.max_seq_len)
    providers = choose_providers(list(config.providers))
    encoder = EncoderRuntime(
        version_dir / encoder_file,
        tokenizer,
        providers=providers,
        intra_op_threads=config.intra_op_threads,
        inter_op_threads=config.inter_op_threads,
        max_batch=config.encoder_max_batch_size,
    )
    model = Model(
        version_dir, manifest, arrays, encoder, encoder_file, config.ranker_threads,
        config.ranker_precision, layout_dir_from_env(),
    )  # fmt: skip
    log.info(
        "loaded %s version %d from %s: %d users, %d items, dim %d, encoder %s on %s (%.2f s)",
        model.name, model.version, version_dir, model.n_users, model.n_items, model.dim,
        encoder_file, encoder.provider, time.monotonic() - start,
    )  # fmt: skip
    return model


# "auto" serves the INT8 graph only when export measured it this close to PyTorch.
AUTO_INT8_MIN_COSINE = 0.99


def _encoder_file(manifest: Manifest, variant: str, version_dir: Path) -> str:
    names = [v.name for v in manifest.encoder.variants]
    if variant == "auto":
        int8 = manifest.encoder.variant("int8")
        if int8 is not None and int8.parity.cos_mean >= AUTO_INT8_MIN_COSINE:
            return int8.file
        chosen = manifest.encoder.variant("fp32")
        return chosen.file if chosen else manifest.encoder.file
    found = manifest.encoder.variant(variant)
    if found is None:
        listed = ", ".join(names) or "none"
        raise ArtifactError(f"{version_dir}: no encoder variant {variant!r} (has {listed})")
    return found.file
