"""Ranker against an independent numpy ranking: ties, exclusions, allow-lists, padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bertrec.server.providers import CPU, make_session
from bertrec.server.ranking import GROUP_WIDTH, PAD_ROW, PAD_SCORE, Ranker, build_topk_graph

Rows = list[np.ndarray | None]


def reference(
    items: np.ndarray,
    bias: np.ndarray,
    queries: np.ndarray,
    k: int,
    exclude: Rows | None = None,
    allow: Rows | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Full sort by (score desc, row asc) over the eligible rows; float64 scores."""
    scores = queries.astype(np.float64) @ items.T.astype(np.float64) + bias
    out_rows = np.full((len(queries), k), PAD_ROW, dtype=np.int64)
    out_scores = np.full((len(queries), k), PAD_SCORE, dtype=np.float32)
    for b in range(len(queries)):
        rows = np.arange(len(items))
        only = None if allow is None else allow[b]
        if only is not None:
            rows = np.unique(only)
        never = None if exclude is None else exclude[b]
        if never is not None:
            rows = rows[~np.isin(rows, never)]
        order = np.lexsort((rows, -scores[b, rows]))[:k]
        out_rows[b, : len(order)] = rows[order]
        out_scores[b, : len(order)] = scores[b, rows[order]]
    return out_rows, out_scores


def integer_catalogue(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Small integers: every score is exact in float32, and ties are everywhere."""
    rng = np.random.default_rng(seed)
    items = rng.integers(-2, 3, (n, dim)).astype(np.float32)
    return items, rng.integers(-2, 3, n).astype(np.float32)


def integer_queries(batch: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-2, 3, (batch, dim)).astype(np.float32)


@pytest.mark.parametrize("n", [5, 64, 3000])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_topk_matches_full_sort_with_ties(n: int, batch: int, k: int) -> None:
    items, bias = integer_catalogue(n, 6, seed=n)
    queries = integer_queries(batch, 6, seed=batch)
    rows, scores = Ranker(items, bias).topk(queries, k)
    want_rows, want_scores = reference(items, bias, queries, k)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)
    assert rows.dtype == np.int64 and scores.dtype == np.float32


@pytest.mark.parametrize("fetch_limit", [0, 7, 10_000])  # mask all, mask heavy, fetch all
def test_exclusions_and_allow_lists(fetch_limit: int) -> None:
    n, k = 500, 20
    items, bias = integer_catalogue(n, 5, seed=1)
    queries = integer_queries(6, 5, seed=2)
    rng = np.random.default_rng(3)
    exclude: Rows = [
        None,
        np.sort(rng.choice(n, 5, replace=False)).astype(np.int32),
        np.sort(rng.choice(n, 300, replace=False)).astype(np.int32),  # a heavy rater
        np.arange(n - 10, dtype=np.int32),  # fewer than k items left
        np.array([1, 2], dtype=np.int32),
        np.array([], dtype=np.int32),
    ]
    allow: Rows = [
        None,
        None,
        None,
        None,
        np.array([9, 1, 3, 3, 400, 2, 9]),  # unsorted, duplicates, excluded rows
        np.array([], dtype=np.int64),  # nothing allowed
    ]
    ranker = Ranker(items, bias, exclude_fetch_limit=fetch_limit)
    rows, scores = ranker.topk(queries, k, exclude=exclude, allow=allow)
    want_rows, want_scores = reference(items, bias, queries, k, exclude, allow)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)
    assert (rows[3, 10:] == PAD_ROW).all() and np.isneginf(scores[3, 10:]).all()
    assert list(rows[4, :3]) == list(want_rows[4, :3]) and (rows[4, 3:] == PAD_ROW).all()
    assert (rows[5] == PAD_ROW).all()


@pytest.mark.parametrize("seed", range(6))
def test_a_batch_filters_each_querys_own_exclusions(seed: int) -> None:
    """The batch's exclusions are filtered in one pass (`_without`): each query must lose its
    own rows only, whatever their order, duplicates or integer type, and a row excluded by the
    next query's list (the neighbouring keys) must stay."""
    n, k, batch = 300, 15, 9
    items, bias = integer_catalogue(n, 4, seed=seed)
    queries = integer_queries(batch, 4, seed=seed + 100)
    rng = np.random.default_rng(seed)
    dtypes = [np.int32, np.int64, np.uint32, np.uint64, np.int16]
    exclude: Rows = []
    for b in range(batch):
        size = int(rng.integers(0, 60))
        never = rng.integers(0, n, size).astype(dtypes[b % len(dtypes)])  # unsorted, repeats
        exclude.append(None if b == 4 else never)
    exclude[1] = np.array([0, n - 1])  # the smallest and largest keys of its block
    exclude[2] = np.arange(n - 5)  # fewer than k rows left: padded
    rows, scores = Ranker(items, bias).topk(queries, k, exclude=exclude)
    want_rows, want_scores = reference(items, bias, queries, k, exclude)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)
    assert (rows[2, 5:] == PAD_ROW).all() and np.isneginf(scores[2, 5:]).all()


@pytest.mark.parametrize(("dim", "batch"), [(24, 1), (24, 3), (24, 5), (24, 33), (128, 8),
                                           (129, 8), (256, 33)])  # fmt: skip
def test_the_catalogue_packed_once_ranks_to_the_bit_as_fed_per_run(dim: int, batch: int) -> None:
    """Multi-row runs read a copy ONNX Runtime packed once; it must round every dot product as
    the fed catalogue does (the int8 ranker's re-scoring relies on the fed rounding), and a
    one-row run must not use it (its vector kernel rounds differently). Wider than 128 + 1
    the packed kernel sums in another order here: the probe must then drop the packed copy."""
    rng = np.random.default_rng(batch + dim)
    items = rng.standard_normal((3000, dim)).astype(np.float32)
    bias = rng.standard_normal(3000).astype(np.float32)
    queries = rng.standard_normal((batch, dim)).astype(np.float32)
    packed, fed = Ranker(items, bias), Ranker(items, bias, prepack_max_bytes=0)
    assert fed._packed_session is None
    if dim <= 128:  # where it pays on this machine, it is used
        assert packed._packed_session is not None
    rows, scores = packed.topk(queries, 50)
    want_rows, want_scores = fed.topk(queries, 50)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize("fetch_limit", [0, 1024])
def test_k_beyond_catalogue_is_padded(fetch_limit: int) -> None:
    items, bias = integer_catalogue(7, 3, seed=4)
    queries = integer_queries(2, 3, seed=5)
    ranker = Ranker(items, bias, exclude_fetch_limit=fetch_limit)
    rows, scores = ranker.topk(queries, 12, exclude=[np.array([0, 6]), None])
    want_rows, want_scores = reference(items, bias, queries, 12, [np.array([0, 6]), None])
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)
    assert (rows[0, 5:] == PAD_ROW).all() and (rows[1, 7:] == PAD_ROW).all()


def test_equal_scores_resolve_to_lower_rows() -> None:
    items = np.zeros((1000, 4), dtype=np.float32)
    bias = np.zeros(1000, dtype=np.float32)
    bias[[3, 500, 999]] = 1.0
    rows, scores = Ranker(items, bias).topk(np.ones((1, 4)), 6)
    assert rows.tolist() == [[3, 500, 999, 0, 1, 2]]
    assert scores.tolist() == [[1, 1, 1, 0, 0, 0]]


def test_onnxruntime_topk_breaks_ties_by_lower_index() -> None:
    """The graph relies on ONNX TopK's rule: of equal values, the lower index comes first."""
    session = make_session(build_topk_graph(), [CPU])
    items = np.zeros((3, GROUP_WIDTH), np.float32)  # (d + 1, n): factors transposed, bias last
    items[0, [1, 3, 4]] = 1
    items[2, 6:] = PAD_SCORE  # 6 items padded to one whole group
    feed = {
        "queries": np.array([[1, 0, 1], [0, 1, 1]], dtype=np.float32),  # (B, d + 1)
        "items": items,
        "k": np.array([4], dtype=np.int64),
        "k_groups": np.array([1], dtype=np.int64),
    }
    scores, rows = session.run(["scores", "rows"], feed)
    assert rows.tolist() == [[1, 3, 4, 0], [0, 1, 2, 3]]
    assert scores.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("k", [1, 7, 20, 60, 500])
def test_two_stage_topk_is_exact_with_ties_across_groups(k: int) -> None:
    """Scores from three values only: most groups tie on their maximum, and the k-th score ties
    across many groups; the answer must still be the lowest rows among equals."""
    rng = np.random.default_rng(k)
    n = GROUP_WIDTH * 50 + 5  # a partly filled last group
    items = np.zeros((n, 4), dtype=np.float32)
    bias = rng.integers(0, 3, size=n).astype(np.float32)
    rows, scores = Ranker(items, bias).topk(np.zeros((2, 4)), k)
    want_rows, want_scores = reference(items, bias, np.zeros((2, 4), np.float32), k)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)


def test_masked_scan_never_returns_group_padding() -> None:
    items = np.eye(40, 4, dtype=np.float32)
    bias = np.arange(40, dtype=np.float32)
    ranker = Ranker(items, bias, exclude_fetch_limit=0)  # every exclusion takes the masked path
    rows, scores = ranker.topk(np.ones((1, 4)), 10, exclude=[np.arange(3, 40)])
    assert rows.tolist() == [[2, 1, 0] + [PAD_ROW] * 7]
    assert scores[0, 3:].tolist() == [PAD_SCORE] * 7


def test_random_floats_against_float64() -> None:
    rng = np.random.default_rng(6)
    items = rng.standard_normal((20_000, 16), dtype=np.float32)
    bias = rng.standard_normal(20_000, dtype=np.float32)
    queries = rng.standard_normal((3, 16), dtype=np.float32)
    rows, scores = Ranker(items, bias).topk(queries, 50)
    want_rows, want_scores = reference(items, bias, queries, 50)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_memory_mapped_catalogue(tmp_path: Path) -> None:
    items, bias = integer_catalogue(300, 4, seed=7)
    np.save(tmp_path / "items.npy", items)
    np.save(tmp_path / "bias.npy", bias)
    mapped = Ranker(
        np.load(tmp_path / "items.npy", mmap_mode="r"),
        np.load(tmp_path / "bias.npy", mmap_mode="r"),
    )
    queries = integer_queries(2, 4, seed=8)
    np.testing.assert_array_equal(mapped.topk(queries, 9)[0], reference(items, bias, queries, 9)[0])


def test_scores_for() -> None:
    rng = np.random.default_rng(9)
    items = rng.standard_normal((40, 8), dtype=np.float32)
    bias = rng.standard_normal(40, dtype=np.float32)
    queries = rng.standard_normal((2, 8), dtype=np.float32)
    rows = np.array([[0, 39, 5, PAD_ROW], [7, 7, 1, 2]])
    got = Ranker(items, bias).scores_for(queries, rows)
    want = np.einsum("bd,bmd->bm", queries, items[rows]) + bias[rows]
    assert got.shape == (2, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, :3], want[:, :3], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    assert got[0, 3] == PAD_SCORE


def test_scores_for_agrees_with_topk() -> None:
    items, bias = integer_catalogue(200, 5, seed=10)
    ranker = Ranker(items, bias)
    queries = integer_queries(3, 5, seed=11)
    rows, scores = ranker.topk(queries, 8)
    np.testing.assert_array_equal(ranker.scores_for(queries, rows), scores)


def test_bad_arguments() -> None:
    items, bias = integer_catalogue(10, 3, seed=12)
    ranker = Ranker(items, bias)
    q = np.zeros((1, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="k must be"):
        ranker.topk(q, 0)
    with pytest.raises(ValueError, match="queries"):
        ranker.topk(np.zeros((1, 4)), 3)
    with pytest.raises(ValueError, match="finite"):
        ranker.topk(np.full((1, 3), np.nan), 3)
    with pytest.raises(ValueError, match="outside"):
        ranker.topk(q, 3, exclude=[np.array([10])])
    with pytest.raises(ValueError, match="outside"):
        ranker.topk(q, 3, allow=[np.array([-1])])
    with pytest.raises(ValueError, match="entries"):
        ranker.topk(q, 3, exclude=[None, None])
    with pytest.raises(ValueError, match="outside"):
        ranker.scores_for(q, np.array([[10]]))
    with pytest.raises(ValueError, match="item_bias"):
        Ranker(items, bias[:5])


def test_member_matches_isin_for_sorted_and_unsorted_exclusions() -> None:
    from bertrec.server.ranking import _member

    rng = np.random.default_rng(3)
    rows = rng.integers(0, 500, size=200)
    for excluded in (np.sort(rng.choice(500, 80, replace=False)), rng.integers(0, 500, 50)):
        np.testing.assert_array_equal(_member(rows, excluded), np.isin(rows, excluded))
