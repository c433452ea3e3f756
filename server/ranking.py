"""Exact top-k over an item catalogue with one ONNX Runtime graph: Gemm + bias + TopK.

score(query, item) = query . item_factors[item] + item_bias[item]

Why a graph and not numpy: numpy's `argpartition` is single-threaded and cost more than the
matrix product itself; faiss's flat index is slower still at small batches (PERF-NOTES and
`bertrec.bench.ranking`). The item matrix is a graph *input*, not an initializer, so building
the session costs nothing and the matrix (memory-mapped or not) is read in place, never copied.

ONNX Runtime splits the Gemm across its intra-op threads, and its TopK splits the batch rows
across them. Optionally the catalogue is cut into `partitions` contiguous slices, each with its
own Gemm + Add + TopK branch run on the inter-op threads, and a last TopK merges the branch
winners (branches are concatenated in item order, so ties still resolve to the lower row). On
2 shared cores one graph with intra-op threads measured ~2x faster than 2 or 8 slices; slices
are for many-core machines, where one thread's TopK over a large catalogue at batch 1 becomes
the bottleneck.

Results are exact: the same items, order and float32 scores as a full sort by
(score descending, row ascending), up to the rounding of the dot products.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from bertrec.server.providers import CPU, make_session

PAD_ROW = -1  # row given where fewer than k items could be returned
PAD_SCORE = float("-inf")  # score given with PAD_ROW
OPSET = 17


class Ranker:
    """Top-k items for batches of query vectors, exact, with exclusions and allow-lists.

    Args:
        item_factors: float32 (n_items, d); used in place when already float32 C-contiguous
            (pass an in-memory array rather than a memory map for steady latency).
        item_bias: float32 (n_items,), added to every query's dot products.
        threads: CPU threads for one `topk` call (0: one per CPU).
        partitions: catalogue slices ranked as concurrent graph branches (see the module notes).
        max_batch_rows: queries per graph run; bounds the (rows, n_items) score buffer.
        exclude_fetch_limit: a query excluding more rows than this is ranked alone with its
            excluded items masked, instead of fetching k + len(exclude) and filtering.
    Raises:
        ValueError: shapes that do not match.
    """

    def __init__(
        self,
        item_factors: np.ndarray,
        item_bias: np.ndarray,
        *,
        threads: int = 0,
        partitions: int = 1,
        max_batch_rows: int = 64,
        exclude_fetch_limit: int = 1024,
    ) -> None:
        factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        bias = np.ascontiguousarray(item_bias, dtype=np.float32)
        if factors.ndim != 2 or factors.shape[0] == 0 or factors.shape[1] == 0:
            raise ValueError(f"item_factors must be (n_items, d) with n, d >= 1: {factors.shape}")
        if bias.shape != (factors.shape[0],):
            raise ValueError(f"item_bias has shape {bias.shape}, expected ({factors.shape[0]},)")
        if max_batch_rows < 1 or exclude_fetch_limit < 0:
            raise ValueError("max_batch_rows must be >= 1 and exclude_fetch_limit >= 0")
        self.item_factors = factors
        self.item_bias = bias
        self.max_batch_rows = max_batch_rows
        self.exclude_fetch_limit = exclude_fetch_limit
        self.threads = threads or os.cpu_count() or 1
        partitions = max(1, min(partitions, self.n_items))
        bounds = [self.n_items * p // partitions for p in range(partitions + 1)]
        self._slices = list(itertools.pairwise(bounds))
        graph = build_topk_graph(self.dim, [lo for lo, _ in self._slices])
        parallel = partitions > 1
        self._session = make_session(
            graph,
            [CPU],
            intra_op_threads=1 if parallel else self.threads,
            inter_op_threads=self.threads if parallel else 1,
            parallel=parallel,
        )
        self._feed = self._item_feed(self.item_bias)

    @property
    def n_items(self) -> int:
        return int(self.item_factors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.item_factors.shape[1])

    @property
    def partitions(self) -> int:
        return len(self._slices)

    def topk(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[np.ndarray | None] | None = None,
        allow: Sequence[np.ndarray | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best items for each query, best first; ties go to the lower item row.

        Args:
            queries: float32 (B, d).
            k: items per query, >= 1 (may exceed the catalogue).
            exclude: per query, item rows never to return (e.g. the items a user rated), or None.
            allow: per query, None (the whole catalogue) or the only item rows it may return.
        Returns:
            rows int64 (B, k) and scores float32 (B, k). A query with fewer than k eligible
            items has its tail padded with PAD_ROW (-1) and PAD_SCORE (-inf).
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
        heavy = [b for b in scan if _count(excluded[b]) > self.exclude_fetch_limit]
        light = [b for b in scan if _count(excluded[b]) <= self.exclude_fetch_limit]
        for start in range(0, len(light), self.max_batch_rows):
            batch = light[start : start + self.max_batch_rows]
            extra = max(_count(excluded[b]) for b in batch)
            top_rows, top_scores = self._scan(q[batch], k + extra, self._feed)
            for i, b in enumerate(batch):
                _fill(rows[b], scores[b], top_rows[i], top_scores[i], excluded[b])
        for b in heavy:
            top_rows, top_scores = self._scan(q[b : b + 1], k, self._masked_feed(excluded[b]))
            _fill(rows[b], scores[b], top_rows[0], top_scores[0], excluded[b])
        for b in range(len(q)):
            only = allowed[b]
            if only is not None:
                top_rows, top_scores = self._ranked_subset(q[b], only, excluded[b], k)
                _fill(rows[b], scores[b], top_rows, top_scores, None)
        return rows, scores

    def scores_for(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Scores of given items: float32 (B, m) for queries (B, d) and item rows (B, m).

        A negative row (padding, such as PAD_ROW) scores -inf. Raises ValueError for rows
        beyond the catalogue or mismatched shapes.
        """
        q = self._queries(queries)
        r = np.asarray(rows)
        if r.ndim != 2 or r.shape[0] != len(q):
            raise ValueError(f"rows must be (B, m) with B = {len(q)}, got {r.shape}")
        if r.size and int(r.max()) >= self.n_items:
            raise ValueError(f"item row {int(r.max())} is outside the catalogue ({self.n_items})")
        valid = r >= 0
        safe = np.where(valid, r, 0)
        dots = np.matmul(self.item_factors[safe], q[:, :, None])[:, :, 0]
        out = (dots + self.item_bias[safe]).astype(np.float32, copy=False)
        out[~valid] = PAD_SCORE
        return out

    def _scan(
        self, q: np.ndarray, k: int, items: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top min(k, n_items) over the whole catalogue, one graph run."""
        k = min(k, self.n_items)
        feed: dict[str, Any] = {"queries": q, "k": np.array([k], dtype=np.int64), **items}
        for p, (lo, hi) in enumerate(self._slices):
            feed[f"k{p}"] = np.array([min(k, hi - lo)], dtype=np.int64)
        scores, rows = self._session.run(["scores", "rows"], feed)
        return rows, scores

    def _item_feed(self, bias: np.ndarray) -> dict[str, np.ndarray]:
        feed = {}
        for p, (lo, hi) in enumerate(self._slices):
            feed[f"items{p}"] = self.item_factors[lo:hi]
            feed[f"bias{p}"] = bias[lo:hi]
        return feed

    def _masked_feed(self, excluded: np.ndarray | None) -> dict[str, np.ndarray]:
        bias = self.item_bias.copy()
        if excluded is not None:
            bias[excluded] = PAD_SCORE
        return self._item_feed(bias)

    def _ranked_subset(
        self, query: np.ndarray, allowed: np.ndarray, excluded: np.ndarray | None, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among the allowed rows, computed in numpy (allow-lists are small)."""
        rows = np.unique(allowed.astype(np.int64, copy=False))
        if excluded is not None and len(excluded):
            rows = rows[~np.isin(rows, excluded)]
        scores = (self.item_factors[rows] @ query + self.item_bias[rows]).astype(np.float32)
        if len(rows) > k:
            # Everything scoring at least the k-th best score, so ties there are all seen.
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            keep = scores >= kth
            rows, scores = rows[keep], scores[keep]
        order = np.lexsort((rows, -scores))[:k]
        return rows[order], scores[order]

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}), got {q.shape}")
        if not np.isfinite(q).all():
            raise ValueError("queries must be finite")
        return q

    def _per_query(
        self, arrays: Sequence[np.ndarray | None] | None, batch: int, what: str
    ) -> list[np.ndarray | None]:
        if arrays is None:
            return [None] * batch
        if len(arrays) != batch:
            raise ValueError(f"{what} has {len(arrays)} entries for {batch} queries")
        out: list[np.ndarray | None] = []
        for a in arrays:
            if a is None:
                out.append(None)
                continue
            rows = np.asarray(a).ravel()
            if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= self.n_items):
                raise ValueError(f"{what} holds item rows outside 0..{self.n_items - 1}")
            if rows.size and not np.issubdtype(rows.dtype, np.integer):
                raise ValueError(f"{what} rows must be integers, got {rows.dtype}")
            out.append(rows)
        return out


def _count(rows: np.ndarray | None) -> int:
    return 0 if rows is None else len(rows)


def _fill(
    out_rows: np.ndarray,
    out_scores: np.ndarray,
    rows: np.ndarray,
    scores: np.ndarray,
    excluded: np.ndarray | None,
) -> None:
    """Write the best rows that are not excluded into one padded output row."""
    if excluded is not None and len(excluded):
        keep = ~np.isin(rows, excluded)
        rows, scores = rows[keep], scores[keep]
    n = min(len(rows), len(out_rows))
    out_rows[:n] = rows[:n]
    out_scores[:n] = scores[:n]


def build_topk_graph(dim: int, offsets: Sequence[int]) -> bytes:
    """Serialised ONNX model: per catalogue slice Gemm + Add + TopK, then a merging TopK.

    Inputs: `queries` (B, dim) float32, `k` (1,) int64, and per slice p: `items{p}` (n_p, dim),
    `bias{p}` (n_p,), `k{p}` (1,) = min(k, n_p). Outputs: `scores` (B, k) float32 and `rows`
    (B, k) int64 (catalogue rows), best first. `offsets[p]` is slice p's first catalogue row.
    """
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    inputs = [value("queries", TensorProto.FLOAT, ["batch", dim])]
    inputs.append(value("k", TensorProto.INT64, [1]))
    nodes, initializers, branch_scores, branch_rows = [], [], [], []
    for p, offset in enumerate(offsets):
        inputs += [
            value(f"items{p}", TensorProto.FLOAT, [f"n{p}", dim]),
            value(f"bias{p}", TensorProto.FLOAT, [f"n{p}"]),
            value(f"k{p}", TensorProto.INT64, [1]),
        ]
        nodes += [
            # Gemm's own bias input (C) measured ~30% slower here than a separate Add.
            helper.make_node("Gemm", ["queries", f"items{p}"], [f"d{p}"], transB=1),
            helper.make_node("Add", [f"d{p}", f"bias{p}"], [f"s{p}"]),
            helper.make_node("TopK", [f"s{p}", f"k{p}"], [f"v{p}", f"i{p}"], axis=-1),
        ]
        initializers.append(helper.make_tensor(f"offset{p}", TensorProto.INT64, [], [offset]))
        nodes.append(helper.make_node("Add", [f"i{p}", f"offset{p}"], [f"r{p}"]))
        branch_scores.append(f"v{p}")
        branch_rows.append(f"r{p}")
    if len(offsets) == 1:
        nodes += [
            helper.make_node("Identity", ["v0"], ["scores"]),
            helper.make_node("Identity", ["r0"], ["rows"]),
        ]
    else:
        nodes += [
            helper.make_node("Concat", branch_scores, ["all_scores"], axis=1),
            helper.make_node("Concat", branch_rows, ["all_rows"], axis=1),
            helper.make_node("TopK", ["all_scores", "k"], ["scores", "best"], axis=-1),
            helper.make_node("GatherElements", ["all_rows", "best"], ["rows"], axis=1),
        ]
    outputs = [
        value("scores", TensorProto.FLOAT, ["batch", "top"]),
        value("rows", TensorProto.INT64, ["batch", "top"]),
    ]
    graph = helper.make_graph(nodes, "bertrec_topk", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    return bytes(model.SerializeToString())
