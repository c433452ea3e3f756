"""The interceptor: every branch of the exception -> status mapping, rich error details, the
RPC series with go-grpc-prometheus label values, and call observation (request id, access log,
server spans)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

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
    rich_status,
    to_status,
)
from bertrec.server.interceptor import CallObserver, MetricsAndErrorsInterceptor
from bertrec.server.logs import ACCESS_LOGGER
from bertrec.server.metrics import ServerMetrics, code_label
from bertrec.server.tracing import Tracing
from bertrec.v1 import recommender_pb2 as pb

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
    if kind == "fielded":
        raise InvalidArgument("events[3].item_id 'zz' is not in the catalogue",
                              "events[3].item_id", "UNKNOWN_ITEM")  # fmt: skip
    raise RuntimeError("secret bug detail")


def encoded(request: bytes, context: grpc.ServicerContext) -> pb.ModelRef | bytes:
    """A message, or (asked for "bytes") the same message serialized by the handler itself."""
    message = pb.ModelRef(name="m", version=7)
    return message.SerializeToString() if request == b"bytes" else message


def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"one"
    if request == b"boom":
        raise KeyError("secret")
    yield b"two"


@contextmanager
def serve(observer: CallObserver | None = None) -> Iterator[tuple[grpc.Channel, ServerMetrics]]:
    metrics = ServerMetrics()
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Encoded": grpc.unary_unary_rpc_method_handler(
                encoded, response_serializer=pb.ModelRef.SerializeToString
            ),
        },
    )
    server = grpc.server(
        ThreadPoolExecutor(4),
        handlers=[handler],
        interceptors=[MetricsAndErrorsInterceptor(metrics, observer=observer)],
        options=[("grpc.so_reuseport", 0)],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, metrics
    server.stop(None)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[grpc.Channel, ServerMetrics]]:
    with serve() as served:
        yield served


def call(channel: grpc.Channel, kind: str) -> tuple[grpc.StatusCode, str]:
    try:
        channel.unary_unary(f"/{SERVICE}/Unary")(kind.encode(), timeout=5)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("answer", ["message", "bytes"])
def test_a_handler_may_answer_its_message_already_serialized(served, answer: str) -> None:
    channel, _ = served
    method = channel.unary_unary(
        f"/{SERVICE}/Encoded", response_deserializer=pb.ModelRef.FromString
    )
    assert method(answer.encode(), timeout=5) == pb.ModelRef(name="m", version=7)


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
    labels = {"grpc_type": "server_stream", "grpc_service": SERVICE, "grpc_method": "Stream"}
    sample = metrics.registry.get_sample_value
    assert sample("grpc_server_started_total", labels) == 2
    assert sample("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 1
    assert sample("grpc_server_handled_total", {**labels, "grpc_code": "Internal"}) == 1


def test_handled_codes_are_counted_including_set_code(served) -> None:
    channel, metrics = served
    labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "Unary"}
    sample = metrics.registry.get_sample_value

    def handled(code: str) -> float:
        return sample("grpc_server_handled_total", {**labels, "grpc_code": code}) or 0.0

    before = {c: handled(c) for c in ("OK", "NotFound", "Internal")}
    started = sample("grpc_server_started_total", labels) or 0.0
    for kind in ("ok", "set_code", "crash"):
        call(channel, kind)
    assert handled("OK") == before["OK"] + 1
    assert handled("NotFound") == before["NotFound"] + 1
    assert handled("Internal") == before["Internal"] + 1
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


def details_of(error: grpc.RpcError) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(field, description) violations and (reason, domain) infos of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, "no grpc-status-details-bin"
    violations, infos = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append((info.reason, info.domain))
    return violations, infos


def failed(channel: grpc.Channel, kind: str, metadata: tuple = ()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/Unary")(kind.encode(), timeout=5, metadata=metadata)
    return info.value


def test_a_field_error_carries_bad_request_and_error_info_details(served) -> None:
    channel, _ = served
    error = failed(channel, "fielded")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = "events[3].item_id 'zz' is not in the catalogue"
    assert error.details() == message
    assert details_of(error) == (
        [("events[3].item_id", message)],
        [("UNKNOWN_ITEM", "bertrec.dev")],
    )


def test_not_found_has_a_default_reason_and_internal_errors_no_details(served) -> None:
    channel, _ = served
    assert details_of(failed(channel, "notfound")) == ([], [("NOT_FOUND", "bertrec.dev")])
    assert rpc_status.from_call(failed(channel, "crash")) is None
    assert rpc_status.from_call(failed(channel, "internal")) is None
    assert rich_status(InternalError("x", "f", "R")) is None
    assert rich_status(ResourceExhausted("full")) is None  # no reason, no field: nothing to add
    assert rich_status(ValueError("x")) is None


def test_code_labels_are_go_grpc_prometheus_values() -> None:
    assert [code_label(c) for c in grpc.StatusCode] == [
        "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
        "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
        "Aborted", "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss",
        "Unauthenticated",
    ]  # fmt: skip


def test_no_created_series_are_exported(served) -> None:
    channel, metrics = served
    call(channel, "ok")
    names = {s.name for m in metrics.registry.collect() for s in m.samples}
    assert "grpc_server_handled_total" in names
    assert not [n for n in names if n.endswith("_created")]


@pytest.fixture(scope="module")
def observed() -> Iterator[tuple[grpc.Channel, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observer = CallObserver(Tracing(provider), access_log=True)
    with serve(observer) as (channel, _):
        yield channel, exporter
    observer.close()


def trailing_request_id(call_: grpc.Call | grpc.RpcError) -> str:
    return dict(call_.trailing_metadata())["x-request-id"]


def test_the_request_id_is_echoed_or_made_and_the_access_log_has_no_payload(
    observed, caplog
) -> None:
    channel, _ = observed
    method = channel.unary_unary(f"/{SERVICE}/Unary")
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        _, given = method.with_call(b"ok", timeout=5, metadata=(("x-request-id", "req-42"),))
        _, made = method.with_call(b"ok", timeout=5)
        error = failed(channel, "fielded", (("x-request-id", "req-43"),))
    assert trailing_request_id(given) == "req-42"
    assert len(trailing_request_id(made)) == 32  # a uuid4, hex
    # rich details and the request id share the trailing metadata
    assert trailing_request_id(error) == "req-43"
    assert details_of(error)[1] == [("UNKNOWN_ITEM", "bertrec.dev")]
    lines = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert [(r.method, r.code, r.request_id) for r in lines] == [
        (f"/{SERVICE}/Unary", "OK", "req-42"),
        (f"/{SERVICE}/Unary", "OK", trailing_request_id(made)),
        (f"/{SERVICE}/Unary", "InvalidArgument", "req-43"),
    ]
    for record in lines:
        assert record.peer.startswith("ipv4:127.0.0.1:") or record.peer.startswith("ipv6:")
        assert record.duration_ms >= 0
        assert "zz" not in record.getMessage() and "fielded" not in str(vars(record))


def test_a_server_span_per_call_is_the_child_of_the_callers_traceparent(observed) -> None:
    channel, exporter = observed
    exporter.clear()
    trace_id, parent_id = 0x1234567890ABCDEF1234567890ABCDEF, 0x1122334455667788
    traceparent = f"00-{trace_id:032x}-{parent_id:016x}-01"
    channel.unary_unary(f"/{SERVICE}/Unary")(
        b"ok", timeout=5, metadata=(("traceparent", traceparent),)
    )
    failed(channel, "crash")
    list(channel.unary_stream(f"/{SERVICE}/Stream")(b"fine", timeout=5))
    ok, crash, streamed = exporter.get_finished_spans()
    assert ok.name == f"{SERVICE}/Unary" and ok.kind is trace.SpanKind.SERVER
    assert (ok.context.trace_id, ok.parent.span_id) == (trace_id, parent_id)
    assert ok.parent.is_remote
    assert ok.attributes["rpc.grpc.status_code"] == 0
    assert crash.parent is None and crash.context.trace_id != trace_id  # a new trace
    assert crash.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert crash.status.status_code is trace.StatusCode.ERROR
    assert streamed.name == f"{SERVICE}/Stream"
