"""When to send and what: open-loop Poisson arrival times and the weighted RPC sequence.

Pure numpy, seeded, so the schedules are unit-testable without a server.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NS = 1_000_000_000


def poisson_arrivals(rate_rps: float, horizon_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival offsets (int64 ns from 0, ascending, all < horizon) of a Poisson process.

    Inter-arrival gaps are exponential with mean 1/rate, so the count in any window of length T
    is Poisson(rate * T) and arrivals are uncorrelated, as independent users' requests are.
    """
    if rate_rps <= 0 or horizon_s <= 0:
        return np.zeros(0, np.int64)
    expected = rate_rps * horizon_s
    chunks: list[np.ndarray] = []
    last = 0.0
    while last < horizon_s:
        n = int(expected + 6 * np.sqrt(expected) + 16)
        times = last + np.cumsum(rng.exponential(1.0 / rate_rps, n))
        chunks.append(times)
        last = float(times[-1])
    arrivals = np.concatenate(chunks)
    return (arrivals[arrivals < horizon_s] * NS).astype(np.int64)


def open_loop_schedule(
    rate_rps: float,
    warmup_s: float,
    duration_s: float,
    max_requests: int | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Intended send offsets (ns) for warm-up plus the measured window.

    Warm-up arrivals are all kept; at most `max_requests` arrivals follow in the measured
    window (which starts at `warmup_s`), so both bounds hold.
    """
    arrivals = poisson_arrivals(rate_rps, warmup_s + duration_s, rng)
    if max_requests is None:
        return arrivals
    warm = int(np.searchsorted(arrivals, int(warmup_s * NS)))
    return arrivals[: warm + max(max_requests, 0)]


def rpc_sequence(weights: Sequence[float], count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` RPC indices drawn independently with the given (normalised) weights."""
    p = np.asarray(weights, dtype=np.float64)
    return rng.choice(len(p), size=count, p=p / p.sum()).astype(np.int8)
