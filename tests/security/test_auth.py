"""Tokens and roles on the real server (TLS + `--auth-file`): who may call what, and what a
refusal costs the caller, the metrics and the log.

Every unary method of the recommender and Open Inference Protocol services is called with no
token, an unknown token and each role's token; a refusal must come from auth
(UNAUTHENTICATED / PERMISSION_DENIED) exactly where the role is missing, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from adversarial.rpcs import RPCS, VALID, Kind, path
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from tls_material import new_token

from bertrec.server.auth import hash_token
from bertrec.v1 import recommender_pb2 as pb
from security.conftest import TOKENS, Pki, SecureServer, call, tls_channel

Code = grpc.StatusCode
AUTH_CODES = {Code.UNAUTHENTICATED, Code.PERMISSION_DENIED}
# What each method needs, from the issue (not from server/auth.py, which this checks).
NEEDS = {
    **{path("rec", m): "read" for m in ("Recommend", "RecommendForText", "ScoreItems",
                                         "SimilarItems", "EmbedText", "GetModelInfo",
                                         "RecommendBatch", "StreamRecommendations")},
    **{path("oip", m): "read" for m in ("ServerLive", "ServerReady", "ModelReady",
                                         "ServerMetadata", "ModelMetadata", "ModelInfer",
                                         "RepositoryIndex")},
    path("rec", "RecordFeedback"): "feedback",
    path("rec", "ForgetUser"): "admin",
    path("oip", "RepositoryModelLoad"): "admin",
    path("oip", "RepositoryModelUnload"): "admin",
}  # fmt: skip
# Server streams are called as unary here: their VALID request fits one response message.
GUARDED = sorted(
    p for p, rpc in RPCS.items()
    if rpc.kind is not Kind.BIDI_STREAM and not p.startswith("/grpc.")
)  # fmt: skip


def test_every_guarded_method_is_in_the_table() -> None:
    assert sorted(NEEDS) == GUARDED


@pytest.fixture(scope="module")
def channel(tls_server: SecureServer) -> Iterator[grpc.Channel]:
    with tls_channel(tls_server.port, tls_server.pki) as ch:
        yield ch


@pytest.mark.parametrize("method", GUARDED)
def test_no_token_is_unauthenticated(channel: grpc.Channel, method: str) -> None:
    code, details = call(channel, method, VALID[method])
    assert code == Code.UNAUTHENTICATED, details
    assert "Bearer" in details  # says what to send


@pytest.mark.parametrize("method", GUARDED)
def test_unknown_token_is_unauthenticated(channel: grpc.Channel, method: str) -> None:
    code, details = call(channel, method, VALID[method], token=new_token())
    assert (code, details) == (Code.UNAUTHENTICATED, "invalid token")


@pytest.mark.parametrize("holder", sorted(TOKENS))
@pytest.mark.parametrize("method", GUARDED)
def test_roles(channel: grpc.Channel, pki: Pki, method: str, holder: str) -> None:
    """A token's role opens exactly the methods that need it; the others answer
    PERMISSION_DENIED naming the token's name and the missing role, never the token."""
    code, details = call(channel, method, VALID[method], token=pki.token(holder))
    if NEEDS[method] in TOKENS[holder]:
        assert code not in AUTH_CODES, details
    else:
        assert code == Code.PERMISSION_DENIED, details
        assert repr(NEEDS[method]) in details and repr(holder) in details
        assert pki.token(holder) not in details


def test_read_token_on_admin_rpcs_is_permission_denied(channel: grpc.Channel, pki: Pki) -> None:
    reader = pki.token("reader")
    for method in (path("rec", "ForgetUser"), path("oip", "RepositoryModelLoad")):
        assert call(channel, method, VALID[method], token=reader)[0] == Code.PERMISSION_DENIED


def test_feedback_token_records_feedback_but_cannot_recommend(
    channel: grpc.Channel, pki: Pki
) -> None:
    collector = pki.token("collector")
    event = pb.FeedbackEvent(user_id="u0003", item_id="item-00007", kind=pb.FEEDBACK_KIND_CLICK,
                             idempotency_key=f"security-{new_token()[:16]}")  # fmt: skip
    request = pb.RecordFeedbackRequest(events=[event])
    assert call(channel, path("rec", "RecordFeedback"), request, token=collector)[0] == Code.OK
    recommend = path("rec", "Recommend")
    code, _ = call(channel, recommend, VALID[recommend], token=collector)
    assert code == Code.PERMISSION_DENIED
    assert call(channel, recommend, VALID[recommend], token=pki.token("reader"))[0] == Code.OK


@pytest.mark.parametrize(
    "header",
    ["bearer {t}", "BEARER {t}", "Bearer  {t} "],
    ids=["lower", "upper", "spaces"],
)
def test_the_scheme_is_case_insensitive(channel: grpc.Channel, pki: Pki, header: str) -> None:
    recommend = path("rec", "Recommend")
    value = header.format(t=pki.token("reader"))
    assert call(channel, recommend, VALID[recommend], authorization=value)[0] == Code.OK


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "{t}", "Token {t}"])
def test_malformed_authorization_is_unauthenticated(
    channel: grpc.Channel, pki: Pki, header: str
) -> None:
    recommend = path("rec", "Recommend")
    value = header.format(t=pki.token("reader"))
    code, details = call(channel, recommend, VALID[recommend], authorization=value)
    assert code == Code.UNAUTHENTICATED and "Bearer <token>" in details


def test_auth_is_checked_before_the_request_is_decoded(channel: grpc.Channel, pki: Pki) -> None:
    """Garbage from a caller without credentials is refused for the credentials: an
    unauthenticated caller never makes the server parse its bytes."""
    rpc = channel.unary_unary(path("rec", "Recommend"))  # raw bytes, no serializer
    garbage = b"\xff\xfe not protobuf"
    with pytest.raises(grpc.RpcError) as raised:
        rpc(garbage, timeout=10)
    assert raised.value.code() == Code.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as raised:
        rpc(garbage, timeout=10, metadata=[("authorization", f"Bearer {pki.token('reader')}")])
    assert raised.value.code() == Code.INVALID_ARGUMENT


def test_two_authorization_headers_are_refused(channel: grpc.Channel, pki: Pki) -> None:
    """Even two valid ones: a proxy that appends its own header must not pick the winner."""
    recommend = path("rec", "Recommend")
    rpc = channel.unary_unary(recommend, request_serializer=pb.RecommendRequest.SerializeToString)
    reader = f"Bearer {pki.token('reader')}"
    with pytest.raises(grpc.RpcError) as raised:
        rpc(VALID[recommend], timeout=10,
            metadata=[("authorization", reader), ("authorization", reader)])  # fmt: skip
    assert raised.value.code() == Code.UNAUTHENTICATED
    assert "more than one" in (raised.value.details() or "")


def test_health_is_open_without_a_token(channel: grpc.Channel) -> None:
    check = channel.unary_unary(
        path("health", "Check"),
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    assert check(health_pb2.HealthCheckRequest(), timeout=10).status == 1  # SERVING
    watch = channel.unary_stream(
        path("health", "Watch"),
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    stream = watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert next(stream).status == 1
    stream.cancel()
    assert call(channel, path("health", "List"), health_pb2.HealthListRequest())[0] == Code.OK


def _list_services(channel: grpc.Channel, token: str | None = None) -> list[str]:
    info = channel.stream_stream(
        path("reflection", "ServerReflectionInfo"),
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    metadata = [("authorization", f"Bearer {token}")] if token else None
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = info(iter([request]), timeout=10, metadata=metadata)
    return [s.name for reply in replies for s in reply.list_services_response.service]


def test_reflection_auth_needs_any_valid_credential(channel: grpc.Channel, pki: Pki) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        _list_services(channel)
    assert raised.value.code() == Code.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as raised:
        _list_services(channel, new_token())
    assert raised.value.code() == Code.UNAUTHENTICATED
    # Any role will do: the feedback collector may see what the server offers.
    assert "bertrec.v1.RecommenderService" in _list_services(channel, pki.token("collector"))


def test_reflection_on_is_open(mtls_server: SecureServer, pki: Pki) -> None:
    with tls_channel(mtls_server.port, pki, pki.clients["stranger"]) as ch:
        assert "bertrec.v1.RecommenderService" in _list_services(ch)


def test_reflection_off_is_not_served(plain_server: SecureServer, pki: Pki) -> None:
    with grpc.insecure_channel(plain_server.target) as ch:
        with pytest.raises(grpc.RpcError) as raised:
            _list_services(ch, pki.token("reader"))
        assert raised.value.code() == Code.UNIMPLEMENTED
        # The server itself is up, and tokens work without TLS too (loopback).
        recommend = path("rec", "Recommend")
        assert call(ch, recommend, VALID[recommend])[0] == Code.UNAUTHENTICATED
        assert call(ch, recommend, VALID[recommend], token=pki.token("reader"))[0] == Code.OK


def test_auth_failures_are_counted_by_reason_never_with_a_token(
    tls_server: SecureServer, channel: grpc.Channel, pki: Pki
) -> None:
    recommend, forget = path("rec", "Recommend"), path("rec", "ForgetUser")
    before = tls_server.auth_failures()
    bad = new_token()
    call(channel, recommend, VALID[recommend])  # missing
    call(channel, recommend, VALID[recommend], token=bad)  # invalid_token
    call(channel, recommend, VALID[recommend], token=bad)
    call(channel, recommend, VALID[recommend], authorization=f"Basic {bad}")  # malformed
    call(channel, forget, VALID[forget], token=pki.token("reader"))  # forbidden
    after = tls_server.auth_failures()
    moved = {reason: after[reason] - before.get(reason, 0.0) for reason in after}
    assert moved == {"missing": 1, "invalid_token": 2, "malformed": 1, "forbidden": 1}
    text = tls_server.metrics_text()
    log = tls_server.log()
    for token in [bad, *(t.token for t in pki.tokens.values())]:
        assert token not in text and hash_token(token) not in text
        assert token not in log and hash_token(token) not in log
