"""The HTTP side of the server: `/metrics`, `/healthz` and `/readyz`, and nothing else.

prometheus_client's `start_http_server` answers the metrics on every path and starts one thread
per connection with no timeout, so each half-open connection holds a thread for good. This
server answers three paths (404 elsewhere, 405 for methods other than GET/HEAD), closes every
connection after one response, drops a connection silent for `timeout_s`, and serves at most
`max_connections` at once (further connections are closed at once, costing no thread).

- `/metrics`: the server's registry in the format the scraper asks for (Prometheus text or
  OpenMetrics, gzip if accepted), as prometheus_client's own handler does.
- `/healthz`: 200 while the process runs (a liveness probe).
- `/readyz`: 200 once the model is loaded and warmed up and until shutdown begins, 503 otherwise
  (the same as grpc.health.v1 reporting SERVING).
"""

from __future__ import annotations

import gzip
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from bertrec.server.tls import TlsFiles

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 16
PATHS = ("/metrics", "/healthz", "/readyz")


class _Server(ThreadingHTTPServer):
    """A thread per connection, but at most `max_connections` of them."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        tls: TlsFiles | None = None,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._slots = threading.BoundedSemaphore(max_connections)
        self._tls = _RotatingContext(tls) if tls is not None else None
        super().__init__(address, handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self._tls is None:
            return sock, address
        # The handshake runs on the first read, in the connection's own thread (bounded by
        # the handler's timeout), so a silent client never stalls the accept loop.
        return self._tls.context().wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), address

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: close now rather than queue a thread
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _RotatingContext:
    """A server `SSLContext` whose certificate follows its files (checked per connection)."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._context = self._load()

    def context(self) -> ssl.SSLContext:
        with self._lock:
            try:
                signature = self._stat()
                if signature != self._signature:
                    self._context = self._load()
                    self._signature = signature
                    log.info("metrics tls: reloaded the certificate from %s", self._files.cert)
            except (OSError, ssl.SSLError) as exc:
                log.error("metrics tls: %s; keeping the certificate loaded before", exc)
            return self._context

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._files.cert, self._files.key)
        if self._files.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self._files.client_ca)
        return context

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        paths = [self._files.cert, self._files.key]
        if self._files.client_ca is not None:
            paths.append(self._files.client_ca)
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in map(os.stat, paths))


class HttpEndpoints:
    """The metrics and probe endpoints on one port.

    Args:
        host: address to bind ("0.0.0.0", "127.0.0.1", "::").
        port: port to bind; 0 picks a free one (see `port` after `start`).
        registry: the metrics to serve.
        ready: whether the model is serving (what `/readyz` reports).
        timeout_s: how long a connection may stay silent before it is closed.
        max_connections: connections served at once.
        tls: serve HTTPS with these files (re-read on change); the client CA, if any, is
            required of clients as on the gRPC port.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        timeout_s: float = 5.0,
        max_connections: int = MAX_CONNECTIONS,
        tls: TlsFiles | None = None,
    ) -> None:
        handler = type(
            "Handler",
            (_Handler,),
            {"registry": registry, "ready": staticmethod(ready), "timeout": timeout_s},
        )
        self._server = _Server((host, port), handler, max_connections, tls)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        """Start answering in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop answering and close the port."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    """One request per connection; `timeout` (seconds) bounds every socket read and write."""

    registry: CollectorRegistry
    ready: Callable[[], bool]
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._metrics()
        elif path == "/healthz":
            self._reply(200, b"ok\n")
        elif path == "/readyz":
            ready = self.ready()
            self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
        else:
            self._reply(404, f"not found; paths: {', '.join(PATHS)}\n".encode())

    def do_HEAD(self) -> None:
        self.do_GET()

    def _metrics(self) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(self.registry)
        headers = {"Content-Type": content_type}
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        self._reply(200, body, headers)

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {"Content-Type": "text/plain; charset=utf-8"}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Unsupported methods and malformed requests: a short reply, no HTML page.
        if code == HTTPStatus.NOT_IMPLEMENTED:  # what the base class says for other methods
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD"
        self.close_connection = True
        self._reply(code, f"{code} {message or ''}\n".encode())

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)
