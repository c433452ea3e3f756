"""k left unset (0, proto3's default) means 10 on the native API, as on the v2 API and in the
clients (issue 12, item 12); a negative or too large k is still INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest

from adversarial.conftest import AdversarialServer
from bertrec.server.engine import DEFAULT_K
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

USER, ITEM, TEXT = "u0001", "item-00001", "a quiet warm story about a lighthouse keeper"


@pytest.fixture(scope="module")
def stub(adversarial_channel: grpc.Channel) -> pb_grpc.RecommenderServiceStub:
    return pb_grpc.RecommenderServiceStub(adversarial_channel)


def test_default_k_is_ten() -> None:
    assert DEFAULT_K == 10


def test_unset_k_returns_the_default_number_of_items(stub: pb_grpc.RecommenderServiceStub) -> None:
    answers = [
        stub.Recommend(pb.RecommendRequest(user_id=USER), timeout=10),
        stub.RecommendForText(pb.RecommendForTextRequest(text=TEXT), timeout=10),
        stub.SimilarItems(pb.SimilarItemsRequest(item_id=ITEM), timeout=10),
    ]
    assert [len(a.items) for a in answers] == [DEFAULT_K] * 3
    assert [i.rank for i in answers[0].items] == list(range(1, DEFAULT_K + 1))


def test_an_explicit_k_is_kept_and_a_bad_one_refused(
    stub: pb_grpc.RecommenderServiceStub, adversarial_server: AdversarialServer
) -> None:
    assert len(stub.Recommend(pb.RecommendRequest(user_id=USER, k=3), timeout=10).items) == 3
    max_k = adversarial_server.settings["max_k"]
    for k in (-1, max_k + 1):
        with pytest.raises(grpc.RpcError) as info:
            stub.SimilarItems(pb.SimilarItemsRequest(item_id=ITEM, k=k), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"k must be in 1..{max_k}" in (info.value.details() or "")
