"""The one server interceptor: admission, RPC metrics and the exception -> status mapping.

It wraps each method handler (ours, health and reflection) so that
- a handler may answer a message or its serialized bytes (`_encoder`);
- every request is decoded by a wrapper that never raises: a request that is not valid protobuf
  (truncated, garbage, invalid UTF-8 in a string field) reaches the handler as a marker and is
  answered INVALID_ARGUMENT, counted and logged in one line. grpc would otherwise answer INTERNAL
  before any handler runs, log a traceback, and leave the call out of the metrics;
- authentication and roles (`auth.py`) are checked first, before the request is decoded or
  admitted: a caller without the method's role costs a status, never a slot or a decode;
- admission (`admission.py`) is asked before the handler runs, so a refused call is a counted
  RESOURCE_EXHAUSTED like any other status; streaming calls run on their own thread pool;
- `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`,
  `grpc_server_handling_seconds` and `bertrec_in_flight_requests` are recorded in one place,
  with go-grpc-prometheus's label values (`metrics.py`);
- any exception escaping a handler becomes a status via `errors.to_status`: service errors keep
  their code and message (plus `google.rpc` details, `errors.rich_status`), anything else is
  logged with its traceback and answered INTERNAL with a generic message, so callers never see
  UNKNOWN;
- observation, only where switched on (`CallObserver`): the call's server span with the
  caller's trace context (`tracing.py`), a request id (the caller's `x-request-id`, else a new
  one, returned in the trailing metadata) and one access log line (`logs.py`). Off, a call
  pays one `is None` check for all of it.

A wrapped handler loses grpc's experimental non-blocking marker, so health `Watch` streams run
in their blocking form: one thread of the streaming pool per open Watch, capped by admission.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import grpc

from bertrec.server.admission import Admission
from bertrec.server.auth import METHOD_ROLES, OPEN, Authorizer
from bertrec.server.errors import UNDECODABLE, InvalidArgument, ServiceError, rich_status, to_status
from bertrec.server.logs import AccessLog
from bertrec.server.metrics import (
    BIDI_STREAM,
    CLIENT_STREAM,
    SERVER_STREAM,
    UNARY,
    ServerMetrics,
    code_label,
)
from bertrec.server.tracing import ServerSpan, Tracing

log = logging.getLogger(__name__)

_TYPES = {
    (False, False): UNARY,
    (False, True): SERVER_STREAM,
    (True, False): CLIENT_STREAM,
    (True, True): BIDI_STREAM,
}
_FACTORIES = {
    UNARY: grpc.unary_unary_rpc_method_handler,
    SERVER_STREAM: grpc.unary_stream_rpc_method_handler,
    CLIENT_STREAM: grpc.stream_unary_rpc_method_handler,
    BIDI_STREAM: grpc.stream_stream_rpc_method_handler,
}
REQUEST_ID = "x-request-id"  # metadata key of the request id, both ways
_MAX_REQUEST_ID_CHARS = 128  # a longer id from a caller is replaced, not logged
STATUS_DETAILS = "grpc-status-details-bin"  # where google.rpc.Status travels

Behavior = Callable[[Any, grpc.ServicerContext], Any]
Admit = Callable[[Any], AbstractContextManager[None]]
Authorize = Callable[[grpc.ServicerContext], str | None]  # the caller's principal name, if any
Observe = Callable[[grpc.ServicerContext], "_Observed"]


@dataclass(frozen=True, slots=True)
class _Received:
    """One request message as our decoder hands it over: the message, or why it is not one."""

    message: Any
    nbytes: int
    error: str | None = None


def _decoder(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], _Received]:
    """Wrap grpc's request deserializer so it never raises (it runs before any handler)."""

    def decode(raw: bytes) -> _Received:
        try:
            message = raw if deserializer is None else deserializer(raw)
        except Exception as exc:  # protobuf's DecodeError, or any parser failure: bad input
            return _Received(None, len(raw), str(exc) or type(exc).__name__)
        return _Received(message, len(raw))

    return decode


def _encoder(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """Wrap grpc's response serializer so a handler may answer bytes it encoded itself (a
    Recommend answered from its batch, `server.wire`): those are sent as they are."""
    if serializer is None:
        return None

    def encode(message: Any) -> bytes:
        return message if type(message) is bytes else serializer(message)

    return encode


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

    def end(self, start_s: float, context: grpc.ServicerContext) -> grpc.StatusCode:
        """Count the finished call; returns its status code."""
        code = context.code() or grpc.StatusCode.OK
        handled = self._handled.get(code)
        if handled is None:  # bound on first use, so only codes that happened are exported
            handled = self._metrics.grpc_handled.labels(**self._labels, grpc_code=code_label(code))
            self._handled[code] = handled
        handled.inc()
        self.handling_s.observe(time.monotonic() - start_s)
        self.in_flight.dec()
        return code

    def message(self, received: _Received) -> Any:
        """The decoded request, or INVALID_ARGUMENT (logged in one line) for undecodable bytes."""
        if received.error is None:
            return received.message
        log.info("undecodable %s request (%d bytes): %s", self.method, received.nbytes,
                 received.error)  # fmt: skip
        raise InvalidArgument(
            f"cannot decode the {self.method} request: {received.error}", reason=UNDECODABLE
        )

    def messages(self, received: Iterator[_Received]) -> Iterator[Any]:
        """The decoded messages of a request stream; INVALID_ARGUMENT at the first bad one."""
        for one in received:
            yield self.message(one)

    def fail(self, exc: Exception, context: grpc.ServicerContext) -> None:
        """Abort the call with the status `exc` maps to (re-raise a handler's own abort)."""
        if isinstance(exc, grpc.RpcError) and not context.is_active():
            # A request stream ended by the client (cancel, deadline): nothing to answer and
            # no server fault; grpc records the call as cancelled.
            return
        if not isinstance(exc, ServiceError):
            code = context.code()
            if code is not None and code != grpc.StatusCode.OK:
                # The handler set its status: context.abort(), or set_code() then raise, as
                # grpc's generated base class does for unimplemented methods. That status
                # stands, and (aborting again) grpc logs no traceback for it.
                details = context.details() or b""
                text = details.decode(errors="replace") if isinstance(details, bytes) else details
                context.abort(code, str(text))
            log.error("unexpected error in %s", self.method, exc_info=exc)
        code, message = to_status(exc)
        status = rich_status(exc)
        if status is not None:  # kept beside the request id the observer may have set
            kept = tuple(context.trailing_metadata() or ())
            context.set_trailing_metadata((*kept, (STATUS_DETAILS, status.SerializeToString())))
        context.abort(code, message)


class CallObserver:
    """Per-call observation: a server span, a request id and an access log line.

    Args:
        tracing: the server's tracing (None or disabled: no spans).
        access_log: write one access log line per call.
    """

    def __init__(self, tracing: Tracing | None = None, access_log: bool = False) -> None:
        self.tracing = tracing if tracing is not None and tracing.enabled else None
        self.access_log = AccessLog() if access_log else None

    @property
    def active(self) -> bool:
        return self.tracing is not None or self.access_log is not None

    def begin(self, method_path: str, context: grpc.ServicerContext) -> _Observed:
        """Start observing a call: its request id (echoed in trailing metadata) and span."""
        metadata = context.invocation_metadata() or ()
        request_id = _request_id(metadata)
        context.set_trailing_metadata(((REQUEST_ID, request_id),))
        span = None
        if self.tracing is not None:
            span = self.tracing.start_call(method_path, metadata)
            span.set_attribute("bertrec.request_id", request_id)
        return _Observed(self, method_path, request_id, span)

    def close(self) -> None:
        """Flush the spans still buffered (at server stop)."""
        if self.tracing is not None:
            self.tracing.shutdown()


class _Observed:
    """One observed call, from `CallObserver.begin` to `end`."""

    __slots__ = ("_method", "_observer", "_request_id", "_span", "principal")

    def __init__(
        self, observer: CallObserver, method: str, request_id: str, span: ServerSpan | None
    ) -> None:
        self._observer = observer
        self._method = method
        self._request_id = request_id
        self._span = span
        self.principal: str | None = None

    def end(self, code: grpc.StatusCode, start_s: float, context: grpc.ServicerContext) -> None:
        if self._span is not None:
            if self.principal is not None:
                self._span.set_attribute("enduser.id", self.principal)
            self._span.end(code.name, code.value[0])
        access_log = self._observer.access_log
        if access_log is not None:
            access_log.call(
                self._method, code_label(code), time.monotonic() - start_s, context.peer(),
                self._request_id, self.principal,
            )  # fmt: skip


def _request_id(metadata: Any) -> str:
    """The caller's `x-request-id` when it is a short printable string, else a new uuid4."""
    for key, value in metadata:
        if key != REQUEST_ID or not isinstance(value, str):
            continue
        if 0 < len(value) <= _MAX_REQUEST_ID_CHARS and value.isprintable():
            return value
    return uuid.uuid4().hex


class MetricsAndErrorsInterceptor(grpc.ServerInterceptor):
    """Admits calls, records the standard grpc_server_* series and maps exceptions to statuses.

    grpc asks the interceptor for a handler on every call; the wrapped handler of each method
    is built once and reused (handlers are fixed once the server has started).

    Args:
        metrics: the server's series.
        admission: the call, byte and stream caps (None: admit everything).
        stream_pool: the threads streaming calls run on (None: grpc's pool, shared with unary).
        authorizer: who may call what (None: everyone may call everything).
        observer: tracing, request ids and access log (None: off; the server passes its own).
    """

    def __init__(
        self,
        metrics: ServerMetrics,
        admission: Admission | None = None,
        stream_pool: ThreadPoolExecutor | None = None,
        authorizer: Authorizer | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        self._metrics = metrics
        self._observer = observer if observer is not None and observer.active else None
        self._admission = admission
        self._stream_pool = stream_pool
        self._authorizer = authorizer
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
        wrapped = self._wrap(method_path, handler)
        # Two threads may build the same method's handler at once; either result is equivalent.
        return self._wrapped.setdefault(method_path, wrapped)

    def _wrap(self, method_path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        grpc_type = _TYPES[(handler.request_streaming, handler.response_streaming)]
        service, _, method = method_path.lstrip("/").rpartition("/")
        labels = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method}
        series = _MethodSeries(self._metrics, labels)
        behavior = (
            handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream
        )  # fmt: skip
        unpack = series.messages if handler.request_streaming else series.message
        streaming = handler.request_streaming or handler.response_streaming
        wrap = _wrap_streaming if handler.response_streaming else _wrap_unary
        handle = wrap(
            behavior, series, unpack, self._admit(streaming), self._authorize(method_path),
            self._observe(method_path),
        )  # fmt: skip
        if streaming and self._stream_pool is not None:
            # grpc runs a behavior on the pool named by this attribute: open streams then never
            # hold the threads unary calls need.
            setattr(handle, "experimental_thread_pool", self._stream_pool)  # noqa: B010
        return _FACTORIES[grpc_type](
            handle,
            request_deserializer=_decoder(handler.request_deserializer),
            response_serializer=_encoder(handler.response_serializer),
        )

    def _authorize(self, method_path: str) -> Authorize:
        authorizer = self._authorizer
        if authorizer is None or not authorizer.enabled or METHOD_ROLES.get(method_path) == OPEN:
            return _open
        check = authorizer.check

        def authorize(context: grpc.ServicerContext) -> str | None:
            principal = check(
                method_path, context.invocation_metadata() or (), context.auth_context()
            )
            return None if principal is None else principal.name

        return authorize

    def _observe(self, method_path: str) -> Observe | None:
        observer = self._observer
        if observer is None:
            return None
        begin = observer.begin
        return lambda context: begin(method_path, context)

    def _admit(self, streaming: bool) -> Admit:
        admission = self._admission
        if admission is None:
            return lambda _request: nullcontext()
        if streaming:
            return lambda _request: admission.stream()
        return lambda request: admission.call(request.nbytes)


def _open(context: grpc.ServicerContext) -> str | None:
    return None


def _wrap_unary(
    behavior: Behavior,
    series: _MethodSeries,
    unpack: Callable[[Any], Any],
    admit: Admit,
    authorize: Authorize,
    observe: Observe | None,
) -> Behavior:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        start_s = series.begin()
        seen = None if observe is None else observe(context)
        try:
            principal = authorize(context)
            if seen is not None:
                seen.principal = principal
            message = unpack(request)
            with admit(request):
                return behavior(message, context)
        except Exception as exc:
            series.fail(exc, context)
        finally:
            code = series.end(start_s, context)
            if seen is not None:
                seen.end(code, start_s, context)

    return handle


def _wrap_streaming(
    behavior: Behavior,
    series: _MethodSeries,
    unpack: Callable[[Any], Any],
    admit: Admit,
    authorize: Authorize,
    observe: Observe | None,
) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        start_s = series.begin()
        seen = None if observe is None else observe(context)
        try:
            principal = authorize(context)
            if seen is not None:
                seen.principal = principal
            message = unpack(request)
            with admit(request):
                yield from behavior(message, context)
        except Exception as exc:
            series.fail(exc, context)
        finally:
            code = series.end(start_s, context)
            if seen is not None:
                seen.end(code, start_s, context)

    return handle
