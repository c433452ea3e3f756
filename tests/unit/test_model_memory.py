"""One heap copy of the item factors per loaded version, and exact cosines from that copy.

A loaded version used to hold three (n_items, d) matrices on the heap besides the memory-mapped
file: the ranker's layout, a normalised copy for SimilarItems and that copy's own ranker layout.
Now cosines scan the ranker's matrix with a per-item 1 / |item| (`Ranker.scaled`). Heap copies
are counted with tracemalloc in numpy's allocation domain, where a memory map never appears.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from bertrec.bench.synthetic import MODEL, build_synthetic_repo
from bertrec.server.config import ServerConfig
from bertrec.server.model import Model, RankQuery, load_model
from bertrec.server.ranking import PAD_ROW, PAD_SCORE, Ranker
from bertrec.server.shared_layout import LAYOUT_DIR_ENV

NUMPY_TRACE_DOMAIN = 389047  # numpy's tracemalloc domain for array buffers
N_ITEMS, DIM = 20_000, 128  # a 10 MB matrix, large next to the version's Python objects


def numpy_heap_bytes() -> int:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.DomainFilter(inclusive=True, domain=NUMPY_TRACE_DOMAIN)]
    )
    return sum(t.size for t in snapshot.traces)


def traced(build: Callable[[], object]) -> tuple[object, int, int]:
    """`build()`, the numpy heap bytes it left allocated, and the traced peak (all domains)."""
    tracemalloc.start()
    try:
        start = numpy_heap_bytes()
        built = build()
        return built, numpy_heap_bytes() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model-memory")
    return build_synthetic_repo(root, n_items=N_ITEMS, n_users=50, dim=DIM)


@pytest.fixture(scope="module")
def loaded(repo: Path) -> Iterator[tuple[Model, int, int]]:
    config = ServerConfig(model_repo=repo, model=MODEL, ranker_threads=1, intra_op_threads=1)
    model, held, peak = traced(lambda: load_model(config))
    assert isinstance(model, Model)
    yield model, held, peak


def test_loaded_version_holds_one_heap_copy_of_item_factors(
    loaded: tuple[Model, int, int],
) -> None:
    model, held, peak = loaded
    matrix = model.arrays.item_factors.nbytes
    assert matrix == N_ITEMS * DIM * 4
    # The ranker's (d + 1, n) layout plus vectors of n floats; three copies before the fix.
    assert matrix <= held < 1.25 * matrix
    # Loading never holds a second matrix, even briefly (norms were an (n, d) temporary).
    assert peak < 1.75 * matrix


def test_similarity_reads_the_ranker_matrix_and_the_mmap(loaded: tuple[Model, int, int]) -> None:
    model = loaded[0]
    assert np.shares_memory(model.similarity._items, model.ranker._items)
    assert np.shares_memory(model.ranker.item_factors, model.arrays.item_factors)
    assert not model.arrays.item_factors.flags.owndata  # a view of the memory map


def test_with_a_layout_directory_the_version_holds_no_heap_copy_and_ranks_the_same(
    repo: Path, loaded: tuple[Model, int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker of `--workers N` maps the run's layout file instead of building a heap copy."""
    monkeypatch.setenv(LAYOUT_DIR_ENV, str(tmp_path))
    config = ServerConfig(model_repo=repo, model=MODEL, ranker_threads=1, intra_op_threads=1)
    model, held, _ = traced(lambda: load_model(config))
    assert isinstance(model, Model)
    matrix = model.arrays.item_factors.nbytes
    assert held < 0.2 * matrix  # only vectors of n floats (norms, the twin's scale)
    assert not model.ranker._items.flags.writeable
    assert np.shares_memory(model.similarity._items, model.ranker._items)
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.npy")) == [
        "item",
        "ranker",
        "user",
    ]
    heap = loaded[0]
    queries = [RankQuery(v, 10) for v in np.random.default_rng(5).standard_normal((3, DIM))]
    for a, b in zip(model.rank(queries) + model.similar(queries),
                    heap.rank(queries) + heap.similar(queries), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.scores, b.scores)
    rows = np.array([0, 5, N_ITEMS - 1])
    assert model.item_ids_of(rows) == [heap.item_ids[int(r)] for r in rows]
    assert model.item_rows(model.item_ids_of(rows)).tolist() == rows.tolist()
    users = [str(u) for u in model.arrays.user_ids[:3]]
    assert model.training_rows([*users, "nobody"]).tolist() == [0, 1, 2, -1]
    assert [model.training_row(u) for u in users] == [0, 1, 2]


def test_similar_gives_exact_cosines(loaded: tuple[Model, int, int]) -> None:
    model = loaded[0]
    items = np.asarray(model.arrays.item_factors, dtype=np.float64)
    unit = items / np.linalg.norm(items, axis=1, keepdims=True)
    row = 123
    np.testing.assert_allclose(model.unit_item(row), unit[row], rtol=1e-6)
    query = RankQuery(model.unit_item(row), 10, exclude=np.array([row], np.int64))
    got = model.similar([query])[0]
    cosines = unit @ unit[row]
    cosines[row] = -np.inf
    want = np.lexsort((np.arange(N_ITEMS), -cosines))[:10]
    np.testing.assert_array_equal(got.rows, want)
    np.testing.assert_allclose(got.scores, cosines[want], atol=1e-6)


def reference(
    items: np.ndarray, scale: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Full sort by (score desc, row asc) of (q . item) * scale, `exclude` rows removed."""
    scores = (queries.astype(np.float64) @ items.T.astype(np.float64)) * scale
    rows = np.full((len(queries), k), PAD_ROW, dtype=np.int64)
    out = np.full((len(queries), k), PAD_SCORE, dtype=np.float32)
    keep = np.setdiff1d(np.arange(len(items)), exclude)
    for b in range(len(queries)):
        order = keep[np.lexsort((keep, -scores[b, keep]))][:k]
        rows[b, : len(order)], out[b, : len(order)] = order, scores[b, order]
    return rows, out


@pytest.mark.parametrize("fetch_limit", [0, 1024])  # masked scan / fetch k + excluded
@pytest.mark.parametrize("k", [1, 7, 200])  # 200 > the 70 items: padded tails
def test_scaled_twin_matches_full_sort_with_ties(fetch_limit: int, k: int) -> None:
    rng = np.random.default_rng(k)
    items = rng.integers(-2, 3, (70, 5)).astype(np.float32)
    scale = (2.0 ** rng.integers(-2, 3, 70)).astype(np.float32)  # exact products, ties kept
    bias = rng.integers(-2, 3, 70).astype(np.float32)  # the twin ignores the bias
    queries = rng.integers(-2, 3, (4, 5)).astype(np.float32)
    exclude = np.array([3, 40, 41], np.int64)
    twin = Ranker(items, bias, exclude_fetch_limit=fetch_limit).scaled(scale)
    rows, scores = twin.topk(queries, k, exclude=[exclude] * 4)
    want_rows, want_scores = reference(items, scale, queries, k, exclude)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(scores, want_scores)
    np.testing.assert_array_equal(twin.scores_for(queries, rows[:, :5]), want_scores[:, :5])
    only = [np.array([0, 3, 9, 50]), None, None, None]
    subset_rows, _ = twin.topk(queries, 2, exclude=[exclude] * 4, allow=only)
    want = reference(items[[0, 9, 50]], scale[[0, 9, 50]], queries[:1], 2, np.array([], int))
    np.testing.assert_array_equal(subset_rows[0], np.array([0, 9, 50])[want[0][0]])


def test_scaled_twin_allocates_no_matrix() -> None:
    items = np.random.default_rng(0).standard_normal((50_000, 32)).astype(np.float32)
    ranker = Ranker(items, np.zeros(len(items), np.float32))
    twin, held, _ = traced(lambda: ranker.scaled(np.ones(len(items), np.float32)))
    assert isinstance(twin, Ranker)
    assert held < items.nbytes / 4  # two vectors of n floats, not (n, d)
    # Two (rows, n) buffers per run instead of one: half the rows keeps the arena's size.
    assert twin.max_batch_rows == ranker.max_batch_rows // 2


@pytest.mark.parametrize("scale", [np.ones(3), np.array([1.0, np.inf, 1.0, 1.0])])
def test_scaled_rejects_bad_scale(scale: np.ndarray) -> None:
    with pytest.raises(ValueError, match="scale"):
        Ranker(np.ones((4, 2), np.float32), np.zeros(4, np.float32)).scaled(scale)
