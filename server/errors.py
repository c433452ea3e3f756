"""The server's one error hierarchy, and the one place that turns any exception into a status.

Every `ServiceError` carries the gRPC status code it maps to and a message a caller can act on.
`to_status` is the single conversion table used by the interceptor: service errors keep their
code and message; anything else is an unexpected fault and becomes INTERNAL with a generic
message (the details go to the log), never UNKNOWN.

Messages often echo what the caller sent (an unknown id, a model name). Every message is
shortened here, in one place, to at most `MAX_MESSAGE_CHARS`: an echoed 20,000-character id
would otherwise push the status past gRPC's 16 KB metadata limit, and the caller would get a
transport error instead of the status the server counted.
"""

from __future__ import annotations

import grpc

# Long enough for any message of ours with a short id in it; a few hundred bytes on the wire.
MAX_MESSAGE_CHARS = 300
_KEEP_END = 60  # an elided message keeps its end too: it often says what was expected


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text`, or its start and end around a note of how much was cut when it is too long."""
    if len(text) <= limit:
        return text
    widest_note = len(f"...[{len(text)} chars cut]...")
    head = limit - _KEEP_END - widest_note
    cut = len(text) - head - _KEEP_END
    return f"{text[:head]}...[{cut} chars cut]...{text[len(text) - _KEEP_END :]}"


class ServiceError(Exception):
    """A request that cannot be answered; `code` is the gRPC status it maps to.

    The message is shortened (see `shorten`), so raisers may echo client input freely.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        message = shorten(message)
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """Malformed request: bad k, empty or oversized text, too many or duplicate ids."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """Unknown user or item id (named in the message)."""

    code = grpc.StatusCode.NOT_FOUND


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
