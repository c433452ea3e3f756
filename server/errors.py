"""The server's one error hierarchy, and the one place that turns any exception into a status.

Every `ServiceError` carries the gRPC status code it maps to and a message a caller can act on.
`to_status` is the single conversion table used by the interceptor: service errors keep their
code and message; anything else is an unexpected fault and becomes INTERNAL with a generic
message (the details go to the log), never UNKNOWN.

Messages often echo what the caller sent (an unknown id, a model name). Every message is
shortened here, in one place, to at most `MAX_MESSAGE_CHARS`: an echoed 20,000-character id
would otherwise push the status past gRPC's 16 KB metadata limit, and the caller would get a
transport error instead of the status the server counted.

Rich details (the `google.rpc` error model, readable by grpcurl and every gRPC client library
through `grpc-status-details-bin`): an error may name the request `field` at fault (a path such
as `events[3].item_id`) and a machine-readable `reason` (`UNKNOWN_USER`, `INVALID_K`, ...).
`rich_status` turns them into `google.rpc.BadRequest` field violations and an `ErrorInfo` in
domain `bertrec.dev`; INVALID_ARGUMENT and NOT_FOUND always carry an `ErrorInfo`. The plain
code and message stay as they were, so callers that ignore details see no change.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

_MAX_FIELD_CHARS = 120  # field paths are ours (`events[12].item_id`); a cap keeps them small
# Long enough for any message of ours with a short id in it; a few hundred bytes on the wire.
MAX_MESSAGE_CHARS = 300
_KEEP_END = 60  # an elided message keeps its end too: it often says what was expected
ERROR_DOMAIN = "bertrec.dev"  # ErrorInfo.domain: reasons are unique within it

# ErrorInfo reasons: stable names programs match on (the message may change, these may not).
EMPTY = "EMPTY"  # a required field, list or text is empty
TOO_LARGE = "TOO_LARGE"  # a text or id has more bytes than allowed
TOO_MANY = "TOO_MANY"  # a list has more entries than allowed
DUPLICATE = "DUPLICATE"  # an id is listed twice
OUT_OF_RANGE = "OUT_OF_RANGE"  # a number (rating, timestamp) outside its range
INVALID_K = "INVALID_K"  # k negative or above max_k
INVALID_KIND = "INVALID_KIND"  # an enum value the server does not know
UNKNOWN_USER = "UNKNOWN_USER"  # no such user (or forgotten)
UNKNOWN_ITEM = "UNKNOWN_ITEM"  # no such item in the catalogue
UNKNOWN_MODEL = "UNKNOWN_MODEL"  # a model name this server does not serve
UNKNOWN_VERSION = "UNKNOWN_VERSION"  # a model version that is not loaded
UNDECODABLE = "UNDECODABLE"  # the request bytes are not a valid message


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text`, or its start and end around a note of how much was cut when it is too long.

    `limit` counts UTF-8 bytes, as the trailers do: an echoed character may take four.
    """
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    widest_note = len(f"...[{len(text)} chars cut]...")
    head = data[: limit - _KEEP_END - widest_note].decode("utf-8", "ignore")
    tail = data[len(data) - _KEEP_END :].decode("utf-8", "ignore")
    cut = len(text) - len(head) - len(tail)
    return f"{head}...[{cut} chars cut]...{tail}"


class ServiceError(Exception):
    """A request that cannot be answered; `code` is the gRPC status it maps to.

    The message is shortened (see `shorten`), so raisers may echo client input freely.

    Args:
        message: what went wrong, for a person.
        field: the request field at fault, as a path (`events[3].item_id`, `k`); becomes a
            `google.rpc.BadRequest` field violation.
        reason: UPPER_SNAKE_CASE cause for programs (`UNKNOWN_ITEM`); becomes the
            `google.rpc.ErrorInfo` reason. Defaults to the class's `default_reason`.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str | None = None  # errors without one carry no ErrorInfo unless given

    def __init__(self, message: str, field: str | None = None, reason: str | None = None) -> None:
        message = shorten(message)
        super().__init__(message)
        self.message = message
        self.field = None if field is None else shorten(field, _MAX_FIELD_CHARS)
        self.reason = reason or self.default_reason


class InvalidArgument(ServiceError):
    """Malformed request: bad k, empty or oversized text, too many or duplicate ids."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    """Unknown user or item id (named in the message)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class NotReady(ServiceError):
    """The model is not loaded and warmed up yet (or is shutting down)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(ServiceError):
    """The call's deadline passed before its work ran; the work was dropped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    """The caller went away; the work was dropped."""

    code = grpc.StatusCode.CANCELLED


class ResourceExhausted(ServiceError):
    """A work queue is full: the call is rejected at once instead of queueing without bound."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """A backing service (the feedback store) cannot be reached; nothing was stored, and a
    retry (with the same idempotency keys) is safe."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    """No valid credential where the method needs one (server/auth.py)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """A valid credential without the role the method needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class InternalError(ServiceError):
    """A fault on the server side; the message shown to callers is generic."""

    code = grpc.StatusCode.INTERNAL


INTERNAL_MESSAGE = "internal error (see server log)"


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for `exc`.

    Args:
        exc: any exception raised while handling a call.

    Returns:
        `(exc.code, exc.message)` for a `ServiceError`, else `(INTERNAL, generic message)`.
    """
    if isinstance(exc, InternalError):
        return exc.code, INTERNAL_MESSAGE
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def rich_status(exc: BaseException) -> status_pb2.Status | None:
    """The `google.rpc.Status` with details for `exc`, or None where it has none to add.

    Details: a `BadRequest` with one field violation when the error names a field, and an
    `ErrorInfo` (reason, domain `bertrec.dev`, the field in its metadata) when it has a reason.
    Internal errors never carry details (nothing about a server fault reaches the caller).

    Args:
        exc: any exception raised while handling a call.

    Returns:
        The status to send as `grpc-status-details-bin` (code and message as `to_status`).
    """
    if not isinstance(exc, ServiceError) or isinstance(exc, InternalError):
        return None
    if exc.field is None and exc.reason is None:
        return None
    details = []
    if exc.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.message
        )
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if exc.reason is not None:
        metadata = {} if exc.field is None else {"field": exc.field}
        details.append(
            error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN, metadata=metadata)
        )
    packed = []
    for detail in details:
        one = any_pb2.Any()
        one.Pack(detail)
        packed.append(one)
    code, message = to_status(exc)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)
