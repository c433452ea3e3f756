"""The JSON report and the printed summary tables of a load test."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from bertrec.bench.common import loadavg, markdown_table
from bertrec.bench.loadtest.recorder import Summary, per_rpc, summarize, timeline
from bertrec.bench.loadtest.runner import StepResult
from bertrec.bench.loadtest.search import SearchResult, Slo
from bertrec.bench.loadtest.verdict import Verdict

SCHEMA = "bertrec.loadtest/v1"
SATURATED_CPU_PERCENT = 85.0  # a generator above this share of one core may limit the load


def step_report(step: StepResult) -> dict[str, Any]:
    """One step as a JSON-able dict: settings, totals, per-RPC rows and the per-second timeline."""
    names = list(step.spec.mix)
    return {
        "label": step.spec.label,
        "mode": "open" if step.spec.rate_rps is not None else "closed",
        "concurrency": step.spec.concurrency,
        "rate_rps": step.spec.rate_rps,
        "duration_s": step.spec.duration_s,
        "warmup_s": step.spec.warmup_s,
        "client_cpu_percent": round(step.client_cpu_percent, 1),
        "summary": asdict(summarize(step.calls, step.window_s)),
        "per_rpc": {n: asdict(s) for n, s in per_rpc(step.calls, names, step.window_s).items()},
        "timeline": [asdict(b) for b in timeline(step.calls, step.measure_start_ns)],
    }


def build_report(
    target: str,
    mix: Mapping[str, float],
    inputs_source: str,
    steps: Sequence[StepResult],
    search: SearchResult | None = None,
    slo: Slo | None = None,
    verdict: Verdict | None = None,
) -> dict[str, Any]:
    """The whole run: where, what, on which machine, each step, the search outcome and the
    pass/fail verdict (the exit status)."""
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "target": target,
        "mix": dict(mix),
        "inputs_source": inputs_source,
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg": loadavg(),
        },
        "steps": [step_report(s) for s in steps],
        "search": None,
        "verdict": None,
    }
    if search is not None and slo is not None:
        report["search"] = {
            "p99_slo_ms": slo.p99_ms,
            "max_error_rate": slo.max_error_rate,
            "max_rate_rps": search.best_rate_rps,
            "converged": search.converged,
            "tried": [{"rate_rps": r, "passed": p} for r, p in search.tried],
        }
    if verdict is not None:
        report["verdict"] = {
            "passed": verdict.passed,
            "reasons": list(verdict.reasons),
            "max_error_rate": verdict.thresholds.max_error_rate,
            "max_p99_ms": verdict.thresholds.max_p99_ms,
        }
    return report


def _row(name: str, s: Summary) -> list[object]:
    p = s.latency.percentiles_ms
    return [name, s.requests, s.ok, s.throughput_rps, p["p50"], p["p90"], p["p99"],
            p["p99.9"], s.latency.max_ms, s.error_count]  # fmt: skip


HEADERS = ["rpc", "requests", "ok", "q/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
           "errors"]  # fmt: skip


def step_table(step: StepResult) -> str:
    """A markdown table (all RPCs, then one row per RPC) and one line of generator health."""
    total = summarize(step.calls, step.window_s)
    rows = [_row("all", total)]
    if len(step.spec.mix) > 1:
        rows += [_row(n, s) for n, s in per_rpc(step.calls, list(step.spec.mix),
                                                 step.window_s).items()]  # fmt: skip
    errors = ", ".join(f"{code} {n}" for code, n in sorted(total.errors.items())) or "none"
    lines = [
        f"## {step.spec.label}: {total.window_s:.1f} s measured, {total.offered_rps:.1f} sent/s",
        markdown_table(HEADERS, rows),
        f"errors by status: {errors}",
        f"client CPU {step.client_cpu_percent:.0f}% of one core; "
        f"send lag p99 {total.send_lag_ms.percentiles_ms['p99']:.2f} ms",
    ]
    if step.client_cpu_percent > SATURATED_CPU_PERCENT:
        lines.append("WARNING: the load generator is near one full core; results may be "
                     "limited by the client (try --channels or a second generator)")  # fmt: skip
    return "\n".join(lines)


def sweep_table(steps: Sequence[StepResult]) -> str:
    """One row per step: the throughput-vs-latency curve as numbers."""
    rows = []
    for step in steps:
        s = summarize(step.calls, step.window_s)
        p = s.latency.percentiles_ms
        rows.append([step.spec.label, s.offered_rps, s.throughput_rps, p["p50"], p["p99"],
                     p["p99.9"], s.error_count, step.client_cpu_percent])  # fmt: skip
    return markdown_table(["step", "sent/s", "ok q/s", "p50 ms", "p99 ms", "p99.9 ms", "errors",
                           "client cpu %"], rows)  # fmt: skip
