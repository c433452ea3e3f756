"""Exact top-k that scans an int8 copy of the catalogue: a quarter of the fp32 bytes.

`CompactRanker` returns what `Ranker` returns (rows, order, float32 scores, ties to the lower
row, padding) while its hot scan reads one byte per item coordinate instead of four.

Why it stays exact: every catalogue row is the augmented vector y~ = (item, bias), every query
q~ = (query, 1), and score = q~ . y~ as `Ranker` computes it (one ONNX Runtime MatMul). The
scan finds each query's K' best rows by an approximate score from int8 codes (y~ ~= s * c, one
scale s for the catalogue). For every other row the true score is at most A' + E, where A' is
the K'-th best approximate score and E a proven error bound (`error_bound`,
`float_query_bound`: the item and query rounding by Hoelder and Cauchy-Schwarz with the
catalogue's largest residual, coordinate and norm, plus the float32 rounding of both scores).
The K' rows (and the outliers, below) are re-scored exactly, by the same MatMul as `Ranker`,
from the float32 rows (a memory-mapped array stays mapped: only the candidates' pages are
read). If the k-th best exact score among them is above A' + E, no row outside can reach the
top k, ties included, and the answer is final; otherwise that query is scanned again with four
times K', and past `max_candidate_share` of the catalogue it is scored in full.

Two scan kernels, each the faster one where it is used (measured on this 2-core AVX-512 VNNI
EPYC, `bench.ranking_compact`): batches of up to `small_batch_rows` queries use MatMulNBits
(8-bit weights, int8 compute, float32 queries coded per block inside the kernel), whose
one-row kernel streams the codes ~1.7x faster than MatMulInteger's; larger batches use
MatMulInteger on uint8 query codes, exact in int32, several times faster than MatMulNBits at
batch 32. Memory is the price: ONNX Runtime keeps each code initializer besides its packed
copy, so at 1M x 64 the two sessions grow the heap by ~320 MB (MatMulInteger alone, with
`small_batch_rows=0`: ~175 MB), against ~250 MB for the float32 matrix `Ranker` holds.
Measured again on a loaded server (`bench.worker_memory`): the CompactRanker adds ~283 MB
per process at 1M x 64. With `layout` the MatMulInteger session reads the codes in place from
a file every worker maps, unpacked: ~70 MB less per worker at 1M, but batches of 32-64 scan
5-9% slower, so the server does not use it (yet).

One scale for the catalogue (not one per row) keeps the int32 code product monotone in the
score, so the top-k runs on MatMulInteger's output directly, with no per-item multiply pass
over (batch, n_items) floats. Rows a shared scale would fit badly (a few huge items, a huge
bias) are *outliers*: stored as zero codes, excluded from the bound's maxima, and re-scored
exactly for every query.

Both code matrices are graph initializers, so ONNX Runtime packs them once at start-up
(packed operands ran the batch-32 scan ~2x faster than feeding them per call).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bertrec.server.providers import onnxruntime
from bertrec.server.ranking import (
    GROUP_WIDTH,
    OPSET,
    PAD_ROW,
    PAD_SCORE,
    checked_queries,
    per_query_rows,
)
from bertrec.server.scan_sessions import scan_session
from bertrec.server.shared_layout import LayoutCache

QUERY_ZERO_POINT = 128  # the query codes are uint8 around 128 (u8 x s8 is MLAS's fast path)
CODE_MAX = 127  # int8 codes stay in -127..127
UNIT_ROUNDOFF = 2.0**-24  # float32
QUANTISE_CHUNK_ROWS = 1 << 16  # rows per float64 block while building the codes
MIN_OUTLIERS = 16  # outliers allowed however small the catalogue


@dataclass
class CompactStats:
    """Running totals, for benchmarks: how much exact work the bound left to do."""

    queries: int = 0
    rescored: int = 0  # candidate rows scored exactly, summed over queries
    retries: int = 0  # queries scanned again with a wider K'
    full_scans: int = 0  # queries scored in full from the float32 rows


@dataclass(frozen=True)
class Codes:
    """The constants of the int8 catalogue's error bound (module docstring)."""

    width: int  # columns of the codes: n_items padded to whole groups
    scale: float  # s: y~ = s * code + residual for every row that is not an outlier
    outliers: np.ndarray  # int64 rows always re-scored exactly
    residual_max: float  # max |y~_ij - s * code_ij| over non-outlier rows
    residual_norm: float  # max |y~_i - s * code_i|_2
    coordinate_max: float  # max |y~_ij|
    norm_max: float  # max |y~_i|_2


class CompactRanker:
    """Exact top-k like `Ranker.topk` from an int8 scan plus exact re-scoring.

    Args:
        item_factors: (n_items, d) float32, kept by reference (a memory map stays mapped);
            only candidate rows are read from it per query.
        item_bias: (n_items,).
        threads: CPU threads for one `topk` call (0: one per CPU).
        max_batch_rows: queries per scan (and `Ranker`'s, see below).
        outlier_fraction: share of rows the shared scale may leave out as outliers (at least
            MIN_OUTLIERS rows).
        max_candidate_share: beyond this share of the catalogue as K', score in full.
        exclude_fetch_limit, single_row_batches: as for the `Ranker` this one stands in for
            (give it the same values, and the same `max_batch_rows`).
            They say which queries `Ranker` scores alone (a one-row product, which ONNX
            Runtime rounds differently from a multi-row one), so the exact scores here are
            computed the same way and equal `Ranker`'s to the bit.
        small_batch_rows: scans of up to this many queries use the float-query kernel
            (MatMulNBits), larger ones MatMulInteger; 0 builds no MatMulNBits session, which
            halves the memory held (module docstring) and slows batch 1.
        layout: where worker processes share the MatMulInteger codes as one mapped file
            (`shared_layout`), read in place by the scan session instead of packed into
            each process's heap; None keeps the packed private copy.
    Raises:
        ValueError: shapes that do not match, or bad settings.
    """

    def __init__(
        self,
        item_factors: np.ndarray,
        item_bias: np.ndarray,
        *,
        threads: int = 0,
        max_batch_rows: int = 64,
        outlier_fraction: float = 1e-4,
        max_candidate_share: float = 0.05,
        exclude_fetch_limit: int = 1024,
        single_row_batches: int = 3,
        small_batch_rows: int = 2,
        layout: LayoutCache | None = None,
    ) -> None:
        factors, bias = np.asarray(item_factors), np.asarray(item_bias, dtype=np.float32)
        if factors.ndim != 2 or factors.shape[0] == 0 or factors.shape[1] == 0:
            raise ValueError(f"item_factors must be (n_items, d) with n, d >= 1: {factors.shape}")
        if bias.shape != (factors.shape[0],):
            raise ValueError(f"item_bias has shape {bias.shape}, expected ({factors.shape[0]},)")
        if max_batch_rows < 1 or not 0 <= outlier_fraction < 1 or max_candidate_share <= 0:
            raise ValueError("need max_batch_rows >= 1, 0 <= outlier_fraction < 1, share > 0")
        self.item_factors, self.item_bias = factors, bias
        self.max_batch_rows = max_batch_rows
        self.max_candidate_share = max_candidate_share
        self.exclude_fetch_limit = exclude_fetch_limit
        self.single_row_batches = single_row_batches
        self.small_batch_rows = small_batch_rows
        self.threads = threads or os.cpu_count() or 1
        self.stats = CompactStats()
        codes, self.book = quantise(factors, bias, outlier_fraction)
        self._groups = self.book.width // GROUP_WIDTH
        # ONNX Runtime packs the codes into its own layout; no second copy is kept here. With
        # a shared layout it reads the run's mapped file instead (kept alive with the session).
        self._shared_codes: dict[str, Any] = {}
        if layout is not None:
            params = {"outlier_fraction": outlier_fraction, "group_width": GROUP_WIDTH}
            mapped = layout.array("int8-codes", codes.shape, np.int8, _copy_of(codes), **params)
            if not mapped.flags.writeable:  # a mapped file, not a heap fallback
                self._shared_codes["items"] = onnxruntime().OrtValue.ortvalue_from_numpy(mapped)
        graph = build_int8_topk_graph(codes)
        self._scan_session = scan_session(graph, self.threads, False, self._shared_codes)
        del graph
        self._small_session: Any = None  # the float-query kernel's own packed copy
        if small_batch_rows > 0:
            small = build_nbits_topk_graph(codes[:-1], self.book.scale, bias)
            self._small_session = _cpu_session(small, self.threads)
            del small
        del codes
        # A few hundred rows per query: one thread, in the caller's (no pool to wake).
        self._exact_session = _cpu_session(build_matmul_graph(), 1)

    @property
    def n_items(self) -> int:
        return int(self.item_factors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.item_factors.shape[1])

    def scan_bytes(self, batch_rows: int) -> int:
        """Bytes one scan of `batch_rows` queries reads, as ONNX Runtime packs the codes:
        MatMulNBits reads the codes padded to whole blocks, a float32 scale per block and
        the bias; MatMulInteger the codes with K padded to a multiple of 4 and an int32
        column sum per item (MLAS's packed layout)."""
        d = self.dim
        if batch_rows <= self.small_batch_rows:
            block = _nbits_block(d)
            blocks = -(-d // block)
            return self.book.width * (blocks * block + 4 * blocks + 4)
        return self.book.width * (-(-(d + 1) // 4) * 4 + 4)

    def topk(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[np.ndarray | None] | None = None,
        allow: Sequence[np.ndarray | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best items per query, best first, ties to the lower row: `Ranker.topk`.

        Args:
            queries: float32 (B, d).
            k: items per query, >= 1 (may exceed the catalogue).
            exclude: per query, item rows never to return, or None.
            allow: per query, None (the whole catalogue) or the only rows it may return.
        Returns:
            rows int64 (B, k) and scores float32 (B, k), the tail padded with PAD_ROW and
            PAD_SCORE where fewer than k items are eligible.
        Raises:
            ValueError: bad shapes, non-finite queries, k < 1, or item rows out of range.
        """
        q = self._queries(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        excluded = self._per_query(exclude, len(q), "exclude")
        allowed = self._per_query(allow, len(q), "allow")
        rows = np.full((len(q), k), PAD_ROW, dtype=np.int64)
        scores = np.full((len(q), k), PAD_SCORE, dtype=np.float32)
        scan = [b for b in range(len(q)) if allowed[b] is None]
        alone = self._ranked_alone(scan, excluded)
        self.stats.queries += len(q)
        for start in range(0, len(scan), self.max_batch_rows):
            batch = scan[start : start + self.max_batch_rows]
            # The float-query scan's bound is looser: more candidates spare it a second scan.
            spare = 3 * k + 256 if len(batch) <= self.small_batch_rows else k + 64
            wide = k + spare + max(_count(excluded[b]) for b in batch)
            self._rank_scanned(q, batch, k, wide, excluded, alone, (rows, scores))
        for b in range(len(q)):
            only = allowed[b]
            if only is not None:
                top_rows, top_scores = self._ranked_subset(q[b], only, excluded[b], k)
                rows[b, : len(top_rows)], scores[b, : len(top_rows)] = top_rows, top_scores
        return rows, scores

    def _ranked_alone(self, scan: list[int], excluded: list[np.ndarray | None]) -> list[bool]:
        """Per query, whether `Ranker.topk` scores it in a one-row product: a heavy excluder,
        a batch below `single_row_batches`, or the last query of its row chunk left over."""
        alone = [True] * (max(scan) + 1 if scan else 0)
        light = [b for b in scan if _count(excluded[b]) <= self.exclude_fetch_limit]
        if len(light) >= self.single_row_batches:
            for start in range(0, len(light), self.max_batch_rows):
                chunk = light[start : start + self.max_batch_rows]
                for b in chunk if len(chunk) > 1 else ():
                    alone[b] = False
        return alone

    def scores_for(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Scores of given items (B, m), -inf for negative rows: `Ranker.scores_for`."""
        q = self._queries(queries)
        r = np.asarray(rows)
        if r.ndim != 2 or r.shape[0] != len(q):
            raise ValueError(f"rows must be (B, m) with B = {len(q)}, got {r.shape}")
        if r.size and int(r.max()) >= self.n_items:
            raise ValueError(f"item row {int(r.max())} is outside the catalogue ({self.n_items})")
        valid = r >= 0
        safe = np.where(valid, r, 0)
        vectors = np.asarray(self.item_factors[safe], dtype=np.float32)
        dots = np.matmul(vectors, q[:, :, None])[:, :, 0]
        out = (dots + self.item_bias[safe]).astype(np.float32, copy=False)
        out[~valid] = PAD_SCORE
        return out

    def _rank_scanned(
        self,
        q: np.ndarray,
        batch: list[int],
        k: int,
        wide: int,
        excluded: list[np.ndarray | None],
        alone: list[bool],
        out: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """Scan `batch` with K' = `wide`, settle the queries the bound proves complete (or
        whose K' covered the catalogue), and scan the rest again wider, or in full once K'
        passes `max_candidate_share` of the catalogue."""
        first = True
        while batch:
            if not first and wide >= self.max_candidate_share * self.n_items:
                for b in batch:
                    self._rank_fully(q[b], k, excluded[b], alone[b], out[0][b], out[1][b])
                return
            found, bounds = self._scan(q[batch], wide)
            cands = [self._candidates(found[1][i]) for i in range(len(batch))]
            exact = self._exact(q[batch], cands, [alone[b] for b in batch])
            rows, scores = out
            unsettled, everything = [], wide >= self.book.width
            for i, b in enumerate(batch):
                top_rows, top_scores = _best(cands[i], exact[i], excluded[b], k)
                n_top = len(top_rows)
                rows[b, :n_top], scores[b, :n_top] = top_rows, top_scores
                self.stats.rescored += len(cands[i])
                if everything:
                    continue
                if n_top < k or not float(top_scores[-1]) > bounds[i] + found[0][i]:
                    unsettled.append(b)
            self.stats.retries += len(unsettled)
            batch, wide, first = unsettled, wide * 4, False

    def _scan(self, q: np.ndarray, wide: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        """The int8 scan: ((A', rows (B, wide)), E) with A' the K'-th best approximate score
        per query and E its error bound (module docstring)."""
        k_top = min(wide, self.book.width)
        feed: dict[str, np.ndarray] = {
            "k": np.array([k_top], dtype=np.int64),
            "k_groups": np.array([min(k_top, self._groups)], dtype=np.int64),
        }
        if len(q) <= self.small_batch_rows:
            feed["queries"] = q
            best, rows = self._small_session.run(["approx", "rows"], feed)
            return (best[:, -1].astype(np.float64), rows), float_query_bound(self.book, q)
        codes, step = quantise_queries(q)
        feed["queries"] = codes
        best, rows = self._scan_session.run(["codes", "rows"], feed)
        approx = step * self.book.scale * best[:, -1].astype(np.float64)
        return (approx, rows), error_bound(self.book, q, codes, step)

    def _candidates(self, rows: np.ndarray) -> np.ndarray:
        """Distinct candidate rows: the scan's K' (less padding) and every outlier."""
        rows = rows[rows < self.n_items]
        outliers = self.book.outliers
        if not len(outliers):
            return rows
        # Outliers are few: a broadcast comparison beats np.isin's sort at this size.
        seen = (outliers[:, None] == rows[None, :]).any(axis=1)
        return np.concatenate([rows, outliers[~seen]])

    def _exact(
        self, q: np.ndarray, candidates: list[np.ndarray], alone: list[bool]
    ) -> list[np.ndarray]:
        """float32 scores of each query's candidates by `Ranker`'s MatMul, (q, 1) x (y, b):
        one-row runs for the queries `Ranker` scores alone, and one run of at least two rows
        over the union of candidates for the others (multi-row products round alike)."""
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(q)
        together = [i for i in range(len(q)) if not alone[i]]
        for i in (i for i in range(len(q)) if alone[i]):
            out[i] = self._product(q[i : i + 1], candidates[i])[0]
        if together:
            union = np.unique(np.concatenate([candidates[i] for i in together]))
            rows = together if len(together) > 1 else together * 2
            dots = self._product(q[rows], union)
            for j, i in enumerate(together):
                out[i] = dots[j, np.searchsorted(union, candidates[i])]
        return out

    def _product(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(B, len(rows)) float32 scores of item `rows` by the exact MatMul graph."""
        block = np.empty((self.dim + 1, len(rows)), dtype=np.float32)
        block[:-1] = np.take(self.item_factors, rows, axis=0).T
        block[-1] = self.item_bias[rows]
        augmented = np.ones((len(q), self.dim + 1), dtype=np.float32)
        augmented[:, :-1] = q
        (dots,) = self._exact_session.run(["scores"], {"queries": augmented, "items": block})
        return np.asarray(dots)

    def _rank_fully(
        self,
        query: np.ndarray,
        k: int,
        excluded: np.ndarray | None,
        alone: bool,
        out_rows: np.ndarray,
        out_scores: np.ndarray,
    ) -> None:
        """Every row scored exactly, in blocks (adversarial catalogues: rare, slow, exact)."""
        self.stats.full_scans += 1
        best_rows = np.zeros(0, dtype=np.int64)
        best_scores = np.zeros(0, dtype=np.float32)
        for start in range(0, self.n_items, QUANTISE_CHUNK_ROWS):
            block = np.arange(start, min(start + QUANTISE_CHUNK_ROWS, self.n_items))
            (scores,) = self._exact(query[None, :], [block], [alone])
            rows = np.concatenate([best_rows, block])
            best_rows, best_scores = _best(rows, np.concatenate([best_scores, scores]),
                                           excluded, k)  # fmt: skip
        self.stats.rescored += self.n_items
        out_rows[: len(best_rows)], out_scores[: len(best_rows)] = best_rows, best_scores

    def _ranked_subset(
        self, query: np.ndarray, allowed: np.ndarray, excluded: np.ndarray | None, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among the allowed rows, scored as `Ranker` scores allow-lists (numpy)."""
        rows = np.unique(allowed.astype(np.int64, copy=False))
        vectors = np.asarray(self.item_factors[rows], dtype=np.float32)
        scores = (vectors @ query + self.item_bias[rows]).astype(np.float32, copy=False)
        return _best(rows, scores, excluded, k)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        return checked_queries(queries, self.dim)

    def _per_query(
        self, arrays: Sequence[np.ndarray | None] | None, batch: int, what: str
    ) -> list[np.ndarray | None]:
        return per_query_rows(arrays, batch, what, self.n_items)


def _cpu_session(model: bytes, threads: int) -> Any:
    """A scan session on the process's shared arena (`scan_sessions`), with idle intra-op
    threads sleeping instead of spinning: a call runs two sessions in turn, and on 2 cores one
    session's spinning pool slowed the other's run (batch 32: median 124 -> 48 ms per call on
    the loaded machine)."""
    return scan_session(model, threads, spinning=False)


def _copy_of(source: np.ndarray) -> Any:
    def build(out: np.ndarray) -> None:
        out[...] = source

    return build


def _count(rows: np.ndarray | None) -> int:
    return 0 if rows is None else len(rows)


def _best(
    rows: np.ndarray, scores: np.ndarray, excluded: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of distinct `rows` by (score desc, row asc), excluded rows left out."""
    if excluded is not None and len(excluded):
        keep = ~np.isin(rows, excluded)
        rows, scores = rows[keep], scores[keep]
    if len(rows) > k:
        # Everything scoring at least the k-th best score, so ties there are all kept.
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        keep = scores >= kth
        rows, scores = rows[keep], scores[keep]
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def quantise(
    factors: np.ndarray, bias: np.ndarray, outlier_fraction: float
) -> tuple[np.ndarray, Codes]:
    """int8 codes of the augmented catalogue (d + 1, n padded), one scale, and the maxima
    the error bound needs. Rows whose largest coordinate is beyond what the shared scale
    codes become outliers: the scale fits the largest coordinate of all but the top
    max(MIN_OUTLIERS, outlier_fraction * n) rows, with 25% headroom (so a catalogue without
    stragglers has none). Works in float64 blocks: the bound's constants must hold
    for the stored float32 values exactly."""
    n, d = factors.shape
    row_max = np.empty(n, dtype=np.float64)
    for start in range(0, n, QUANTISE_CHUNK_ROWS):
        block = _augmented_rows(factors, bias, start)
        row_max[start : start + len(block)] = np.abs(block).max(axis=1)
    budget = min(n - 1, max(MIN_OUTLIERS, int(outlier_fraction * n)))
    cut = float(np.partition(row_max, n - 1 - budget)[n - 1 - budget]) * 1.25
    top = min(cut, float(row_max.max()))
    # A float32 value: the float-query scan hands ONNX Runtime the scale as float32.
    scale = float(np.float32(top / CODE_MAX)) if top > 0 else 1.0
    scale = scale if scale * CODE_MAX >= top else float(np.nextafter(np.float32(scale), 1))
    outlier = row_max > CODE_MAX * scale
    padded = -(-n // GROUP_WIDTH) * GROUP_WIDTH
    codes = np.zeros((d + 1, padded), dtype=np.int8)
    residual_max = residual_norm = coordinate_max = norm_max = 0.0
    for start in range(0, n, QUANTISE_CHUNK_ROWS):
        block = _augmented_rows(factors, bias, start)
        block[outlier[start : start + len(block)]] = 0.0
        code = np.clip(np.rint(block / scale), -CODE_MAX, CODE_MAX)
        residual = block - scale * code
        codes[:, start : start + len(block)] = code.T.astype(np.int8)
        residual_max = max(residual_max, float(np.abs(residual).max()))
        residual_norm = max(residual_norm, float(np.sqrt((residual**2).sum(axis=1)).max()))
        coordinate_max = max(coordinate_max, float(np.abs(block).max()))
        norm_max = max(norm_max, float(np.sqrt((block**2).sum(axis=1)).max()))
    return codes, Codes(padded, scale, np.flatnonzero(outlier).astype(np.int64), residual_max,
                 residual_norm, coordinate_max, norm_max)  # fmt: skip


def _augmented_rows(factors: np.ndarray, bias: np.ndarray, start: int) -> np.ndarray:
    """float64 (m, d + 1) rows (item, bias) from `start`, one quantisation block."""
    stop = min(start + QUANTISE_CHUNK_ROWS, len(factors))
    block = np.empty((stop - start, factors.shape[1] + 1), dtype=np.float64)
    block[:, :-1] = factors[start:stop]
    block[:, -1] = bias[start:stop]
    return block


def quantise_queries(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 codes (B, d + 1) of (query, 1) around QUERY_ZERO_POINT, and each row's step t.

    t = max |q~| / 127 >= 1 / 127 (the trailing 1), so no row divides by zero."""
    augmented = np.ones((len(q), q.shape[1] + 1), dtype=np.float64)
    augmented[:, :-1] = q
    step = np.abs(augmented).max(axis=1) / CODE_MAX
    code = np.clip(np.rint(augmented / step[:, None]), -CODE_MAX, CODE_MAX)
    return (code + QUERY_ZERO_POINT).astype(np.uint8), step


def error_bound(book: Codes, q: np.ndarray, codes: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Per query, E >= |t * s * (code product) - exact float32 score| for every non-outlier
    row. With q~ = q^ + e (q^ the coded query) and y~ = s * c + r:
        q~ . y~ - t s (u - 128) . c = q^ . r + e . y~
        |q^ . r| <= min(|q^|_1 max|r_ij|, |q^|_2 max|r_i|_2)
        |e . y~| <= min(|e|_1 max|y~_ij|, |e|_2 max|y~_i|_2)
    plus the float32 rounding of the exact score, at most gamma_(d+1) |q~|_2 max|y~_i|_2
    (taken twice), all grown by a relative 1e-6 for the float64 arithmetic here."""
    augmented = np.ones((len(q), q.shape[1] + 1), dtype=np.float64)
    augmented[:, :-1] = q
    coded = step[:, None] * (codes.astype(np.float64) - QUERY_ZERO_POINT)
    err = augmented - coded
    item = np.minimum(
        np.abs(coded).sum(axis=1) * book.residual_max,
        np.sqrt((coded**2).sum(axis=1)) * book.residual_norm,
    )
    query = np.minimum(
        np.abs(err).sum(axis=1) * book.coordinate_max,
        np.sqrt((err**2).sum(axis=1)) * book.norm_max,
    )
    width = augmented.shape[1]
    gamma = width * UNIT_ROUNDOFF / (1 - width * UNIT_ROUNDOFF)
    rounding = 2 * gamma * np.sqrt((augmented**2).sum(axis=1)) * book.norm_max
    return (item + query + rounding) * (1 + 1e-6) + 1e-30


def float_query_bound(book: Codes, q: np.ndarray) -> np.ndarray:
    """Per query, E >= |approximate - exact float32 score| for every non-outlier row, for the
    float-query scan: MatMulNBits codes each block of the query as int8 with step
    t_b = max |q_b| / 127 (at most t = max |q| / 127), so |e_j| <= t / 2 and the terms of
    `error_bound` hold with |q^| <= |q| + |e|, the bias being added in float32. Its float32
    arithmetic (a product per block, the bias added) is bounded by 8u (|q^|_2 |s c_i|_2 +
    |b_i|), |s c_i|_2 <= max|y~_i|_2 + max|r_i|_2 and |b_i| <= max|y~_ij|."""
    q64 = q.astype(np.float64)
    d = q.shape[1]
    half = np.abs(q64).max(axis=1) / CODE_MAX / 2 * (1 + 1e-4)
    l1 = np.abs(q64).sum(axis=1) + d * half
    l2 = np.sqrt((q64**2).sum(axis=1)) + np.sqrt(d) * half
    item = np.minimum(l1 * book.residual_max, l2 * book.residual_norm)
    query = np.minimum(d * half * book.coordinate_max, np.sqrt(d) * half * book.norm_max)
    approx = 8 * UNIT_ROUNDOFF * (l2 * (book.norm_max + book.residual_norm) + book.coordinate_max)
    gamma = (d + 1) * UNIT_ROUNDOFF / (1 - (d + 1) * UNIT_ROUNDOFF)
    exact = 2 * gamma * np.sqrt((q64**2).sum(axis=1) + 1) * book.norm_max
    return (item + query + approx + exact) * (1 + 1e-6) + 1e-30


def build_nbits_topk_graph(codes: np.ndarray, scale: float, bias: np.ndarray) -> bytes:
    """Serialised ONNX model for small batches: MatMulNBits (8-bit, one block per item row
    of up to 64 coordinates, `scale` for every block, int8 compute) of float32 `queries`
    (B, d) with the item codes (d, n padded), plus the bias (-inf on padding), then
    `Ranker`'s two-stage top-k. Its one-row kernel streams the codes several times faster
    than MatMulInteger's; at batch 32 it is slower. Outputs `approx` (B, k) float32 best
    first and `rows` (B, k) int64."""
    from onnx import TensorProto, helper, numpy_helper

    d, width = codes.shape
    block = _nbits_block(d)
    blocks = -(-d // block)
    packed = np.full((width, blocks * block), QUERY_ZERO_POINT, dtype=np.uint8)
    packed[:, :d] = (codes.T.astype(np.int16) + QUERY_ZERO_POINT).astype(np.uint8)
    padded_bias = np.full(width, PAD_SCORE, dtype=np.float32)
    padded_bias[: len(bias)] = bias
    nodes = [
        helper.make_node("MatMulNBits", ["queries", "items", "scales"], ["dots"],
                         domain="com.microsoft", K=d, N=width, bits=8, block_size=block,
                         accuracy_level=4),
        helper.make_node("Add", ["dots", "bias"], ["scores"]),
    ]  # fmt: skip
    nodes += _two_stage_topk("scores", "approx")
    initializers = [
        numpy_helper.from_array(packed.reshape(width, blocks, block), "items"),
        numpy_helper.from_array(np.full(width * blocks, scale, dtype=np.float32), "scales"),
        numpy_helper.from_array(padded_bias, "bias"),
    ]
    graph = helper.make_graph(
        nodes, "bertrec_nbits_topk",
        [helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["batch", d]),
         helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("k_groups", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("approx", TensorProto.FLOAT, ["batch", "top"]),
         helper.make_tensor_value_info("rows", TensorProto.INT64, ["batch", "top"])],
        initializers,
    )  # fmt: skip
    return _serialised(graph, contrib=True)


def _nbits_block(d: int) -> int:
    """MatMulNBits block length for d coordinates: a power of two in 16..64, one block for
    d <= 64."""
    return max(16, min(64, 1 << (d - 1).bit_length()))


def build_int8_topk_graph(codes: np.ndarray) -> bytes:
    """Serialised ONNX model: MatMulInteger of uint8 query codes (B, d + 1) with the int8
    catalogue (an initializer, packed once), then `Ranker`'s two-stage top-k on the int32
    products. Inputs `queries`, `k` (1,) and `k_groups` (1,) = min(k, n / GROUP_WIDTH);
    outputs `codes` (B, k) int32 best first and `rows` (B, k) int64."""
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node
    zero = helper.make_tensor("zero_point", TensorProto.UINT8, [], [QUERY_ZERO_POINT])
    nodes = [node("MatMulInteger", ["queries", "items", "zero_point"], ["dots"])]
    nodes += _two_stage_topk("dots", "codes")
    inputs = [
        helper.make_tensor_value_info("queries", TensorProto.UINT8, ["batch", codes.shape[0]]),
        helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("k_groups", TensorProto.INT64, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info("codes", TensorProto.INT32, ["batch", "top"]),
        helper.make_tensor_value_info("rows", TensorProto.INT64, ["batch", "top"]),
    ]
    initializers = [numpy_helper.from_array(codes, "items"), zero]
    graph = helper.make_graph(nodes, "bertrec_int8_topk", inputs, outputs, initializers)
    return _serialised(graph)


def build_matmul_graph() -> bytes:
    """Serialised ONNX model of `Ranker`'s product alone: `queries` (B, d + 1) x `items`
    (d + 1, m) -> `scores` (B, m) float32, so re-scored candidates round as the scan does."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["queries", "items"], ["scores"])],
        "bertrec_exact_scores",
        [helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["batch", "width"]),
         helper.make_tensor_value_info("items", TensorProto.FLOAT, ["width", "m"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "m"])],
    )  # fmt: skip
    return _serialised(graph)


def _two_stage_topk(scores: str, out: str) -> list[Any]:
    """`Ranker`'s group top-k nodes (see `ranking.build_topk_graph`): `scores` (B, n) ->
    `out` (B, k) best first and `rows` (B, k)."""
    from onnx import TensorProto, helper

    node = helper.make_node

    def constant(name: str, values: list[int]) -> Any:
        tensor = helper.make_tensor(f"{name}_value", TensorProto.INT64, [len(values)], values)
        return node("Constant", [], [name], value=tensor)

    return [
        constant("group_shape", [0, -1, GROUP_WIDTH]),
        node("Reshape", [scores, "group_shape"], ["groups"]),
        node("ReduceMax", ["groups"], ["group_max"], axes=[2], keepdims=0),
        node("TopK", ["group_max", "k_groups"], ["_best_max", "best_groups"], axis=-1),
        node("TopK", ["best_groups", "k_groups"], ["chosen", "_order"], axis=-1, largest=0),
        constant("last_axis", [2]),
        node("Unsqueeze", ["chosen", "last_axis"], ["chosen_index"]),
        node("GatherND", ["groups", "chosen_index"], ["candidates"], batch_dims=1),
        constant("flat_shape", [0, -1]),
        node("Reshape", ["candidates", "flat_shape"], ["flat"]),
        node("TopK", ["flat", "k"], [out, "position"], axis=-1),
        constant("width", [GROUP_WIDTH]),
        node("Div", ["position", "width"], ["slot"]),
        node("Mod", ["position", "width"], ["offset"]),
        node("GatherElements", ["chosen", "slot"], ["group"], axis=1),
        node("Mul", ["group", "width"], ["first_row"]),
        node("Add", ["first_row", "offset"], ["rows"]),
    ]


def _serialised(graph: Any, contrib: bool = False) -> bytes:
    from onnx import helper

    opsets = [helper.make_opsetid("", OPSET)]
    opsets += [helper.make_opsetid("com.microsoft", 1)] if contrib else []
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    return bytes(model.SerializeToString())
