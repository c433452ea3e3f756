"""Pass or fail: the thresholds a load test's steps must meet, and the reasons one did not.

A load test is a gate (before a launch, in CI), so its exit status must say whether the server
met the thresholds: a run where most calls failed is a failure, however fast the failures were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy-free at import: the CLI reads the default while building its flags
    from bertrec.bench.loadtest.recorder import Summary

DEFAULT_MAX_ERROR_RATE = 0.01
EXIT_FAILED = 1  # thresholds not met (2 stays the CLI's "bad flags or unreachable server")


@dataclass(frozen=True)
class Thresholds:
    """The most a passing step may show: its error share and, if set, the p99 of its OK calls."""

    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    max_p99_ms: float | None = None


@dataclass(frozen=True)
class Verdict:
    """The outcome of a whole run; `reasons` names every threshold a step broke."""

    passed: bool
    reasons: tuple[str, ...]
    thresholds: Thresholds

    def lines(self) -> list[str]:
        """What to print: one PASS line, or a FAIL line and one line per reason."""
        t = self.thresholds
        limits = f"errors <= {t.max_error_rate:.2%}" + (
            f", p99 <= {t.max_p99_ms:g} ms" if t.max_p99_ms is not None else ""
        )
        if self.passed:
            return [f"verdict: PASS ({limits})"]
        return [f"verdict: FAIL ({limits})", *(f"  {reason}" for reason in self.reasons)]


def breaches(summary: Summary, max_error_rate: float, max_p99_ms: float | None) -> list[str]:
    """Why `summary` fails the thresholds (an empty list when it passes)."""
    if summary.requests == 0:
        return ["no call was measured"]
    found = []
    error_rate = summary.error_count / summary.requests
    if error_rate > max_error_rate:
        codes = ", ".join(f"{code} {n}" for code, n in sorted(summary.errors.items()))
        found.append(f"{summary.error_count} of {summary.requests} calls failed "
                     f"({error_rate:.2%} > {max_error_rate:.2%}: {codes})")  # fmt: skip
    if summary.ok == 0:
        found.append("no call succeeded")
    elif max_p99_ms is not None:
        p99 = summary.latency.percentiles_ms["p99"]
        if math.isnan(p99) or p99 > max_p99_ms:
            found.append(f"p99 {p99:.2f} ms > {max_p99_ms:g} ms")
    return found


def judge(steps: Sequence[tuple[str, Summary]], thresholds: Thresholds) -> Verdict:
    """Every step must meet the thresholds; `steps` are (label, summary) pairs."""
    reasons = [
        f"{label}: {reason}"
        for label, summary in steps
        for reason in breaches(summary, thresholds.max_error_rate, thresholds.max_p99_ms)
    ]
    if not steps:
        reasons.append("no step was run")
    return Verdict(not reasons, tuple(reasons), thresholds)


def judge_search(best_rate_rps: float, tried: int, thresholds: Thresholds) -> Verdict:
    """A max-rate search passes when some rate met its SLO (its failing steps are the point)."""
    if best_rate_rps > 0:
        return Verdict(True, (), thresholds)
    reason = f"none of the {tried} rates tried met the SLO (lower --start-rate?)"
    return Verdict(False, (reason,), thresholds)
