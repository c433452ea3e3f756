"""The server's log lines: text or JSON (one object per line), and the optional access log.

`configure` replaces whatever logging configuration came before (the top-level `bertrec` CLI
calls `logging.basicConfig`), so `bertrec serve --log-format json` writes nothing but JSON
objects to stderr: `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `message`, the
record's extra fields, and `exception` (the formatted traceback) where there is one. Text lines
carry the same extras as ` key=value` after the message.

The access log (`--access-log`, logger `bertrec.access`, level INFO) is one line per call,
written by the interceptor: method, code, duration_ms, peer, request_id and, for an
authenticated caller, principal (the credential's name from the credentials file). It never
holds request payloads, user text or tokens: only these fields are logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

ACCESS_LOGGER = "bertrec.access"
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller added with `extra=` (in the order they were given)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line; values JSON cannot hold become strings."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extras(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The usual text line, with the record's extra fields appended as ` key=value`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = extras(record)
        if not fields:
            return text
        return text + "".join(f" {key}={value}" for key, value in fields.items())


def configure(log_format: str, level: str, stream: TextIO | None = None) -> None:
    """Send every log record at `level` or above to `stream` (stderr) as text or JSON.

    Replaces the root logger's handlers, so an earlier `basicConfig` leaves no second format.

    Args:
        log_format: "text" or "json".
        level: "debug", "info", "warning" or "error".
        stream: where lines go (default: stderr).
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())


class AccessLog:
    """Writes the access log line of a finished call (see the module doc for its fields)."""

    def __init__(self) -> None:
        self._log = logging.getLogger(ACCESS_LOGGER)

    def call(
        self,
        method: str,
        code: str,
        duration_s: float,
        peer: str,
        request_id: str,
        principal: str | None,
    ) -> None:
        """Log one finished call (only the named fields: never payloads or credentials)."""
        fields: dict[str, Any] = {
            "method": method,
            "code": code,
            "duration_ms": round(duration_s * 1e3, 3),
            "peer": peer,
            "request_id": request_id,
        }
        if principal is not None:
            fields["principal"] = principal
        self._log.info("%s %s", method, code, extra=fields)
