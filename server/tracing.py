"""OpenTelemetry tracing of every RPC, off by default and free when off.

With `--otlp-endpoint` set, `Tracing.from_endpoint` builds a tracer provider that exports over
OTLP/gRPC in the background (a `BatchSpanProcessor`; the SDK's own environment variables such as
`OTEL_TRACES_SAMPLER` or `OTEL_EXPORTER_OTLP_HEADERS` apply). Spans still buffered are sent at
stop; a collector that is down then delays the exit by up to `OTEL_EXPORTER_OTLP_TIMEOUT`
(10 s by default: 7.5 s measured against a closed port). Without it nothing of
OpenTelemetry is imported and the request path pays one boolean check per call and per queued
item (`tracing_anywhere`).

The span tree of one call, e.g. RecommendForText:

    bertrec.v1.RecommenderService/RecommendForText    (SERVER; parent: the caller's traceparent)
      encoder queue      enqueued -> its batch started
      encoder batch      the batch's run, as seen by this call (bertrec.batch.size, .id)
        encode           the model's computation within that batch
      ranker queue / ranker batch / rank

A batch serves many traces, so each call gets its own copy of the batch spans, carrying the
batch's timing and a `bertrec.batch.id` shared by every call of that batch (chosen over span
links: every trace then shows where its time went without a second lookup, and the id still
finds the batch's other calls). Trace context reaches the batcher thread inside the queued item
(`Traced`), never through thread-locals of the batcher.

The tracer of a server travels in the OpenTelemetry context set by the interceptor, so two
servers in one process (tests) trace independently and nothing is global except the
"any server traces" switch that keeps the untraced path free.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

TRACER_NAME = "bertrec.server"
_TRACER_KEY = "bertrec-tracer"  # context key holding the tracer of the server handling the call
# grpc status codes that mark a server span as failed (OpenTelemetry's RPC conventions)
_SERVER_FAULTS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)

_tracing_servers = 0  # servers in this process with tracing on: 0 keeps every check one compare


def tracing_anywhere() -> bool:
    """Whether any server in this process traces (the cheap check on the request path)."""
    return _tracing_servers > 0


@dataclass(frozen=True, slots=True)
class Traced:
    """A queued item's trace: the tracer and the calling span's context, and when it queued."""

    tracer: Tracer
    context: Context
    enqueued_ns: int


@dataclass(frozen=True, slots=True)
class BatchTimes:
    """Wall-clock nanoseconds of one batch, for the spans each of its calls gets."""

    batch_id: int
    size: int
    started_ns: int  # queue wait ends, the batch begins
    run_started_ns: int
    run_ended_ns: int
    ended_ns: int
    error: BaseException | None = None


class ServerSpan:
    """One call's server span, attached as the current context while the handler runs."""

    def __init__(self, span: Span, token: object) -> None:
        self._span = span
        self._token = token

    def set_attribute(self, key: str, value: str) -> None:
        self._span.set_attribute(key, value)

    def end(self, code_name: str, code_value: int) -> None:
        """Record the call's status and end the span; detach its context."""
        from opentelemetry import context as otel_context
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("rpc.grpc.status_code", code_value)
        if code_name in _SERVER_FAULTS:
            self._span.set_status(Status(StatusCode.ERROR, code_name))
        self._span.end()
        try:
            otel_context.detach(self._token)  # type: ignore[arg-type]
        except Exception:  # a stream resumed in another context: the span still ended
            log.debug("trace context detached elsewhere", exc_info=True)


class Tracing:
    """One server's tracer (or none): server spans from incoming metadata, and shutdown.

    Args:
        provider: an SDK tracer provider (its exporters decide where spans go); None: off.
    """

    def __init__(self, provider: TracerProvider | None = None) -> None:
        global _tracing_servers
        self._provider = provider
        self.enabled = provider is not None
        self._tracer: Tracer | None = None
        self._propagator: Any = None
        if provider is not None:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            self._tracer = provider.get_tracer(TRACER_NAME)
            self._propagator = TraceContextTextMapPropagator()
            _tracing_servers += 1

    @classmethod
    def from_endpoint(cls, endpoint: str, service_name: str = "bertrec") -> Tracing:
        """Tracing exported to an OTLP/gRPC collector at `endpoint`; off when it is empty.

        `http://` endpoints are plaintext, `https://` ones use TLS (system roots).
        """
        if not endpoint:
            return cls(None)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing on: spans go to %s over OTLP/gRPC", endpoint)
        return cls(provider)

    def start_call(self, method_path: str, metadata: Iterable[tuple[str, Any]]) -> ServerSpan:
        """Start and attach the server span of a call (parent: the caller's `traceparent`)."""
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        assert self._tracer is not None, "start_call on disabled tracing"
        carrier = {k: v for k, v in metadata if isinstance(v, str)}
        parent = self._propagator.extract(carrier)
        name = method_path.lstrip("/")
        service, _, method = name.rpartition("/")
        span = self._tracer.start_span(
            name,
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        ctx = otel_context.set_value(_TRACER_KEY, self._tracer, trace.set_span_in_context(span))
        return ServerSpan(span, otel_context.attach(ctx))

    def shutdown(self) -> None:
        """Flush the spans still buffered and stop exporting (at server stop)."""
        global _tracing_servers
        if self._provider is None:
            return
        self._provider.shutdown()
        self._provider = None
        _tracing_servers -= 1


def capture() -> Traced | None:
    """The current call's trace for an item about to be queued; None when not traced."""
    if not _tracing_servers:
        return None
    from opentelemetry import context as otel_context

    ctx = otel_context.get_current()
    tracer = otel_context.get_value(_TRACER_KEY, ctx)
    if tracer is None:
        return None
    return Traced(tracer, ctx, time.time_ns())  # type: ignore[arg-type]


def current_context() -> Context | None:
    """The trace context to carry to another thread (a chained stage); None when untraced."""
    if not _tracing_servers:
        return None
    from opentelemetry import context as otel_context

    return otel_context.get_current()


@contextmanager
def attached(ctx: Context | None) -> Iterator[None]:
    """Run the block in `ctx` (from `current_context`); nothing at all when it is None."""
    if ctx is None:
        yield
        return
    from opentelemetry import context as otel_context

    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def record_batch(
    traced: Sequence[Traced], queue_name: str, step_name: str, times: BatchTimes
) -> None:
    """Give each traced call of a batch its queue, batch and step spans (see module doc)."""
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    attributes = {"bertrec.batch.id": times.batch_id, "bertrec.batch.size": times.size}
    for one in traced:
        tracer, parent = one.tracer, one.context
        queued = tracer.start_span(f"{queue_name} queue", parent, start_time=one.enqueued_ns)
        queued.end(end_time=times.started_ns)
        batch = tracer.start_span(
            f"{queue_name} batch", parent, attributes=attributes, start_time=times.started_ns
        )
        step = tracer.start_span(
            step_name, trace.set_span_in_context(batch, parent), start_time=times.run_started_ns
        )
        if times.error is not None:
            for span in (step, batch):
                span.set_status(Status(StatusCode.ERROR, type(times.error).__name__))
        step.end(end_time=times.run_ended_ns)
        batch.end(end_time=times.ended_ns)
