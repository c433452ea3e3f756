"""Sweeps and the max-rate search: which load steps to run, and how to judge one against an SLO.

Pure control logic over a `measure(rate) -> Summary` callback, so it is testable with a fake.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from bertrec.bench.loadtest.recorder import Summary
from bertrec.bench.loadtest.verdict import DEFAULT_MAX_ERROR_RATE, breaches


@dataclass(frozen=True)
class Slo:
    """A step passes when its p99 (OK calls) is within `p99_ms` and errors are rare enough."""

    p99_ms: float
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE

    def passes(self, summary: Summary) -> bool:
        return not breaches(summary, self.max_error_rate, self.p99_ms)


@dataclass
class SearchResult:
    """The highest passing rate found (0 when none passed) and every rate tried, in order."""

    best_rate_rps: float
    tried: list[tuple[float, bool]] = field(default_factory=list)
    converged: bool = False


def find_max_rate(
    measure: Callable[[float], Summary],
    slo: Slo,
    start_rate_rps: float = 50.0,
    max_steps: int = 12,
    precision: float = 0.05,
) -> SearchResult:
    """Highest open-loop rate meeting `slo`: double (or halve) to bracket it, then bisect.

    Stops after `max_steps` measurements, or once the bracket is narrower than `precision`
    times its lower end (then `converged` is True).
    """
    result = SearchResult(0.0)

    def step(rate: float) -> bool:
        passed = slo.passes(measure(rate))
        result.tried.append((rate, passed))
        if passed:
            result.best_rate_rps = max(result.best_rate_rps, rate)
        return passed

    good, bad = 0.0, math.inf
    rate = start_rate_rps
    while len(result.tried) < max_steps and math.isinf(bad):  # bracket upwards
        if step(rate):
            good, rate = rate, rate * 2
        else:
            bad = rate
    while len(result.tried) < max_steps and good == 0.0 and rate > 1.0:  # or downwards
        rate = bad / 2
        if step(rate):
            good = rate
        else:
            bad = rate
    while len(result.tried) < max_steps and good > 0 and (bad - good) > precision * good:
        middle = (good + bad) / 2
        if step(middle):
            good = middle
        else:
            bad = middle
    result.converged = good > 0 and not math.isinf(bad) and (bad - good) <= precision * good
    return result


def parse_steps(spec: str, kind: type[int] | type[float]) -> list[float]:
    """`1,4,16` -> [1, 4, 16] (positive numbers, order kept)."""
    values = [kind(v) for v in spec.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected positive numbers separated by commas, got {spec!r}")
    return [float(v) for v in values]
