"""The one server interceptor: RPC metrics and the exception -> status mapping, for every RPC.

It wraps each method handler (ours, health and reflection) so that
- `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`,
  `grpc_server_handling_seconds` and `bertrec_in_flight_requests` are recorded in one place;
- any exception escaping a handler becomes a status via `errors.to_status`: service errors keep
  their code and message, anything else is logged with its traceback and answered INTERNAL
  with a generic message, so callers never see UNKNOWN.

A wrapped handler loses grpc's experimental non-blocking marker, so health `Watch` streams run
in their blocking form: one handler thread per open Watch (probes use `Check`, which is unary).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from bertrec.server.errors import ServiceError, to_status
from bertrec.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

_TYPES = {
    (False, False): "UNARY",
    (False, True): "SERVER_STREAM",
    (True, False): "CLIENT_STREAM",
    (True, True): "BIDI_STREAM",
}
_FACTORIES = {
    "UNARY": grpc.unary_unary_rpc_method_handler,
    "SERVER_STREAM": grpc.unary_stream_rpc_method_handler,
    "CLIENT_STREAM": grpc.stream_unary_rpc_method_handler,
    "BIDI_STREAM": grpc.stream_stream_rpc_method_handler,
}


class _Rpc:
    """Bookkeeping of one call: labels, start time, and recording its outcome once."""

    def __init__(self, metrics: ServerMetrics, labels: dict[str, str]) -> None:
        self.metrics, self.labels = metrics, labels
        metrics.grpc_started.labels(**labels).inc()
        metrics.in_flight.inc()
        self.start_s = time.monotonic()

    def fail(self, exc: Exception, context: grpc.ServicerContext) -> None:
        """Abort the call with the status `exc` maps to (re-raise a handler's own abort)."""
        if not isinstance(exc, ServiceError):
            aborted = context.code()
            if aborted is not None and aborted != grpc.StatusCode.OK:
                raise exc  # the handler called context.abort(); its status stands
            log.error("unexpected error in %s", self.labels["grpc_method"], exc_info=exc)
        code, message = to_status(exc)
        context.abort(code, message)

    def finish(self, context: grpc.ServicerContext) -> None:
        code = context.code() or grpc.StatusCode.OK
        m, labels = self.metrics, self.labels
        m.grpc_handled.labels(**labels, grpc_code=code.name).inc()
        m.grpc_handling_s.labels(**labels).observe(time.monotonic() - self.start_s)
        m.in_flight.dec()


class MetricsAndErrorsInterceptor(grpc.ServerInterceptor):
    """Records the standard grpc_server_* series and maps exceptions to status codes."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        grpc_type = _TYPES[(handler.request_streaming, handler.response_streaming)]
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        labels = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method}
        behavior = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream
        )  # fmt: skip
        wrap = _wrap_streaming if handler.response_streaming else _wrap_unary
        return _FACTORIES[grpc_type](
            wrap(behavior, self._metrics, labels),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _wrap_unary(
    behavior: Callable[[Any, grpc.ServicerContext], Any],
    metrics: ServerMetrics,
    labels: dict[str, str],
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        rpc = _Rpc(metrics, labels)
        try:
            return behavior(request, context)
        except Exception as exc:
            rpc.fail(exc, context)
        finally:
            rpc.finish(context)

    return handle


def _wrap_streaming(
    behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
    metrics: ServerMetrics,
    labels: dict[str, str],
) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        rpc = _Rpc(metrics, labels)
        try:
            yield from behavior(request, context)
        except Exception as exc:
            rpc.fail(exc, context)
        finally:
            rpc.finish(context)

    return handle
