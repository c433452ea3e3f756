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


class _MethodSeries:
    """The series of one method, bound to its labels once: `.labels()` costs microseconds a call."""

    def __init__(self, metrics: ServerMetrics, labels: dict[str, str]) -> None:
        self.method = labels["grpc_method"]
        self.started = metrics.grpc_started.labels(**labels)
        self.handling_s = metrics.grpc_handling_s.labels(**labels)
        self.in_flight = metrics.in_flight
        self._metrics, self._labels = metrics, labels
        self._handled: dict[grpc.StatusCode, Any] = {}

    def begin(self) -> float:
        self.started.inc()
        self.in_flight.inc()
        return time.monotonic()

    def end(self, start_s: float, context: grpc.ServicerContext) -> None:
        code = context.code() or grpc.StatusCode.OK
        handled = self._handled.get(code)
        if handled is None:  # bound on first use, so only codes that happened are exported
            handled = self._metrics.grpc_handled.labels(**self._labels, grpc_code=code.name)
            self._handled[code] = handled
        handled.inc()
        self.handling_s.observe(time.monotonic() - start_s)
        self.in_flight.dec()

    def fail(self, exc: Exception, context: grpc.ServicerContext) -> None:
        """Abort the call with the status `exc` maps to (re-raise a handler's own abort)."""
        if not isinstance(exc, ServiceError):
            aborted = context.code()
            if aborted is not None and aborted != grpc.StatusCode.OK:
                raise exc  # the handler called context.abort(); its status stands
            log.error("unexpected error in %s", self.method, exc_info=exc)
        code, message = to_status(exc)
        context.abort(code, message)


class MetricsAndErrorsInterceptor(grpc.ServerInterceptor):
    """Records the standard grpc_server_* series and maps exceptions to status codes.

    grpc asks the interceptor for a handler on every call; the wrapped handler of each method
    is built once and reused (handlers are fixed once the server has started).
    """

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method_path = handler_call_details.method
        wrapped = self._wrapped.get(method_path)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        grpc_type = _TYPES[(handler.request_streaming, handler.response_streaming)]
        service, _, method = method_path.lstrip("/").rpartition("/")
        labels = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method}
        behavior = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream
        )  # fmt: skip
        wrap = _wrap_streaming if handler.response_streaming else _wrap_unary
        wrapped = _FACTORIES[grpc_type](
            wrap(behavior, _MethodSeries(self._metrics, labels)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        # Two threads may build the same method's handler at once; either result is equivalent.
        return self._wrapped.setdefault(method_path, wrapped)


def _wrap_unary(
    behavior: Callable[[Any, grpc.ServicerContext], Any], series: _MethodSeries
) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        start_s = series.begin()
        try:
            return behavior(request, context)
        except Exception as exc:
            series.fail(exc, context)
        finally:
            series.end(start_s, context)

    return handle


def _wrap_streaming(
    behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], series: _MethodSeries
) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        start_s = series.begin()
        try:
            yield from behavior(request, context)
        except Exception as exc:
            series.fail(exc, context)
        finally:
            series.end(start_s, context)

    return handle
