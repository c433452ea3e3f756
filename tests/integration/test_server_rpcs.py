"""Every RPC of the real server against numpy computed from the exported arrays."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from server_harness import metric_value

from bertrec.client import AsyncRecommenderClient, RecommenderClient, RecommenderError
from bertrec.export.verify import measure_parity
from bertrec.server.wire import WIRE_FROM

USERS = ("u0000", "u0007", "u0039")
TEXT = "a quiet story about a lighthouse keeper and letters from the sea"


def check_ranked(items, expected, ratings) -> None:
    assert [i.item_id for i in items] == [item for item, _ in expected]
    np.testing.assert_allclose([i.score for i in items], [s for _, s in expected], atol=1e-5)
    np.testing.assert_allclose([i.predicted_rating for i in items], ratings, atol=1e-5)
    assert [i.rank for i in items] == list(range(1, len(items) + 1))


@pytest.mark.parametrize("user_id", USERS)
def test_recommend_matches_numpy(client: RecommenderClient, ref, user_id: str) -> None:
    result = client.recommend(user_id, k=10)
    expected = ref.recommend(user_id, 10)
    check_ranked(result.items, expected, [ref.rating(user_id, i) for i, _ in expected])
    assert not set(result.item_ids) & set(ref.rated(user_id))
    assert (result.model.name, result.model.version) == ("tiny", 1)


def test_recommend_with_rated_items_and_filters(client: RecommenderClient, ref) -> None:
    user = "u0003"
    rated = ref.rated(user)
    with_rated = client.recommend(user, k=50, exclude_rated=False)
    expected = ref.recommend(user, 50, exclude_rated=False)
    check_ranked(with_rated.items, expected, [ref.rating(user, i) for i, _ in expected])
    assert set(with_rated.item_ids) & set(rated)
    exclude = tuple(ref.recommend(user, 3))
    exclude_ids = tuple(i for i, _ in exclude)
    result = client.recommend(user, k=5, exclude_item_ids=exclude_ids)
    check_ranked(result.items, ref.recommend(user, 5, exclude=exclude_ids),
                 [ref.rating(user, i.item_id) for i in result.items])  # fmt: skip
    candidates = ("item-00001", "item-00002", "item-00010", "item-00020", "item-00030")
    include = (*[i for i in candidates if i not in rated][:4], rated[0])
    allowed = client.recommend(user, k=50, include_item_ids=include)
    expected = ref.recommend(user, 50, include=include)
    assert rated[0] not in allowed.item_ids  # rated items stay excluded inside the allow-list
    assert len(allowed.items) == len(expected) == 4
    check_ranked(allowed.items, expected, [ref.rating(user, i) for i, _ in expected])


def test_embed_text_matches_onnx_runtime_run_directly(client: RecommenderClient, ref) -> None:
    info = client.model_info()
    texts = ["short text", TEXT, "cookbook of simple vegetarian dishes " * 10]
    for text in texts:  # one text per call: the same batch as the reference run
        got = client.embed_text([text]).vectors
        np.testing.assert_allclose(got, ref.encode([text], info.encoder_file), atol=1e-5)
    several = client.embed_text(texts)
    assert several.vectors.shape == (3, info.dim)
    assert several.vectors.dtype == np.float32
    assert measure_parity(several.vectors, ref.encode(texts, info.encoder_file)).cos_min > 0.99


def test_recommend_for_text_folds_the_text_into_user_space(client: RecommenderClient, ref) -> None:
    vector = client.embed_text([TEXT]).vectors[0].astype(np.float64)
    user_vector = ref.text_to_user @ vector
    result = client.recommend_for_text(TEXT, k=8)
    expected = ref.top(user_vector, 8)
    check_ranked(result.items, expected, [ref.rating(None, i, user_vector) for i, _ in expected])


def test_score_items_keeps_the_given_order(client: RecommenderClient, ref) -> None:
    items = ["item-00042", "item-00000", "item-00017", "item-00059"]
    result = client.score_items("u0012", items)
    assert [i.item_id for i in result.items] == items
    np.testing.assert_allclose(
        [i.predicted_rating for i in result.items],
        [ref.rating("u0012", i) for i in items],
        atol=1e-5,
    )


def test_similar_items_by_cosine_without_the_item(client: RecommenderClient, ref) -> None:
    result = client.similar_items("item-00005", k=7)
    expected = ref.similar("item-00005", 7)
    assert [i.item_id for i in result.items] == [i for i, _ in expected]
    np.testing.assert_allclose([i.similarity for i in result.items],
                               [s for _, s in expected], atol=1e-5)  # fmt: skip
    assert [i.rank for i in result.items] == list(range(1, 8))
    assert "item-00005" not in [i.item_id for i in client.similar_items("item-00005", 50).items]


def test_model_info(client: RecommenderClient, ref) -> None:
    info = client.model_info()
    assert (info.model.name, info.model.version) == ("tiny", 1)
    assert (info.dim, info.user_count, info.item_count) == (16, 40, 60)
    assert info.execution_provider == "CPUExecutionProvider"  # CUDA asked first, fell back
    assert info.encoder_file == "encoder.int8.onnx"
    assert info.max_seq_len == ref.manifest["dims"]["max_seq_len"]
    assert info.metrics == pytest.approx({"rmse": 0.91, "recall@10": 0.12, "ndcg@10": 0.08})
    assert info.scoring["ranking"] == ref.manifest["scoring"]["ranking_score"]
    assert (info.max_k, info.max_item_ids, info.max_texts, info.max_text_bytes) == (50, 20, 12, 400)
    assert info.created_at == ref.manifest["created_at"]


def test_concurrent_calls_are_batched_and_each_gets_its_own_answer(
    client: RecommenderClient, ref
) -> None:
    users = [f"u{i:04d}" for i in range(40)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda u: client.recommend(u, k=5), users))
    for user, result in zip(users, results, strict=True):
        assert result.item_ids == [i for i, _ in ref.recommend(user, 5)]


def test_calls_answered_from_one_encoded_batch_carry_every_field(
    client: RecommenderClient, server, ref
) -> None:
    """Batches of WIRE_FROM or more calls are answered with bytes the ranker's thread encoded for
    the whole batch (`server.wire`): each call still gets its own items, scores, predicted
    ratings, ranks and model. Bursts repeat until the ranker has run a batch of more than 4."""
    assert WIRE_FROM <= 4
    ranker = {"model": "tiny", "batcher": "ranker"}

    def batches_over_4() -> float:
        url = server.metrics_url
        total = metric_value(url, "bertrec_batch_size_count", **ranker)
        return total - metric_value(url, "bertrec_batch_size_bucket", le="4.0", **ranker)

    users = [f"u{i:04d}" for i in range(40)]
    before = batches_over_4()
    for _ in range(20):
        with ThreadPoolExecutor(len(users)) as pool:
            results = list(pool.map(lambda u: client.recommend(u, k=7), users))
        for user, result in zip(users, results, strict=True):
            expected = ref.recommend(user, 7)
            check_ranked(result.items, expected, [ref.rating(user, i) for i, _ in expected])
            assert (result.model.name, result.model.version) == ("tiny", 1)
        if batches_over_4() > before:
            return
    pytest.fail("20 bursts of 40 concurrent calls never made a ranking batch of more than 4")


def test_a_bad_request_does_not_harm_its_batch_neighbours(client: RecommenderClient, ref) -> None:
    def call(i: int) -> str:
        try:
            user = "nobody" if i % 2 else f"u{i:04d}"
            return ",".join(client.recommend(user, k=4).item_ids)
        except RecommenderError as exc:
            return exc.code.name

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, range(12)))
    for i, answer in enumerate(answers):
        if i % 2:
            assert answer == "NOT_FOUND"
        else:
            assert answer == ",".join(i for i, _ in ref.recommend(f"u{i:04d}", 4))


def test_async_client(server, ref) -> None:
    async def main() -> None:
        async with AsyncRecommenderClient(server.target) as client:
            results = await asyncio.gather(*(client.recommend(u, k=3) for u in USERS))
            for user, result in zip(USERS, results, strict=True):
                assert result.item_ids == [i for i, _ in ref.recommend(user, 3)]
            assert (await client.model_info()).item_count == 60
            assert await client.health() == "SERVING"
            with pytest.raises(RecommenderError) as info:
                await client.similar_items("nope", 3)
            assert info.value.code == grpc.StatusCode.NOT_FOUND

    asyncio.run(main())


def test_reflection_lists_and_describes_the_services(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"bertrec.v1.RecommenderService", "grpc.health.v1.Health"} <= services
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("bertrec.v1.RecommenderService")
    assert {m.name for m in service.methods} == {
        "Recommend", "RecommendForText", "ScoreItems", "SimilarItems", "EmbedText", "GetModelInfo",
        "RecordFeedback", "ForgetUser", "RecommendBatch", "StreamRecommendations",
    }  # fmt: skip
    request = pool.FindMessageTypeByName("bertrec.v1.RecommendRequest")
    assert "exclude_rated" in request.fields_by_name


def test_health_for_overall_and_service_names(client: RecommenderClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("bertrec.v1.RecommenderService") == "SERVING"
    with pytest.raises(RecommenderError) as info:
        client.health("no.such.Service")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_server_process_never_imports_torch_or_transformers(
    client: RecommenderClient, server
) -> None:
    # Exercise every code path first, so lazy imports would have happened by now.
    client.recommend("u0001", k=3)
    client.recommend_for_text(TEXT, k=3)
    client.embed_text([TEXT])
    client.score_items("u0001", ["item-00001"])
    client.similar_items("item-00001", k=3)
    client.model_info()
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", server.stderr(), re.M)
    assert "onnxruntime" in imported and "tokenizers" in imported  # the audit sees imports
    heavy = sorted({m for m in imported if m.split(".")[0] in ("torch", "transformers")})
    assert heavy == []
