"""Admission control for every RPC: calls, request bytes and open streams, decided at once.

grpc's own `maximum_concurrent_rpcs` rejects excess calls before any interceptor sees them, so
they never reach the metrics, and calls it admits beyond the handler threads wait in the thread
pool's unbounded queue holding their request bodies. Here admission is a counter checked when a
handler starts (the interceptor asks), so every refusal is a RESOURCE_EXHAUSTED that the
interceptor counts like any other status:

- unary calls: at most `max_calls` at once, and at most `max_request_bytes` of serialized
  requests among them (a few huge requests cannot take the memory many small ones would);
- streaming calls (health `Watch`, reflection): at most `max_streams` at once. They run on their
  own thread pool (`stream_pool`), so open streams can never take the threads unary calls need.

Each pool has a few threads more than its limit: a call over the limit finds a free thread and
is refused at once instead of queueing behind the admitted ones.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from bertrec.server.errors import ResourceExhausted

# Threads beyond each admission limit, so refusals are answered at once (each takes microseconds).
SPARE_THREADS = 8


@dataclass(frozen=True)
class AdmissionLimits:
    """How much work the server admits at once; beyond it, calls get RESOURCE_EXHAUSTED."""

    max_calls: int
    max_request_bytes: int
    max_streams: int


class Admission:
    """Non-blocking permits for unary calls (count and request bytes) and streaming calls.

    Args:
        limits: the caps.
        rejected: `bertrec_rejected_rpcs_total`, labelled by reason (calls, bytes, streams).
        request_bytes: `bertrec_in_flight_request_bytes`, the admitted calls' request bytes.
    """

    def __init__(self, limits: AdmissionLimits, rejected: Counter, request_bytes: Gauge) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._calls = 0
        self._bytes = 0
        self._streams = 0
        self._rejected = {r: rejected.labels(reason=r) for r in ("calls", "bytes", "streams")}
        self._request_bytes = request_bytes

    @contextmanager
    def call(self, nbytes: int) -> Iterator[None]:
        """Hold a unary-call permit for `nbytes` of request while the block runs.

        Raises:
            ResourceExhausted: too many calls or too many request bytes in flight.
        """
        limits = self.limits
        with self._lock:
            if self._calls >= limits.max_calls:
                reason = "calls"
            elif self._bytes + nbytes > limits.max_request_bytes:
                reason = "bytes"
            else:
                reason = ""
                self._calls += 1
                self._bytes += nbytes
        if reason:
            self._refuse(reason, nbytes)
        self._request_bytes.inc(nbytes)
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1
                self._bytes -= nbytes
            self._request_bytes.dec(nbytes)

    @contextmanager
    def stream(self) -> Iterator[None]:
        """Hold a streaming-call permit while the block runs.

        Raises:
            ResourceExhausted: `max_streams` streams are open already.
        """
        with self._lock:
            admitted = self._streams < self.limits.max_streams
            if admitted:
                self._streams += 1
        if not admitted:
            self._refuse("streams", 0)
        try:
            yield
        finally:
            with self._lock:
                self._streams -= 1

    def _refuse(self, reason: str, nbytes: int) -> None:
        self._rejected[reason].inc()
        limits = self.limits
        if reason == "calls":
            detail = f"{limits.max_calls} calls in flight (max_concurrent_rpcs)"
        elif reason == "bytes":
            detail = (
                f"a {nbytes}-byte request would pass the {limits.max_request_bytes} bytes of "
                "requests in flight (max_inflight_request_bytes)"
            )
        else:
            detail = f"{limits.max_streams} streams open (max_streaming_rpcs)"
        raise ResourceExhausted(f"server busy: {detail}; retry with backoff")


def handler_pools(
    limits: AdmissionLimits, min_workers: int
) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
    """The unary-call pool and the streaming-call pool, each `SPARE_THREADS` above its limit.

    Args:
        limits: the admission caps the pools must exceed.
        min_workers: unary handler threads wanted anyway (`grpc_max_workers`).

    Threads start only when needed, so a large limit costs nothing while the server is idle.
    """
    workers = max(min_workers, limits.max_calls + SPARE_THREADS)
    calls = ThreadPoolExecutor(workers, thread_name_prefix="grpc")
    streams = ThreadPoolExecutor(
        limits.max_streams + SPARE_THREADS, thread_name_prefix="grpc-stream"
    )
    return calls, streams
