"""Tracing on the real server: `bertrec serve --otlp-endpoint` exports over OTLP/gRPC to a
collector run by the test (an in-memory exporter on the collector's side); the span tree of one
RecommendForText, parented on the caller's W3C traceparent."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from server_harness import serving

from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
METHOD = "bertrec.v1.RecommenderService/RecommendForText"


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: int
    span_id: int
    parent_id: int  # 0: a root
    start_ns: int
    end_ns: int
    attributes: dict[str, object]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.spans += [_span(s) for s in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


def _span(s: Any) -> Span:
    attributes = {}
    for kv in s.attributes:
        value = kv.value
        attributes[kv.key] = getattr(value, value.WhichOneof("value"))
    return Span(
        s.name,
        int.from_bytes(s.trace_id, "big"),
        int.from_bytes(s.span_id, "big"),
        int.from_bytes(s.parent_span_id or b"\0", "big"),
        s.start_time_unix_nano,
        s.end_time_unix_nano,
        attributes,
    )


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    receiver = Collector()
    server = grpc.server(ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(None)


def test_recommend_for_text_span_tree(model_repo: Path, tmp_path: Path, collector) -> None:
    receiver, port = collector
    with serving(model_repo, tmp_path, "--otlp-endpoint", f"http://127.0.0.1:{port}") as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            request = pb.RecommendForTextRequest(text="a quiet film about the sea", k=3)
            reply = stub.RecommendForText(
                request, timeout=10, metadata=[("traceparent", TRACEPARENT)]
            )
            stub.RecommendForText(request, timeout=10)  # no traceparent: a trace of its own
        assert len(reply.items) == 3
        assert server.terminate() == 0  # the server flushes its spans on the way out
    ours = [s for s in receiver.spans if s.trace_id == TRACE_ID]
    by_name = {s.name: s for s in ours}
    assert sorted(by_name) == sorted(
        [METHOD, "encoder queue", "encoder batch", "encode", "ranker queue", "ranker batch", "rank"]
    ), [s.name for s in ours]
    assert len(ours) == 7  # one of each: the call's own copy of each batch
    root = by_name[METHOD]
    assert root.parent_id == PARENT_ID  # the caller's span, from the traceparent metadata
    assert root.attributes["rpc.system"] == "grpc"
    assert root.attributes["rpc.method"] == "RecommendForText"
    assert root.attributes["rpc.grpc.status_code"] == 0
    for name in ("encoder queue", "encoder batch", "ranker queue", "ranker batch"):
        assert by_name[name].parent_id == root.span_id, name
    assert by_name["encode"].parent_id == by_name["encoder batch"].span_id
    assert by_name["rank"].parent_id == by_name["ranker batch"].span_id
    # time flows encoder -> ranker, every child inside the call
    order = ["encoder queue", "encoder batch", "ranker queue", "ranker batch"]
    for before, after in itertools.pairwise(order):
        assert by_name[before].end_ns <= by_name[after].start_ns, (before, after)
    for span in ours:
        assert root.start_ns <= span.start_ns <= span.end_ns <= root.end_ns, span.name
    assert by_name["encoder batch"].attributes["bertrec.batch.size"] >= 1
    # the call without a traceparent started a trace of its own with the same shape
    others = [s for s in receiver.spans if s.trace_id != TRACE_ID and s.name == METHOD]
    assert len(others) == 1 and others[0].parent_id == 0
    own = [s for s in receiver.spans if s.trace_id == others[0].trace_id]
    assert sorted(s.name for s in own) == sorted(by_name)
