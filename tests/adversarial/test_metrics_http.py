"""The metrics/probe HTTP port (issue 12, item 11): three paths only, and no thread per idler.

Most tests run `HttpEndpoints` on its own (a registry and a readiness switch), which makes
readiness and timeouts easy to drive; the last ones check the real server's port.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from bertrec.server.http_endpoints import HttpEndpoints

from .conftest import AdversarialServer

TIMEOUT_S = 0.5  # how long the endpoints let a connection stay silent
MAX_CONNECTIONS = 4


class Switch:
    """What `/readyz` reports, set by the test."""

    def __init__(self) -> None:
        self.on = False

    def __call__(self) -> bool:
        return self.on


@pytest.fixture()
def endpoints() -> Iterator[tuple[HttpEndpoints, Switch]]:
    registry = CollectorRegistry()
    Counter("demo_calls_total", "Calls.", registry=registry).inc(3)
    ready = Switch()
    server = HttpEndpoints("127.0.0.1", 0, registry, ready, TIMEOUT_S, MAX_CONNECTIONS)
    server.start()
    try:
        yield server, ready
    finally:
        server.stop()


def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_are_served_on_metrics_only(endpoints: tuple[HttpEndpoints, Switch]) -> None:
    server, _ = endpoints
    status, body = get(server.port, "/metrics")
    assert status == 200
    assert "demo_calls_total 3.0" in body
    assert get(server.port, "/metrics?name[]=demo_calls_total")[0] == 200
    for path in ("/", "/metric", "/metrics/x", "/favicon.ico", "/../metrics"):
        assert get(server.port, path)[0] == 404, path


def test_other_methods_are_refused(endpoints: tuple[HttpEndpoints, Switch]) -> None:
    server, _ = endpoints
    assert get(server.port, "/metrics", "POST")[0] == 405
    assert get(server.port, "/metrics", "DELETE")[0] == 405
    assert get(server.port, "/metrics", "HEAD") == (200, "")


def test_gzip_when_asked(endpoints: tuple[HttpEndpoints, Switch]) -> None:
    server, _ = endpoints
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Encoding") == "gzip"
    connection.close()


def test_healthz_is_liveness_and_readyz_follows_readiness(
    endpoints: tuple[HttpEndpoints, Switch],
) -> None:
    server, ready = endpoints
    assert get(server.port, "/healthz") == (200, "ok\n")
    assert get(server.port, "/readyz")[0] == 503
    ready.on = True
    assert get(server.port, "/readyz") == (200, "ready\n")
    ready.on = False  # shutting down
    assert get(server.port, "/readyz")[0] == 503


def test_silent_connections_are_closed(endpoints: tuple[HttpEndpoints, Switch]) -> None:
    server, _ = endpoints
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as idle:
        idle.sendall(b"GET /metr")  # a request that never ends
        assert idle.recv(1024) == b""  # the server hung up (before this 10 s read timeout)


def test_idle_connections_hold_a_bounded_number_of_threads() -> None:
    # A long timeout here, so the idlers stay open while the threads are counted.
    server = HttpEndpoints("127.0.0.1", 0, CollectorRegistry(), Switch(), 5.0, MAX_CONNECTIONS)
    server.start()
    threads_before = threading.active_count()
    idlers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    try:
        # Watch the thread count for a while as the server accepts them (an unbounded server
        # starts one thread per connection: 20-40 here).
        most = 0
        for _ in range(100):
            most = max(most, threading.active_count() - threads_before)
            time.sleep(0.01)
        assert most <= MAX_CONNECTIONS
    finally:
        for idler in idlers:
            idler.close()
    try:  # once the idlers are gone, scrapes are answered again
        deadline = time.monotonic() + 30
        while True:
            try:
                assert get(server.port, "/metrics")[0] == 200
                break
            except (OSError, http.client.HTTPException):
                assert time.monotonic() < deadline, "metrics never answered again"
                time.sleep(0.05)
    finally:
        server.stop()


# The real server's HTTP port.


def test_the_server_serves_its_metrics_and_probes(adversarial_server: AdversarialServer) -> None:
    port = adversarial_server.process.metrics_port
    status, body = get(port, "/metrics")
    assert status == 200
    assert "grpc_server_started_total" in body
    assert "bertrec_in_flight_request_bytes" in body
    assert get(port, "/healthz")[0] == 200
    assert get(port, "/readyz") == (200, "ready\n")
    assert get(port, "/anything")[0] == 404
