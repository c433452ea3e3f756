"""The drain's quiet detection and hand-over to grpc, with fake call counts and a fake server."""

from __future__ import annotations

import signal
import time

import pytest
from prometheus_client import CollectorRegistry

from bertrec.server import drain
from bertrec.server.drain import drain_grpc, on_stop_signals, unary_activity, wait_until_quiet
from bertrec.server.metrics import ServerMetrics


class Counts:
    """Started/finished counts that follow a script: one entry per look, the last one kept."""

    def __init__(self, *script: tuple[float, float]) -> None:
        self.script = list(script)
        self.looks = 0

    def __call__(self) -> tuple[float, float]:
        self.looks += 1
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


def test_quiet_once_nothing_is_in_flight_or_started_for_the_settle_time() -> None:
    counts = Counts((3, 1), (4, 2), (4, 4), (4, 4))
    assert wait_until_quiet(counts, time.monotonic() + 5, settle_s=0.05, poll_s=0.001)
    assert counts.looks >= 4


def test_a_call_in_flight_keeps_it_waiting_until_the_deadline() -> None:
    counts = Counts((5, 4))
    start = time.monotonic()
    assert not wait_until_quiet(counts, start + 0.1, settle_s=0.01, poll_s=0.001)
    assert time.monotonic() - start >= 0.1


class FakeServer:
    def __init__(self) -> None:
        self.grace: float | None = None

    def stop(self, grace: float | None) -> FakeServer:
        self.grace = grace
        return self

    def wait(self) -> None:
        pass


def test_grpc_is_stopped_with_the_grace_left_after_the_quiet_wait() -> None:
    server = FakeServer()
    drain_grpc(server, Counts((2, 2)), grace_s=10.0, settle_s=0.05)
    assert server.grace is not None and 9.0 < server.grace < 10.0


def test_traffic_that_never_stops_still_leaves_half_the_grace_to_grpc() -> None:
    server = FakeServer()
    start = time.monotonic()
    drain_grpc(server, Counts((7, 6)), grace_s=0.4, settle_s=0.05)
    assert time.monotonic() - start < 0.4
    assert server.grace is not None and 0.1 < server.grace <= 0.2 + 0.01


def test_unary_activity_reads_the_interceptors_counters_and_ignores_streams() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    unary = {"grpc_type": "unary", "grpc_service": "s", "grpc_method": "m"}
    stream = {**unary, "grpc_type": "server_stream"}
    metrics.grpc_started.labels(**unary).inc(3)
    metrics.grpc_started.labels(**stream).inc(5)
    metrics.grpc_handled.labels(**unary, grpc_code="OK").inc(2)
    assert unary_activity(metrics.registry) == (3.0, 2.0)


def test_sigterm_sigint_and_sighup_all_request_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    handlers = {}
    monkeypatch.setattr(
        drain.signal, "signal", lambda sig, handler: handlers.update({sig: handler})
    )
    asked: list[bool] = []
    on_stop_signals(lambda: asked.append(True))
    assert set(handlers) == {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    for sig, handler in handlers.items():
        handler(sig, None)
    assert asked == [True] * 3
