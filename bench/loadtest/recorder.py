"""Per-call records in growable numpy arrays, and the summary math over them.

Every call is stored as (rpc, intended send, actual send, completion, status code) in
nanoseconds since the run's start. Latency is completion minus the *intended* send time: in the
open loop a call the generator (or a full in-flight window) sent late still counts its wait, so
queueing is never hidden (coordinated omission). In the closed loop intended == actual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
OK = 0
# grpc.StatusCode values, by number, so recording needs no grpc import.
STATUS_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
    13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}  # fmt: skip


class Recorder:
    """Append-only call records; capacity doubles as needed (amortised O(1) appends)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.size = 0
        self._rpc = np.zeros(capacity, np.int8)
        self._times = np.zeros((capacity, 3), np.int64)  # intended, sent, done
        self._code = np.zeros(capacity, np.int8)

    def add(self, rpc: int, intended_ns: int, sent_ns: int, done_ns: int, code: int) -> None:
        if self.size == len(self._rpc):
            self._grow()
        i = self.size
        self._rpc[i] = rpc
        self._times[i] = (intended_ns, sent_ns, done_ns)
        self._code[i] = code
        self.size += 1

    def _grow(self) -> None:
        n = 2 * len(self._rpc)
        self._rpc = np.resize(self._rpc, n)
        self._times = np.resize(self._times, (n, 3))
        self._code = np.resize(self._code, n)

    def slice(self, start: int, stop: int) -> Calls:
        """Records `start` to `stop` in completion order (used by the live progress line)."""
        t = self._times[start:stop]
        return Calls(self._rpc[start:stop].copy(), t[:, 0].copy(), t[:, 1].copy(),
                     t[:, 2].copy(), self._code[start:stop].copy())  # fmt: skip

    def calls(self, since_ns: int = 0) -> Calls:
        """The records whose intended send time is at or after `since_ns` (warm-up excluded)."""
        times = self._times[: self.size]
        keep = times[:, 0] >= since_ns
        return Calls(
            rpc=self._rpc[: self.size][keep].copy(),
            intended_ns=times[keep, 0].copy(),
            sent_ns=times[keep, 1].copy(),
            done_ns=times[keep, 2].copy(),
            code=self._code[: self.size][keep].copy(),
        )


@dataclass(frozen=True)
class Calls:
    """Column arrays of recorded calls."""

    rpc: np.ndarray
    intended_ns: np.ndarray
    sent_ns: np.ndarray
    done_ns: np.ndarray
    code: np.ndarray

    @property
    def latency_ms(self) -> np.ndarray:
        return (self.done_ns - self.intended_ns) / 1e6

    def select(self, mask: np.ndarray) -> Calls:
        return Calls(self.rpc[mask], self.intended_ns[mask], self.sent_ns[mask],
                     self.done_ns[mask], self.code[mask])  # fmt: skip


@dataclass(frozen=True)
class LatencyStats:
    """Exact percentiles (ms) of a latency sample."""

    count: int
    mean_ms: float
    percentiles_ms: dict[str, float]
    max_ms: float


def latency_stats(latency_ms: np.ndarray) -> LatencyStats:
    """Exact percentiles: the smallest sample with at least p% of samples at or below it."""
    if latency_ms.size == 0:
        nan = float("nan")
        return LatencyStats(0, nan, {percentile_key(p): nan for p in PERCENTILES}, nan)
    ordered = np.sort(latency_ms)
    n = ordered.size
    # Nearest rank, with a tolerance so that e.g. 99.9% of 1000 is rank 999, not 1000.
    ranks = [min(max(int(np.ceil(n * p / 100 - 1e-9)), 1), n) for p in PERCENTILES]
    values = ordered[np.asarray(ranks) - 1]
    return LatencyStats(
        count=int(latency_ms.size),
        mean_ms=float(latency_ms.mean()),
        percentiles_ms={
            percentile_key(p): float(v) for p, v in zip(PERCENTILES, values, strict=True)
        },
        max_ms=float(latency_ms.max()),
    )


def percentile_key(p: float) -> str:
    """50.0 -> "p50", 99.9 -> "p99.9"."""
    return f"p{p:g}"


@dataclass(frozen=True)
class Summary:
    """One run (or one RPC of it): counts, throughput, latency of OK calls, errors by code."""

    requests: int
    ok: int
    errors: dict[str, int]
    window_s: float
    throughput_rps: float  # OK answers per second of the measured window
    offered_rps: float  # calls sent per second, over the span of their intended send times
    latency: LatencyStats
    send_lag_ms: LatencyStats = field(default_factory=lambda: latency_stats(np.zeros(0)))

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def summarize(calls: Calls, window_s: float) -> Summary:
    """Summary of `calls` over a measured window of `window_s` seconds."""
    ok = calls.code == OK
    codes, counts = np.unique(calls.code[~ok], return_counts=True)
    errors = {
        STATUS_NAMES.get(int(c), str(int(c))): int(n) for c, n in zip(codes, counts, strict=True)
    }
    window = max(window_s, 1e-9)
    return Summary(
        requests=int(calls.code.size),
        ok=int(ok.sum()),
        errors=errors,
        window_s=window_s,
        throughput_rps=float(ok.sum()) / window,
        offered_rps=_send_rate(calls.intended_ns),
        latency=latency_stats(calls.latency_ms[ok]),
        send_lag_ms=latency_stats((calls.sent_ns - calls.intended_ns) / 1e6),
    )


def _send_rate(intended_ns: np.ndarray) -> float:
    """Calls per second over the span of their intended send times (n - 1 gaps)."""
    if intended_ns.size < 2:
        return float("nan")
    span = int(intended_ns.max() - intended_ns.min())
    return (intended_ns.size - 1) / max(span / 1e9, 1e-9)


def per_rpc(calls: Calls, names: Sequence[str], window_s: float) -> dict[str, Summary]:
    """Summary per RPC index (names[i] is RPC i); RPCs with no calls are left out."""
    return {
        name: summarize(calls.select(calls.rpc == i), window_s)
        for i, name in enumerate(names)
        if np.any(calls.rpc == i)
    }


@dataclass(frozen=True)
class Bucket:
    """One second of a run, by completion time: answers, errors and latency percentiles."""

    t_s: float
    ok: int
    errors: int
    percentiles_ms: dict[str, float]
    max_ms: float


def timeline(calls: Calls, start_ns: int, bucket_s: float = 1.0) -> list[Bucket]:
    """Per-bucket stats over completion time, from `start_ns` on (empty buckets kept)."""
    if calls.code.size == 0:
        return []
    index = ((calls.done_ns - start_ns) // int(bucket_s * 1e9)).astype(np.int64)
    latency = calls.latency_ms
    buckets = []
    for b in range(int(max(index.max(), 0)) + 1):
        here = index == b
        ok = here & (calls.code == OK)
        stats = latency_stats(latency[ok])
        buckets.append(Bucket((b + 1) * bucket_s, int(ok.sum()), int(here.sum() - ok.sum()),
                              stats.percentiles_ms, stats.max_ms))  # fmt: skip
    return buckets
