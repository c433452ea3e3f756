"""RecommendResponse bytes encoded for a whole batch (`server.wire`) are protobuf's own, byte for
byte, or the batch is left to protobuf; `Model.rank` attaches them only where asked."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bertrec.bench.synthetic import MODEL, build_synthetic_repo
from bertrec.server.config import ServerConfig
from bertrec.server.engine import ModelRef, RankedRows, Recommender
from bertrec.server.metrics import ServerMetrics
from bertrec.server.model import Model, RankQuery, load_model
from bertrec.server.service import recommend_response
from bertrec.server.wire import MAX_ID_BYTES, WIRE_FROM, RecommendWire
from bertrec.v1 import recommender_pb2 as pb

RNG = np.random.default_rng(7)


def protobuf_bytes(ids, rows, scores, ratings, count, name="m", version=3) -> bytes:
    response = pb.RecommendResponse(model=pb.ModelRef(name=name, version=version))
    for j in range(count):
        response.items.add(item_id=str(ids[rows[j]]), score=float(scores[j]),
                           predicted_rating=float(ratings[j]), rank=j + 1)  # fmt: skip
    return response.SerializeToString()


def encode(ids, counts, width=None, scores=None, ratings=None, name="m", version=3, rows=None):
    """(wire responses or None, and protobuf's bytes for each query). Past its count a query's
    entries are padding, as `Model.rank` has them: row -1, score -inf."""
    width = width or max(max(counts), 1)
    shape = (len(counts), width)
    rows = RNG.integers(0, len(ids), shape) if rows is None else rows
    scores = RNG.standard_normal(shape).astype(np.float32) if scores is None else scores
    ratings = RNG.uniform(0.5, 5, shape).astype(np.float32) if ratings is None else ratings
    padding = np.arange(width) >= np.asarray(counts)[:, None]
    rows[padding], scores[padding] = -1, -np.inf
    got = RecommendWire(np.asarray(ids), name, version).responses(rows, scores, ratings, counts)
    want = [
        protobuf_bytes(ids, rows[b], scores[b], ratings[b], n, name, version)
        for b, n in enumerate(counts)
    ]
    return got, want


def test_a_batch_is_encoded_as_protobuf_does_byte_for_byte() -> None:
    ids = [f"item-{i:05d}" for i in range(500)] + ["x", "y" * MAX_ID_BYTES, "a\x00b"]
    got, want = encode(ids, [10, 3, 0, 10, 1, 127], width=127)
    assert got == want
    for raw in got:  # and parse back
        assert pb.RecommendResponse.FromString(raw).model.version == 3


@pytest.mark.parametrize("counts", [[10, 10, 10, 10], [10, 4, 10, 0]])
def test_ids_of_one_length_take_the_short_way_to_the_same_bytes(counts: list[int]) -> None:
    got, want = encode([f"i{i:07d}" for i in range(1000)], counts, width=10)
    assert got == want


def test_negative_zero_is_sent_as_protobuf_sends_it() -> None:
    scores = np.full((2, 3), -0.0, dtype=np.float32)
    got, want = encode(["a", "b", "c"], [3, 2], scores=scores, ratings=scores + 1)
    assert got == want
    assert struct.pack("<f", -0.0) in got[0]


@pytest.mark.parametrize(
    "case",
    ["non-ascii id", "long id", "zero score", "zero rating", "rank past 127", "long model name"],
)
def test_what_one_byte_lengths_cannot_say_is_left_to_protobuf(case: str) -> None:
    ids = ["a", "b", "c"]
    counts, scores, ratings, name = [3, 3], None, None, "m"
    if case == "non-ascii id":
        ids = ["a", "é", "c"] * 40
        counts = [120, 120]
    elif case == "long id":
        ids = ["a", "z" * (MAX_ID_BYTES + 1)] * 50
        counts = [100, 100]
    elif case == "zero score":
        scores = np.zeros((2, 3), dtype=np.float32)
    elif case == "zero rating":
        ratings = np.zeros((2, 3), dtype=np.float32)
    elif case == "rank past 127":
        counts = [128, 1]
    else:
        name = "n" * 200
    got, want = encode(ids, counts, scores=scores, ratings=ratings, name=name)
    assert got is None
    assert all(pb.RecommendResponse.FromString(raw) for raw in want)  # protobuf still can


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(
        st.text(st.characters(max_codepoint=0x7F), min_size=1, max_size=MAX_ID_BYTES + 1),
        min_size=1, max_size=40, unique=True,
    ),
    counts=st.lists(st.integers(0, 12), min_size=1, max_size=9),
    zero_at=st.one_of(st.none(), st.integers(0, 200)),
)  # fmt: skip
def test_any_batch_is_protobufs_bytes_or_left_to_protobuf(
    ids: list[str], counts: list[int], zero_at: int | None
) -> None:
    ids = [i for i in ids if not i.endswith("\x00")] or ["a"]  # numpy drops trailing NULs
    width = max(max(counts), 1)
    scores = RNG.standard_normal((len(counts), width)).astype(np.float32)
    if zero_at is not None:  # a score of +0.0 somewhere: left to protobuf if answered
        scores.flat[zero_at % scores.size] = 0.0
    got, want = encode(ids, counts, width, scores=scores)
    if got is not None:
        assert got == want
    else:
        answered = np.arange(width) < np.asarray(counts)[:, None]
        assert (scores[answered] == 0).any() or max(map(len, ids)) > MAX_ID_BYTES


def test_one_long_id_in_the_catalogue_leaves_only_the_batches_that_answer_it_to_protobuf() -> None:
    """The id array is as wide as its longest id; the encoder reads MAX_ID_BYTES + 1 columns."""
    ids = [f"item-{i:05d}" for i in range(100)] + ["x" * 5000]
    rows = RNG.integers(0, 100, (3, 10))
    got, want = encode(ids, [10, 10, 7], rows=rows)
    assert got == want
    rows[1, 2] = 100  # the long one
    got, _ = encode(ids, [10, 10, 7], rows=rows)
    assert got is None


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    repo = build_synthetic_repo(tmp_path_factory.mktemp("wire"), n_items=300, n_users=50, dim=8)
    loaded = load_model(ServerConfig(model_repo=Path(repo), model=MODEL, ranker_threads=1))
    assert isinstance(loaded, Model)
    return loaded


def queries(model: Model, n: int, wire: bool) -> list[RankQuery]:
    return [
        RankQuery(model.user_vector(u), 10, model.rated_rows(u), user_row=u, wire=wire)
        for u in range(n)
    ]


def test_rank_attaches_the_response_protobuf_would_build(model: Model) -> None:
    asked = queries(model, WIRE_FROM + 2, wire=True)
    results = model.rank(asked)
    for result in results:
        assert result.wire is not None
        rows = RankedRows(
            model.item_ids_of(result.rows), result.scores, result.ratings,  # type: ignore[arg-type]
            ModelRef(model.name, model.version),
        )  # fmt: skip
        assert result.wire == recommend_response(rows).SerializeToString()


def test_rank_encodes_nothing_unasked_or_for_a_small_batch(model: Model) -> None:
    assert all(r.wire is None for r in model.rank(queries(model, WIRE_FROM + 2, wire=False)))
    assert all(r.wire is None for r in model.rank(queries(model, WIRE_FROM - 1, wire=True)))
    mixed = queries(model, WIRE_FROM, wire=True) + queries(model, 3, wire=False)
    assert [r.wire is not None for r in model.rank(mixed)] == [True] * WIRE_FROM + [False] * 3


def test_only_a_caller_that_sends_the_bytes_on_has_them_encoded(model: Model) -> None:
    """Recommend asks (`wire=True`); other users of `submit_recommend` (OIP, the futures API)
    and explained calls do not, so no batch encodes bytes nobody sends."""
    config = ServerConfig(model_repo=model.version_dir.parent.parent, model=MODEL, ranker_threads=1)
    engine = Recommender(model, config, ServerMetrics())  # batchers not started: queued only
    user = str(model.arrays.user_ids[0])
    for asked, explain, wanted in [(False, False, False), (True, False, True), (True, True, False)]:
        engine.submit_recommend(user, 5, True, [], [], time.monotonic() + 60, explain, wire=asked)
        assert engine.ranker._queue[-1].item.wire is wanted
