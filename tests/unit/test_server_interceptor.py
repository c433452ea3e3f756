"""The interceptor: every branch of the exception -> status mapping, and the RPC series."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from bertrec.server.errors import (
    INTERNAL_MESSAGE,
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    NotFound,
    NotReady,
    ResourceExhausted,
    ServiceError,
    to_status,
)
from bertrec.server.interceptor import MetricsAndErrorsInterceptor
from bertrec.server.metrics import ServerMetrics

SERVICE = "test.Svc"


def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    kind = request.decode()
    if kind == "ok":
        return b"fine"
    if kind == "invalid":
        raise InvalidArgument("k must be in 1..10, got 0")
    if kind == "notfound":
        raise NotFound("unknown user_id 'x'")
    if kind == "abort":
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler's own abort")
    if kind == "set_code":
        context.set_code(grpc.StatusCode.NOT_FOUND)
        return b""
    if kind == "internal":
        raise InternalError("secret detail")
    raise RuntimeError("secret bug detail")


def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"one"
    if request == b"boom":
        raise KeyError("secret")
    yield b"two"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[grpc.Channel, ServerMetrics]]:
    metrics = ServerMetrics()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(
        ThreadPoolExecutor(4),
        handlers=[handler],
        interceptors=[MetricsAndErrorsInterceptor(metrics)],
        options=[("grpc.so_reuseport", 0)],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, metrics
    server.stop(None)


def call(channel: grpc.Channel, kind: str) -> tuple[grpc.StatusCode, str]:
    try:
        channel.unary_unary(f"/{SERVICE}/Unary")(kind.encode(), timeout=5)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("kind", "code", "details"),
    [
        ("ok", grpc.StatusCode.OK, ""),
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "k must be in 1..10, got 0"),
        ("notfound", grpc.StatusCode.NOT_FOUND, "unknown user_id 'x'"),
        ("abort", grpc.StatusCode.PERMISSION_DENIED, "handler's own abort"),
        ("internal", grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE),
        ("crash", grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE),
    ],
)
def test_status_codes(served, kind: str, code: grpc.StatusCode, details: str) -> None:
    channel, _ = served
    assert call(channel, kind) == (code, details)


def test_unexpected_errors_are_logged_not_shown(served, caplog) -> None:
    channel, _ = served
    with caplog.at_level("ERROR"):
        code, details = call(channel, "crash")
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in details
    assert "secret bug detail" in caplog.text


def test_streaming_errors_and_metrics(served) -> None:
    channel, metrics = served
    method = channel.unary_stream(f"/{SERVICE}/Stream")
    assert list(method(b"fine", timeout=5)) == [b"one", b"two"]
    with pytest.raises(grpc.RpcError) as info:
        list(method(b"boom", timeout=5))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    labels = {"grpc_type": "SERVER_STREAM", "grpc_service": SERVICE, "grpc_method": "Stream"}
    sample = metrics.registry.get_sample_value
    assert sample("grpc_server_started_total", labels) == 2
    assert sample("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 1
    assert sample("grpc_server_handled_total", {**labels, "grpc_code": "INTERNAL"}) == 1


def test_handled_codes_are_counted_including_set_code(served) -> None:
    channel, metrics = served
    labels = {"grpc_type": "UNARY", "grpc_service": SERVICE, "grpc_method": "Unary"}
    sample = metrics.registry.get_sample_value

    def handled(code: str) -> float:
        return sample("grpc_server_handled_total", {**labels, "grpc_code": code}) or 0.0

    before = {c: handled(c) for c in ("OK", "NOT_FOUND", "INTERNAL")}
    started = sample("grpc_server_started_total", labels) or 0.0
    for kind in ("ok", "set_code", "crash"):
        call(channel, kind)
    assert handled("OK") == before["OK"] + 1
    assert handled("NOT_FOUND") == before["NOT_FOUND"] + 1
    assert handled("INTERNAL") == before["INTERNAL"] + 1
    assert sample("grpc_server_started_total", labels) == started + 3
    assert sample("bertrec_in_flight_requests", {}) == 0


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("m"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("m"), grpc.StatusCode.NOT_FOUND),
        (NotReady("m"), grpc.StatusCode.FAILED_PRECONDITION),
        (DeadlineExceeded("m"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (Cancelled("m"), grpc.StatusCode.CANCELLED),
        (ResourceExhausted("m"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ServiceError("m"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_service_error_keeps_its_code_and_message(
    error: ServiceError, code: grpc.StatusCode
) -> None:
    assert to_status(error) == (code, "m")


def test_internal_and_foreign_errors_get_the_generic_message() -> None:
    assert to_status(InternalError("detail")) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    assert to_status(ValueError("detail")) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
