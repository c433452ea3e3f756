"""CompactRanker against a full float32 sort and against `Ranker`, bit for bit.

The reference scores every item with the MatMul `Ranker` uses (one-row runs where `Ranker`
ranks a query alone), then sorts by (score desc, row asc): the answer the int8 scan plus
bounded re-scoring must reproduce exactly, near-ties included.
"""

from __future__ import annotations

import numpy as np
import pytest

from bertrec.server.providers import CPU, make_session
from bertrec.server.ranking import PAD_ROW, PAD_SCORE, Ranker
from bertrec.server.ranking_compact import (
    QUERY_ZERO_POINT,
    CompactRanker,
    build_matmul_graph,
    error_bound,
    float_query_bound,
    quantise,
    quantise_queries,
)

Rows = list[np.ndarray | None]


def full_scores(
    items: np.ndarray, bias: np.ndarray, queries: np.ndarray, alone: list[bool] | None = None
) -> np.ndarray:
    """float32 (B, n) scores of every item, rounded as `Ranker` rounds them: queries it
    ranks alone (by default: batches below 3) in one-row products, the others together."""
    session = make_session(build_matmul_graph(), [CPU], intra_op_threads=1)
    block = np.vstack([items.T, bias[None, :]]).astype(np.float32)
    augmented = np.hstack([queries, np.ones((len(queries), 1))]).astype(np.float32)
    alone = [len(queries) < 3] * len(queries) if alone is None else alone
    together = np.asarray(session.run(None, {"queries": augmented, "items": block})[0])
    for b in (b for b in range(len(queries)) if alone[b]):
        together[b] = session.run(None, {"queries": augmented[b : b + 1], "items": block})[0][0]
    return together


def ranked_alone(exclude: Rows | None, batch: int, fetch_limit: int = 1024) -> list[bool]:
    """`Ranker`'s rule for batches up to 64 rows: heavy excluders, and everyone in a batch
    of fewer than 3 light queries, are ranked alone."""
    sizes = [0 if e is None else len(e) for e in (exclude or [None] * batch)]
    heavy = [size > fetch_limit for size in sizes]
    few = batch - sum(heavy) < 3
    return [h or few for h in heavy]


def reference(
    items: np.ndarray,
    bias: np.ndarray,
    queries: np.ndarray,
    k: int,
    exclude: Rows | None = None,
    fetch_limit: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """A full sort of the float32 scores by (score desc, row asc) over the eligible rows."""
    alone = ranked_alone(exclude, len(queries), fetch_limit)
    scores = full_scores(items, bias, queries, alone)
    out_rows = np.full((len(queries), k), PAD_ROW, dtype=np.int64)
    out_scores = np.full((len(queries), k), PAD_SCORE, dtype=np.float32)
    for b in range(len(queries)):
        rows = np.arange(len(items))
        never = None if exclude is None else exclude[b]
        if never is not None:
            rows = rows[~np.isin(rows, never)]
        order = np.lexsort((rows, -scores[b, rows]))[:k]
        out_rows[b, : len(order)] = rows[order]
        out_scores[b, : len(order)] = scores[b, rows[order]]
    return out_rows, out_scores


def check(
    items: np.ndarray,
    bias: np.ndarray,
    queries: np.ndarray,
    k: int,
    exclude: Rows | None = None,
    small_batch_rows: int = 2,
    max_candidate_share: float = 0.05,
    **settings: int,
) -> CompactRanker:
    """CompactRanker == full float32 sort == Ranker, rows and scores to the bit."""
    compact = CompactRanker(
        items, bias, threads=1, small_batch_rows=small_batch_rows,
        max_candidate_share=max_candidate_share, **settings,
    )  # fmt: skip
    rows, scores = compact.topk(queries, k, exclude=exclude)
    fetch_limit = settings.get("exclude_fetch_limit", 1024)
    want_rows, want_scores = reference(items, bias, queries, k, exclude, fetch_limit)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)
    ranker_rows, ranker_scores = Ranker(items, bias, threads=1, **settings).topk(
        queries, k, exclude
    )
    np.testing.assert_array_equal(rows, ranker_rows)
    np.testing.assert_array_equal(scores, ranker_scores)
    assert rows.dtype == np.int64 and scores.dtype == np.float32
    return compact


def gaussian(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    return items, rng.standard_normal(n, dtype=np.float32) * np.float32(0.1)


def queries(batch: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, dim), dtype=np.float32)


@pytest.mark.parametrize("small_batch_rows", [0, 2, 64])  # MatMulInteger only, default, NBits
@pytest.mark.parametrize("batch", [1, 2, 32])
def test_random_catalogue_matches_full_sort(batch: int, small_batch_rows: int) -> None:
    items, bias = gaussian(4000, 16, seed=batch)
    compact = check(
        items, bias, queries(batch, 16, seed=7), k=20, small_batch_rows=small_batch_rows
    )
    assert (compact._small_session is None) == (small_batch_rows == 0)
    assert compact.scan_bytes(batch) == 4000 * (16 + 4 + 4 if batch <= small_batch_rows else 20 + 4)
    # The int8 scan settled every query: K' was a small share of the catalogue.
    assert compact.stats.full_scans == 0 and compact.stats.retries == 0
    assert compact.stats.rescored < 4000 * batch / 10


def test_error_bound_holds_for_every_item() -> None:
    """|t * s * code product - float32 score| <= E for every non-outlier row, and the bound
    is not vacuous (within 20x of the largest error actually seen)."""
    items, bias = gaussian(3000, 16, seed=3)
    items[5] *= 1000.0  # an outlier, left out of the bound
    codes, book = quantise(items, bias, outlier_fraction=1e-3)
    assert book.outliers.tolist() == [5]
    q = queries(8, 16, seed=4)
    q_codes, step = quantise_queries(q)
    products = (q_codes.astype(np.int64) - QUERY_ZERO_POINT) @ codes[:, :3000].astype(np.int64)
    approx = step[:, None] * book.scale * products
    errors = np.abs(approx - full_scores(items, bias, q).astype(np.float64))
    errors[:, 5] = 0.0
    bound = error_bound(book, q, q_codes, step)
    assert (errors <= bound[:, None]).all()
    assert (bound < 20 * errors.max(axis=1)).all()


def test_float_query_bound_holds_for_every_item() -> None:
    """The same for the small-batch scan (MatMulNBits, float queries): every row's
    approximate score, read back from a top-k over the whole catalogue, is within E."""
    items, bias = gaussian(3000, 16, seed=30)
    items[7] *= 1000.0
    compact = CompactRanker(items, bias, threads=1, outlier_fraction=1e-3)
    outliers = compact.book.outliers
    assert 7 in outliers
    q = np.vstack([queries(3, 16, seed=31), np.zeros((1, 16), np.float32)])
    width = np.array([compact.book.width], dtype=np.int64)
    feed = {"queries": q, "k": width, "k_groups": width // 32}
    approx, rows = compact._small_session.run(["approx", "rows"], feed)
    keep = rows < 3000
    errors = np.zeros((4, 3000))
    for b in range(4):
        exact = full_scores(items, bias, q[b : b + 1])[0, rows[b][keep[b]]]
        errors[b, rows[b][keep[b]]] = np.abs(approx[b][keep[b]].astype(np.float64) - exact)
    errors[:, outliers] = 0.0
    bound = float_query_bound(compact.book, q)
    assert (errors <= bound[:, None]).all()
    assert (bound[:3] < 20 * errors[:3].max(axis=1)).all()


@pytest.mark.parametrize("share", [0.05, 1.0])  # a retry scored in full, or scanned wider
@pytest.mark.parametrize("batch", [2, 32])  # both scan kernels
def test_near_ties_and_duplicate_rows(batch: int, share: float) -> None:
    """A thousand rows within float32 rounding of each other at the top, some identical:
    the int8 scan cannot tell them apart, the exact pass must, ties to the lower row."""
    items, bias = gaussian(4000, 8, seed=5)
    rng = np.random.default_rng(6)
    top = rng.choice(4000, 1000, replace=False)
    base = np.full(8, 0.9, dtype=np.float32)
    items[top] = base + rng.integers(-3, 4, (1000, 8)).astype(np.float32) * np.float32(1e-7)
    items[top[:50]] = base  # exact duplicates
    bias[top] = np.float32(0.5) + rng.integers(-2, 3, 1000).astype(np.float32) * np.float32(6e-8)
    compact = check(items, bias, np.ones((batch, 8), dtype=np.float32), k=100,
                    max_candidate_share=share)  # fmt: skip
    assert compact.stats.retries > 0  # the bound could not settle the first K'
    assert (compact.stats.full_scans > 0) == (share < 1)


@pytest.mark.parametrize("factor", [1e-20, 1e-4, 1e4, 1e18])
def test_huge_and_tiny_norms(factor: float) -> None:
    items, bias = gaussian(2000, 16, seed=8)
    items *= np.float32(factor)
    bias *= np.float32(factor)
    check(items, bias, queries(3, 16, seed=9), k=50)


def test_a_few_huge_items_are_outliers_and_still_ranked() -> None:
    items, bias = gaussian(3000, 16, seed=10)
    huge = [17, 1500, 2999]
    items[huge] *= np.float32(1e4)
    bias[2000] = np.float32(1e5)  # a huge bias: always first
    q = queries(32, 16, seed=11)
    compact = check(items, bias, q, k=30)
    outliers = set(compact.book.outliers.tolist())
    assert {17, 1500, 2000, 2999} <= outliers and len(outliers) <= 16
    assert compact.stats.full_scans == 0


def test_zero_rows_and_zero_query() -> None:
    """All scores equal the bias, with many equal biases: a pure tie-breaking test."""
    items, bias = gaussian(3000, 8, seed=12)
    items[::2] = 0.0
    bias[:] = np.float32(0.25)
    bias[[9, 2000, 2500]] = np.float32(1.0)
    q = np.vstack([np.zeros((1, 8), np.float32), queries(2, 8, seed=13)])
    check(items, bias, q, k=40)
    rows, _ = CompactRanker(items, bias, threads=1).topk(q[:1], 5)
    assert rows.tolist() == [[9, 2000, 2500, 0, 1]]


def test_all_zero_catalogue() -> None:
    items = np.zeros((500, 4), np.float32)
    check(items, np.zeros(500, np.float32), queries(2, 4, seed=14), k=10)


@pytest.mark.parametrize("batch", [1, 32])
def test_k_beyond_catalogue_is_padded(batch: int) -> None:
    items, bias = gaussian(70, 4, seed=15)
    exclude: Rows = [np.array([0, 69])] + [None] * (batch - 1)
    check(items, bias, queries(batch, 4, seed=16), k=100, exclude=exclude)


@pytest.mark.parametrize("fetch_limit", [0, 50, 100_000])  # heavy users ranked alone or not
@pytest.mark.parametrize("batch", [1, 32])
def test_exclusions(fetch_limit: int, batch: int) -> None:
    items, bias = gaussian(3000, 16, seed=17)
    q = queries(batch, 16, seed=18)
    scores = full_scores(items, bias, q)
    rng = np.random.default_rng(19)
    exclude: Rows = [np.argsort(-scores[0])[:500]]  # the whole top of the first query
    exclude += [np.sort(rng.choice(3000, 20, replace=False)) if b % 2 else None
                for b in range(1, batch)]  # fmt: skip
    check(items, bias, q, k=25, exclude=exclude, exclude_fetch_limit=fetch_limit)


def test_allow_lists_match_ranker() -> None:
    items, bias = gaussian(3000, 16, seed=20)
    q = queries(4, 16, seed=21)
    allow: Rows = [None, np.array([9, 1, 3, 3, 2900, 2, 9]), np.array([], np.int64), None]
    exclude: Rows = [None, np.array([3]), None, np.array([5, 6])]
    got = CompactRanker(items, bias, threads=1).topk(q, 5, exclude=exclude, allow=allow)
    want = Ranker(items, bias, threads=1).topk(q, 5, exclude=exclude, allow=allow)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert set(got[0][1, :4].tolist()) == {1, 2, 9, 2900} and got[0][1, 4] == PAD_ROW
    assert (got[0][2] == PAD_ROW).all()


def test_scores_for_matches_ranker() -> None:
    items, bias = gaussian(100, 4, seed=22)
    q = queries(2, 4, seed=23)
    rows = np.array([[0, 5, -1], [99, 3, 3]])
    got = CompactRanker(items, bias, threads=1).scores_for(q, rows)
    np.testing.assert_array_equal(got, Ranker(items, bias, threads=1).scores_for(q, rows))


def test_memory_mapped_factors(tmp_path: object) -> None:
    from pathlib import Path

    items, bias = gaussian(3000, 8, seed=24)
    path = Path(str(tmp_path)) / "items.npy"
    np.save(path, items)
    mapped = np.load(path, mmap_mode="r")
    compact = CompactRanker(mapped, bias, threads=1)
    assert np.shares_memory(compact.item_factors, mapped)  # read in place, never copied
    rows, _ = compact.topk(queries(2, 8, seed=25), 10)
    np.testing.assert_array_equal(rows, reference(items, bias, queries(2, 8, seed=25), 10)[0])


def test_shared_codes_file_read_in_place_ranks_as_the_packed_copy(tmp_path: object) -> None:
    """Workers' CompactRankers scan one mapped file of codes (no packed private copy), exactly."""
    from pathlib import Path

    from bertrec.server.shared_layout import LayoutCache

    layout = LayoutCache(Path(str(tmp_path)), ("c" * 64,))
    items, bias = gaussian(5000, 16, seed=31)
    first = CompactRanker(items, bias, threads=1, layout=layout)
    second = CompactRanker(items, bias, threads=1, layout=layout)
    heap = CompactRanker(items, bias, threads=1)
    (codes,) = Path(str(tmp_path)).glob("int8-codes-*.npy")
    assert np.load(codes).shape == (17, 5024)
    assert set(second._shared_codes) == {"items"} and heap._shared_codes == {}
    exclude = [np.array([1, 2, 3])] + [None] * 31
    for batch in (1, 32):  # MatMulNBits (private), MatMulInteger (the shared codes)
        q = queries(batch, 16, seed=32)
        want_rows, want_scores = reference(items, bias, q, 15, exclude[:batch])
        for ranker in (first, second, heap):
            rows, scores = ranker.topk(q, 15, exclude=exclude[:batch])
            np.testing.assert_array_equal(rows, want_rows)
            np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.topk(np.zeros((1, 3), np.float32), 5),
        lambda r: r.topk(np.zeros((1, 4), np.float32), 0),
        lambda r: r.topk(np.full((1, 4), np.nan, np.float32), 5),
        lambda r: r.topk(np.zeros((1, 4), np.float32), 5, exclude=[np.array([100])]),
        lambda r: r.topk(np.zeros((2, 4), np.float32), 5, allow=[None]),
        lambda r: r.topk(np.zeros((1, 4), np.float32), 5, allow=[np.array([0.5])]),
    ],
)
def test_bad_input_is_refused(call: object) -> None:
    items, bias = gaussian(100, 4, seed=26)
    with pytest.raises(ValueError):
        call(CompactRanker(items, bias, threads=1))  # type: ignore[operator]
