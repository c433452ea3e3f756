"""PNG plots of a load test (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bertrec.bench.loadtest.recorder import OK, summarize, timeline
from bertrec.bench.loadtest.runner import StepResult

TIME_PLOT = "latency_over_time.png"
CDF_PLOT = "latency_cdf.png"
CURVE_PLOT = "throughput_latency.png"


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(
    steps: Sequence[StepResult], folder: Path, slo_ms: float | None = None
) -> list[Path]:
    """Latency percentiles over time and latency CDF; plus the throughput-latency curve when
    there are several steps. Returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [
        _time_plot(steps, folder / TIME_PLOT),
        _cdf_plot(steps, folder / CDF_PLOT),
    ]
    if len(steps) > 1:
        paths.append(_curve_plot(steps, folder / CURVE_PLOT, slo_ms))
    return paths


def _time_plot(steps: Sequence[StepResult], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    if len(steps) == 1:
        buckets = timeline(steps[0].calls, steps[0].measure_start_ns)
        t = [b.t_s for b in buckets]
        for key in ("p50", "p90", "p99"):
            ax.plot(t, [b.percentiles_ms[key] for b in buckets], marker=".", label=key)
        ax.plot(t, [b.max_ms for b in buckets], linestyle=":", label="max")
    else:
        for step in steps:
            buckets = timeline(step.calls, step.measure_start_ns)
            ax.plot([b.t_s for b in buckets], [b.percentiles_ms["p99"] for b in buckets],
                    marker=".", label=f"p99 {step.spec.label}")  # fmt: skip
    ax.set(xlabel="seconds into the measured window", ylabel="latency (ms)", yscale="log",
           title="latency percentiles per second")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _cdf_plot(steps: Sequence[StepResult], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    for step in steps:
        latency = np.sort(step.calls.latency_ms[step.calls.code == OK])
        if latency.size:
            ax.plot(latency, np.arange(1, latency.size + 1) / latency.size, label=step.spec.label)
    ax.set(xlabel="latency (ms)", ylabel="fraction of calls at or below", xscale="log",
           title="latency CDF")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no line when no call succeeded
        ax.legend(fontsize="small")
    return _save(fig, path)


def _curve_plot(steps: Sequence[StepResult], path: Path, slo_ms: float | None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    points = [(summarize(s.calls, s.window_s), s.spec.label) for s in steps if s.calls.code.size]
    points.sort(key=lambda point: point[0].throughput_rps)
    x = [s.throughput_rps for s, _ in points]
    for key in ("p50", "p99"):
        ax.plot(x, [s.latency.percentiles_ms[key] for s, _ in points], marker="o", label=key)
    for s, label in points:
        ax.annotate(label, (s.throughput_rps, s.latency.percentiles_ms["p99"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))  # fmt: skip
    if slo_ms is not None:
        ax.axhline(slo_ms, color="red", linestyle="--", label=f"p99 SLO {slo_ms:g} ms")
    ax.set(xlabel="throughput (OK answers/s)", ylabel="latency (ms)", yscale="log",
           title="throughput vs latency")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig: object, path: Path) -> Path:
    plt = _pyplot()
    fig.savefig(path, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)
    return path
