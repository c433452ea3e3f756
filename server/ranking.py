"""Exact top-k over an item catalogue with one ONNX Runtime graph: MatMul + TopK.

score(query, item) = query . item_factors[item] + item_bias[item]

Why a graph and not numpy: numpy's `argpartition` is single-threaded and cost more than the
matrix product itself; faiss's flat index is slower still (PERF-NOTES, `bertrec.bench.ranking`).

Layout: the catalogue is held once, transposed and augmented, as a float32 (d + 1, n_items)
matrix whose last row is the bias; queries get a matching trailing 1. The bias then costs no
separate pass over the (batch, n_items) scores, and at batch 1 ONNX Runtime's vector-matrix
kernel streams the rows at close to memory speed (96% of the measured read bandwidth here,
against ~70% for the (n_items, d) layout). The matrix is a graph *input*, not an initializer, so the
session builds instantly and no 2 GB protobuf limit applies. Fed as an input, though, it is
packed anew by every multi-row product; up to PREPACK_MAX_BYTES, a second session holds a copy
packed once for those runs (1.1-1.3x at 10k x 64, batches of 8-32; 1.5-2x at 100k).

Top-k in two stages, inside the graph: the score row is cut into groups of GROUP_WIDTH
consecutive items; a ReduceMax gives each group's best score, a TopK picks the k best groups,
and a TopK over just those k * GROUP_WIDTH candidates gives the answer. The k best items always
lie in the k groups with the best maxima (a group holding a top-k item has a maximum at least
the k-th best score, and fewer than k groups can beat that), including ties: equal maxima go
to the lower group, and the chosen groups are re-sorted by index so equal scores go to the lower
row. This replaced one TopK over the whole row, whose per-element cost was up to a quarter of the
scan: `bench.ranking` went from 405 to 493 q/s at 1M x 64, batch 32, and from 79% to 96% of
the read bandwidth at batch 1. The catalogue is padded to whole groups with items that score
-inf and are never returned.

Cosine similarity (`Ranker.scaled`) scans the same matrix: its first d rows are a C-contiguous
view, which ONNX Runtime reads in place, and the graph multiplies each item's dot product by a
per-item scale (1 / |item|) instead of scanning a second, normalised copy of the catalogue. A
loaded version thus holds one copy of the item factors besides the memory-mapped file: on the
heap, or, in the workers of `bertrec serve --workers N`, one file of the run that every worker
maps (`shared_layout`). The (rows, n_items) score buffers come from one arena per process
(`scan_sessions`).

ONNX Runtime splits the MatMul across its intra-op threads, and TopK splits the batch rows
across them. (Cutting the catalogue into blocks with a TopK each, or slicing it into concurrent
graph branches, measured slower here.)

Results are exact: the same items, order and float32 scores as a full sort by
(score descending, row ascending), up to the rounding of the dot products.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from bertrec.server.providers import onnxruntime
from bertrec.server.scan_sessions import external_placeholder, scan_session
from bertrec.server.shared_layout import LayoutCache, heap_or_shared

PAD_ROW = -1  # row given where fewer than k items could be returned
PAD_SCORE = float("-inf")  # score given with PAD_ROW
OPSET = 17
GROUP_WIDTH = 32  # items per group of the two-stage top-k (16-64 measured alike)
# Catalogues whose (d + 1, n) layout is at most this big are packed once for multi-row runs
# (`Ranker`; 64 MB is ~250k items x 64): the product then skips a strided copy of the whole
# catalogue per run, most of a small batch's time (`bench.ranking`, "fed per run" rows).
PREPACK_MAX_BYTES = 64 << 20
# Batches of at least this many queries drop their exclusions in one vectorised pass
# (`_without`: ~30 us whatever the size); smaller ones a query at a time (~12 us each).
VECTORISED_FROM = 3


class Ranker:
    """Top-k items for batches of query vectors, exact, with exclusions and allow-lists.

    Args:
        item_factors: (n_items, d); kept by reference (a memory-mapped array stays mapped) for
            `scores_for` and allow-lists, and copied once into the (d + 1, n_items) layout the
            graph scans, which `scaled` twins share.
        item_bias: (n_items,), added to every query's dot products.
        threads: CPU threads for one `topk` call (0: one per CPU).
        max_batch_rows: queries per graph run; bounds the (rows, n_items) score buffer.
        exclude_fetch_limit: a query excluding more rows than this is ranked alone with its
            excluded items masked, instead of fetching k + len(exclude) and filtering.
        single_row_batches: batches smaller than this run one query at a time (a one-row
            product streams the matrix faster than a small multi-row one).
        layout: where worker processes share the (d + 1, n_items) layout as one mapped file
            (`shared_layout`); None builds it on the heap.
        prepack_max_bytes: the largest layout that multi-row runs read from a copy packed
            once (private to the process); 0: none, every run packs the catalogue again.
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
        exclude_fetch_limit: int = 1024,
        single_row_batches: int = 3,
        layout: LayoutCache | None = None,
        prepack_max_bytes: int = PREPACK_MAX_BYTES,
    ) -> None:
        factors, bias = np.asarray(item_factors), np.asarray(item_bias, dtype=np.float32)
        if factors.ndim != 2 or factors.shape[0] == 0 or factors.shape[1] == 0:
            raise ValueError(f"item_factors must be (n_items, d) with n, d >= 1: {factors.shape}")
        if bias.shape != (factors.shape[0],):
            raise ValueError(f"item_bias has shape {bias.shape}, expected ({factors.shape[0]},)")
        if max_batch_rows < 1 or exclude_fetch_limit < 0:
            raise ValueError("need max_batch_rows >= 1 and exclude_fetch_limit >= 0")
        self.item_factors, self.item_bias = factors, bias
        self.max_batch_rows = max_batch_rows
        self.exclude_fetch_limit = exclude_fetch_limit
        self.single_row_batches = single_row_batches
        self.threads = threads or os.cpu_count() or 1
        self._items = augmented_layout(factors, bias, layout)
        self._groups = self._items.shape[1] // GROUP_WIDTH
        self._session = scan_session(build_topk_graph(), self.threads)
        self._packed_session: Any = None
        if self._items.nbytes <= prepack_max_bytes:
            self._packed_session = self._packed_twin()
        self._masked_session = scan_session(build_topk_graph(masked=True), self.threads)
        # Set only on `scaled` twins: per-item factors on the dot product, padded to whole
        # groups, and the mask that sends the padding to -inf (no bias row is scanned there).
        self._scale: np.ndarray | None = None
        self._padded_scale = self._pad_mask = np.zeros(0, dtype=np.float32)

    def _packed_twin(self) -> Any:
        """A session over a copy of the catalogue ONNX Runtime packs once (private to the
        process), for multi-row runs: fed as an input, the catalogue is packed again on every
        one. None where it would not score to the bit as the fed session does.

        One-row runs keep the fed session (a vector-matrix kernel that packs nothing, and
        rounds differently). Multi-row products round alike on both up to some width only
        (d + 1 <= 129 on this AVX-512 machine; wider, the packed kernel sums in another
        order), and the int8 ranker's exact re-scoring uses the fed product: so the twin is
        kept only if a probe batch over this catalogue scores identically on both.
        """
        graph = build_topk_graph(packed_items=self._items.shape)
        items = {"items": onnxruntime().OrtValue.ortvalue_from_numpy(self._items)}
        packed = scan_session(graph, self.threads, packed=items)
        probe = np.random.default_rng(0).standard_normal((4, self.dim + 1)).astype(np.float32)
        probe[:, -1] = 1.0
        k = min(self.n_items, 256)
        feed = {
            "queries": probe,
            "k": np.array([k], dtype=np.int64),
            "k_groups": np.array([min(k, self._groups)], dtype=np.int64),
        }
        want = self._session.run(["scores", "rows"], {**feed, "items": self._items})
        got = packed.run(["scores", "rows"], feed)
        same = all(np.array_equal(w, g) for w, g in zip(want, got, strict=True))
        return packed if same else None

    def scaled(self, scale: np.ndarray) -> Ranker:
        """A ranker over the same catalogue scoring (query . item) * scale[item], no bias.

        With scale = 1 / |item| and a unit query the scores are cosines (`Model.similar`).
        The twin scans this ranker's matrix in place, so it costs two float32 vectors of
        n_items, not a second (n_items, d) copy; results stay exact as for `topk`.

        Raises:
            ValueError: `scale` is not (n_items,) or not finite.
        """
        s = np.asarray(scale, dtype=np.float32)
        if s.shape != (self.n_items,) or not np.isfinite(s).all():
            raise ValueError(f"scale must be finite with shape ({self.n_items},): {s.shape}")
        twin = copy.copy(self)
        # Its graph holds two (rows, n_items) buffers where `topk`'s holds one (the dot
        # products and their scaled copy: ONNX Runtime's Mul does not write in place), so
        # half the rows per run keeps its arena the size of this ranker's (measured at 1M).
        twin.max_batch_rows = max(1, self.max_batch_rows // 2)
        twin._scale = s
        twin._padded_scale = np.zeros(self._items.shape[1], dtype=np.float32)
        twin._padded_scale[: self.n_items] = s
        twin._pad_mask = np.zeros(self._items.shape[1], dtype=np.float32)
        twin._pad_mask[self.n_items :] = PAD_SCORE
        graph = build_topk_graph(masked=True, scaled=True)
        twin._session = twin._masked_session = scan_session(graph, self.threads)
        twin._packed_session = None
        return twin

    @property
    def n_items(self) -> int:
        return int(self.item_factors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.item_factors.shape[1])

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
        light = [b for b in scan if _count(excluded[b]) <= self.exclude_fetch_limit]
        step = 1 if len(light) < self.single_row_batches else self.max_batch_rows
        for start in range(0, len(light), step):
            batch = light[start : start + step]
            lists = [excluded[b] for b in batch]
            top_rows, top_scores = self._scan(q[batch], k + max(map(_count, lists)))
            if len(batch) < VECTORISED_FROM:  # a pass per query costs less for one or two
                for i, b in enumerate(batch):
                    _fill(rows[b], scores[b], top_rows[i], top_scores[i], lists[i])
                continue
            kept_rows, kept_scores = _without(top_rows, top_scores, lists, k, self.n_items)
            rows[batch, : kept_rows.shape[1]] = kept_rows
            scores[batch, : kept_rows.shape[1]] = kept_scores
        for b in scan:
            never = excluded[b]
            if never is not None and len(never) > self.exclude_fetch_limit:
                top_rows, top_scores = self._scan(q[b : b + 1], k, never)
                _fill(rows[b], scores[b], top_rows[0], top_scores[0], never)
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
        vectors = np.asarray(self.item_factors[safe], dtype=np.float32)
        out = self._scores(np.matmul(vectors, q[:, :, None])[:, :, 0], safe)
        out[~valid] = PAD_SCORE
        return out

    def _scan(
        self, q: np.ndarray, k: int, excluded: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top min(k, n_items) over the whole catalogue in one graph run.

        With `excluded`, those rows are masked to -inf first (one query only).
        """
        k = min(k, self.n_items)
        feed: dict[str, Any] = {
            "k": np.array([k], dtype=np.int64),
            "k_groups": np.array([min(k, self._groups)], dtype=np.int64),
        }
        session = self._session
        if self._scale is None:
            feed["queries"] = np.ones((len(q), self.dim + 1), dtype=np.float32)
            feed["queries"][:, :-1] = q
            if len(q) > 1 and excluded is None and self._packed_session is not None:
                session = self._packed_session
            else:
                feed["items"] = self._items
        else:
            # The factor rows without the bias row: a contiguous view, read in place.
            feed.update(queries=q, items=self._items[:-1], scale=self._padded_scale)
            feed["mask"] = self._pad_mask
        if excluded is not None:
            base = feed.get("mask")
            mask = np.zeros(self._items.shape[1], np.float32) if base is None else base.copy()
            mask[excluded] = PAD_SCORE
            feed["mask"] = mask
            session = self._masked_session
        scores, rows = session.run(["scores", "rows"], feed)
        padding = rows >= self.n_items  # only reached when masking left fewer than k items
        if padding.any():
            rows[padding], scores[padding] = PAD_ROW, PAD_SCORE
        return rows, scores

    def _ranked_subset(
        self, query: np.ndarray, allowed: np.ndarray, excluded: np.ndarray | None, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k among the allowed rows, computed in numpy (allow-lists are small)."""
        rows = np.unique(allowed.astype(np.int64, copy=False))
        if excluded is not None and len(excluded):
            rows = rows[~np.isin(rows, excluded)]
        vectors = np.asarray(self.item_factors[rows], dtype=np.float32)
        scores = self._scores(vectors @ query, rows)
        if len(rows) > k:
            # Everything scoring at least the k-th best score, so ties there are all seen.
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            keep = scores >= kth
            rows, scores = rows[keep], scores[keep]
        order = np.lexsort((rows, -scores))[:k]
        return rows[order], scores[order]

    def _scores(self, dots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Dot products of item `rows` -> scores, as the graph computes them."""
        if self._scale is None:
            return (dots + self.item_bias[rows]).astype(np.float32, copy=False)
        return (dots * self._scale[rows]).astype(np.float32, copy=False)

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        return checked_queries(queries, self.dim)

    def _per_query(
        self, arrays: Sequence[np.ndarray | None] | None, batch: int, what: str
    ) -> list[np.ndarray | None]:
        return per_query_rows(arrays, batch, what, self.n_items)


def checked_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Queries as a contiguous float32 (B, dim) array. Raises ValueError if not finite."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be (B, {dim}), got {q.shape}")
    if not np.isfinite(q).all():
        raise ValueError("queries must be finite")
    return q


def per_query_rows(
    arrays: Sequence[np.ndarray | None] | None, batch: int, what: str, n_items: int
) -> list[np.ndarray | None]:
    """Per-query exclusion or allow lists as flat int arrays (None where a query has none).

    Raises:
        ValueError: a list per query missing, non-integer rows, or rows outside the catalogue.
    """
    if arrays is None:
        return [None] * batch
    if len(arrays) != batch:
        raise ValueError(f"{what} has {len(arrays)} entries for {batch} queries")
    out = [None if a is None else np.asarray(a).ravel() for a in arrays]
    present = [rows for rows in out if rows is not None and rows.size]
    for rows in present:
        if rows.dtype.kind not in "iu":
            raise ValueError(f"{what} rows must be integers, got {rows.dtype}")
    if present:  # one range check for the batch: a per-query min and max cost more than a scan
        every = present[0] if len(present) == 1 else np.concatenate(present)
        if int(every.min()) < 0 or int(every.max()) >= n_items:
            raise ValueError(f"{what} holds item rows outside 0..{n_items - 1}")
    return out


def augmented_layout(
    factors: np.ndarray, bias: np.ndarray, layout: LayoutCache | None = None
) -> np.ndarray:
    """float32 (d + 1, n_padded): the factors transposed with the bias as the last row, padded
    to whole groups with zero factors and bias -inf (so padding always scores -inf); on the
    heap, or with `layout` one file every worker maps."""
    n, d = factors.shape
    padded = -(-n // GROUP_WIDTH) * GROUP_WIDTH

    def build(block: np.ndarray) -> None:
        block[:-1, :n] = factors.T
        block[:-1, n:] = 0.0
        block[-1, :n] = bias
        block[-1, n:] = PAD_SCORE

    shape = (d + 1, padded)
    return heap_or_shared(layout, "ranker", shape, np.float32, build, group_width=GROUP_WIDTH)


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
        keep = ~_member(rows, excluded)
        rows, scores = rows[keep], scores[keep]
    n = min(len(rows), len(out_rows))
    out_rows[:n] = rows[:n]
    out_scores[:n] = scores[:n]


def _without(
    rows: np.ndarray,
    scores: np.ndarray,
    excluded: Sequence[np.ndarray | None],
    k: int,
    n_items: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The first k rows of each (B, width) row that its query does not exclude, in order.

    Vectorised over the batch: this runs for every ranking batch, where a pass per query cost
    several times the scan at 10k items. Each query's excluded rows become keys
    query * (n_items + 1) + row + 1, sorted once; one binary search marks the excluded
    candidates (padding, row -1, gets key query * (n_items + 1): never excluded), and a stable
    sort of the marks moves them behind the kept ones without reordering either. Rows a query
    has fewer than k candidates for end in PAD_ROW / PAD_SCORE.

    Returns:
        rows int64 and scores float32, (B, min(k, width)).
    """
    width = min(k, rows.shape[1])
    lists = [e for e in excluded if e is not None and len(e)]
    if not lists:
        return rows[:, :width], scores[:, :width]
    stride = n_items + 1
    owner = np.repeat(
        np.arange(len(excluded), dtype=np.int64) * stride, [_count(e) for e in excluded]
    )
    keys = np.sort(owner + np.concatenate(lists).astype(np.int64, copy=False) + 1)
    candidates = np.arange(len(rows), dtype=np.int64)[:, None] * stride + (rows + 1)
    at = np.searchsorted(keys, candidates)
    hit = keys[np.minimum(at, len(keys) - 1)] == candidates
    order = np.argsort(hit, axis=1, kind="stable")[:, :width]
    kept_rows = np.take_along_axis(rows, order, axis=1)
    kept_scores = np.take_along_axis(scores, order, axis=1)
    short = np.arange(width) >= (rows.shape[1] - np.count_nonzero(hit, axis=1))[:, None]
    kept_rows[short], kept_scores[short] = PAD_ROW, PAD_SCORE
    return kept_rows, kept_scores


def _member(rows: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """`np.isin(rows, excluded)` by binary search.

    Runs once per query on the serving hot path, where np.isin's sort-based set logic cost
    more than the ranking itself; rated-item lists arrive sorted (CSR), others are sorted here.
    """
    if len(excluded) > 1 and not bool(np.all(excluded[1:] >= excluded[:-1])):
        excluded = np.sort(excluded)
    pos = np.searchsorted(excluded, rows)
    return excluded[np.minimum(pos, len(excluded) - 1)] == rows


def build_topk_graph(
    masked: bool = False, scaled: bool = False, packed_items: tuple[int, int] | None = None
) -> bytes:
    """Serialised ONNX model: MatMul (* scale) (+ mask), then the two-stage top-k (module
    docstring).

    With `packed_items` (the layout's shape), the catalogue is an initializer whose data the
    session is given in memory and packs once (`scan_sessions.scan_session`'s `packed`), not
    an input.

    Inputs: `queries` (B, d + 1) float32 with a trailing 1, `items` (d + 1, n) (factors
    transposed, bias as the last row, n a multiple of GROUP_WIDTH), `k` (1,) int64 <= n,
    `k_groups` (1,) int64 = min(k, n / GROUP_WIDTH), with `scaled` a `scale` (n,) multiplying
    every row of dot products (then queries and items may come without the bias column and
    row), and with `masked` a `mask` (n,) added to every row of scores. Outputs: `scores`
    (B, k) float32 and `rows` (B, k) int64, best first, equal scores in row order.
    """
    from onnx import TensorProto, helper

    node, value = helper.make_node, helper.make_tensor_value_info

    def constant(name: str, values: list[int]) -> Any:
        tensor = helper.make_tensor(f"{name}_value", TensorProto.INT64, [len(values)], values)
        return node("Constant", [], [name], value=tensor)

    inputs = [
        value("queries", TensorProto.FLOAT, ["batch", "width"]),
        value("k", TensorProto.INT64, [1]),
        value("k_groups", TensorProto.INT64, [1]),
    ]
    initializers = []
    if packed_items is None:
        inputs.insert(1, value("items", TensorProto.FLOAT, ["width", "n_items"]))
    else:
        initializers.append(external_placeholder("items", packed_items))
    nodes = [node("MatMul", ["queries", "items"], ["dots"])]
    scores = "dots"
    if scaled:
        inputs.append(value("scale", TensorProto.FLOAT, ["n_items"]))
        nodes.append(node("Mul", ["dots", "scale"], ["scaled"]))
        scores = "scaled"
    if masked:
        inputs.append(value("mask", TensorProto.FLOAT, ["n_items"]))
        nodes.append(node("Add", [scores, "mask"], ["masked"]))
        scores = "masked"
    nodes += [
        # (B, n) -> (B, n / W, W): group g holds rows g*W .. g*W + W - 1.
        constant("group_shape", [0, -1, GROUP_WIDTH]),
        node("Reshape", [scores, "group_shape"], ["groups"]),
        node("ReduceMax", ["groups"], ["group_max"], axes=[2], keepdims=0),
        node("TopK", ["group_max", "k_groups"], ["_best_max", "best_groups"], axis=-1),
        # The chosen groups in ascending order, so candidates are in row order.
        node("TopK", ["best_groups", "k_groups"], ["chosen", "_order"], axis=-1, largest=0),
        constant("last_axis", [2]),
        node("Unsqueeze", ["chosen", "last_axis"], ["chosen_index"]),
        node("GatherND", ["groups", "chosen_index"], ["candidates"], batch_dims=1),
        constant("flat_shape", [0, -1]),
        node("Reshape", ["candidates", "flat_shape"], ["flat"]),
        node("TopK", ["flat", "k"], ["scores", "position"], axis=-1),
        # Candidate position -> catalogue row: chosen[position / W] * W + position % W.
        constant("width", [GROUP_WIDTH]),
        node("Div", ["position", "width"], ["slot"]),
        node("Mod", ["position", "width"], ["offset"]),
        node("GatherElements", ["chosen", "slot"], ["group"], axis=1),
        node("Mul", ["group", "width"], ["first_row"]),
        node("Add", ["first_row", "offset"], ["rows"]),
    ]
    outputs = [
        value("scores", TensorProto.FLOAT, ["batch", "top"]),
        value("rows", TensorProto.INT64, ["batch", "top"]),
    ]
    graph = helper.make_graph(nodes, "bertrec_topk", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    return bytes(model.SerializeToString())
