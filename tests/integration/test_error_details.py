"""Rich error details on the real server, read through the Python client: INVALID_ARGUMENT and
NOT_FOUND carry a `google.rpc.BadRequest` naming the field at fault (`item_ids[2]`,
`events[1].item_id`) and an `ErrorInfo` with a stable reason in domain `bertrec.dev`, in the
standard `grpc-status-details-bin` trailer (`grpc_status.rpc_status.from_call`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from server_harness import Reference

from bertrec.client import Feedback, RecommenderClient, RecommenderError
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

Call = Callable[[RecommenderClient, Reference], Any]


def details(call: Call, client: RecommenderClient, ref: Reference) -> tuple[Any, ...]:
    """(code, [(field, description)], [(reason, domain, metadata)]) of a failing client call."""
    with pytest.raises(RecommenderError) as info:
        call(client, ref)
    error = info.value.__cause__
    assert isinstance(error, grpc.RpcError), "the client keeps the grpc error as the cause"
    status = rpc_status.from_call(error)
    assert status is not None, f"no details: {info.value}"
    assert status.message == info.value.details  # the plain message is unchanged
    violations, infos = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
        else:
            one = error_details_pb2.ErrorInfo()
            assert detail.Unpack(one), detail.type_url
            infos.append((one.reason, one.domain, dict(one.metadata)))
    return info.value.code, violations, infos


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
CASES: list[tuple[str, Call, grpc.StatusCode, str, str]] = [
    ("unknown user", lambda c, r: c.recommend("no-such-user", 3), NOT_FOUND, "user_id",
     "UNKNOWN_USER"),
    ("negative k", lambda c, r: c.recommend(r.user_ids[0], -1), INVALID, "k", "INVALID_K"),
    ("k above max_k", lambda c, r: c.similar_items(r.item_ids[0], 51), INVALID, "k",
     "INVALID_K"),
    ("unknown item in a list",
     lambda c, r: c.score_items(r.user_ids[0], [r.item_ids[0], r.item_ids[1], "nope"]),
     NOT_FOUND, "item_ids[2]", "UNKNOWN_ITEM"),
    ("unknown item alone", lambda c, r: c.similar_items("nope", 3), NOT_FOUND, "item_id",
     "UNKNOWN_ITEM"),
    ("duplicate id",
     lambda c, r: c.recommend(r.user_ids[0], 3, include_item_ids=[r.item_ids[0]] * 2),
     INVALID, "include_item_ids[1]", "DUPLICATE"),
    ("empty text in a list", lambda c, r: c.embed_text(["fine", " "]), INVALID, "texts[1]",
     "EMPTY"),
    ("text too long", lambda c, r: c.recommend_for_text("x" * 401), INVALID, "text",
     "TOO_LARGE"),
    ("bad feedback event",
     lambda c, r: c.record_feedback([Feedback(r.user_ids[0], r.item_ids[0], "click"),
                                     Feedback(r.user_ids[0], "nope", "click")]),
     INVALID, "events[1].item_id", "UNKNOWN_ITEM"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "code", "field", "reason"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_errors_name_their_field_and_reason(
    client: RecommenderClient,
    ref: Reference,
    call: Call,
    code: grpc.StatusCode,
    field: str,
    reason: str,
) -> None:
    got_code, violations, infos = details(call, client, ref)
    assert got_code == code
    assert [v[0] for v in violations] == [field]
    assert violations[0][1]  # the description: the same message a person reads
    assert infos == [(reason, "bertrec.dev", {"field": field})]


def test_errors_without_a_field_still_carry_a_reason(channel: grpc.Channel, ref: Reference) -> None:
    stub = pb_grpc.RecommenderServiceStub(channel)
    request = pb.RecommendRequest(user_id=ref.user_ids[0], k=3, model=pb.ModelRef(version=99))
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(request, timeout=10)
    assert info.value.code() == NOT_FOUND  # a version that is not loaded
    status = rpc_status.from_call(info.value)
    assert status is not None
    assert len(status.details) == 1  # no field: no BadRequest
    one = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(one)
    assert (one.reason, one.domain, dict(one.metadata)) == ("NOT_FOUND", "bertrec.dev", {})


def test_an_unknown_model_names_its_field(channel: grpc.Channel, ref: Reference) -> None:
    stub = pb_grpc.RecommenderServiceStub(channel)
    request = pb.RecommendRequest(user_id=ref.user_ids[0], k=3, model=pb.ModelRef(name="other"))
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(request, timeout=10)
    status = rpc_status.from_call(info.value)
    assert status is not None
    bad, one = error_details_pb2.BadRequest(), error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(bad) and status.details[1].Unpack(one)
    assert [v.field for v in bad.field_violations] == ["model.name"]
    assert (one.reason, one.domain) == ("UNKNOWN_MODEL", "bertrec.dev")
