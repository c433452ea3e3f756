"""Cost curves: how serving cost grows with catalogue size and factor dim, on this machine.

    python -m bertrec.bench.cost_curves [--quick] [--out bench/results/cost_curves.json]
        [--png bench/results/cost_curves.png]

Two sweeps, one bounded run (about ten minutes in full, under one with --quick):

1. Ranker (in this process, random float32 catalogues): exact top-k q/s of
   `server.ranking.Ranker` at batch 1 and 32, best of a few interleaved turns
   (`common.time_in_turns`). Every (items, dim) cell whose matrix plus the Ranker's own copy
   fits in half this machine's memory.
2. Served (a real `bertrec serve`, one worker, on loopback): a synthetic version
   (`synthetic.py`) is published, the server spawned, and measured for load time (spawn to
   ready, and the load itself from the server's log), RSS/PSS once warm, and Recommend p50/p99
   under an open-loop offered load (requests sent on a fixed schedule whatever the answers, so
   a slow server cannot slow its own load; latency counted from each request's scheduled
   time). Only the cells of the plan: the synthetic builder writes item texts one by one in
   Python (~37 us an item), so a 10M-item version would take six minutes to build alone.

The largest catalogue served within the p99 target at the offered load is stated from the
served cells.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.bench.common import (
    environment,
    loadavg,
    markdown_table,
    proc_memory_kib,
    time_in_turns,
    write_json,
)
from bertrec.bench.server import RECOMMEND_METHOD, recommend_payloads
from bertrec.bench.spawned import Spawned

LOADED = re.compile(r"loaded \S+ version \d+ .*\(([\d.]+) s\)")
P99_TARGET_MS = 50.0
USERS = 1000


@dataclass(frozen=True)
class Plan:
    """What to sweep. `served` lists (items, dim, seconds of offered load) cells."""

    ranker_items: tuple[int, ...]
    dims: tuple[int, ...]
    served: tuple[tuple[int, int, float], ...]
    rate_qps: float = 100.0
    served_rounds: int = 2  # of open-loop load per served cell; the lowest p99 is reported
    rounds: int = 3
    budget_s: float = 4.0  # per Ranker cell and batch


FULL = Plan(
    ranker_items=(10_000, 100_000, 1_000_000, 10_000_000),
    dims=(32, 64, 128, 256),
    served=(
        (10_000, 64, 8.0), (100_000, 64, 8.0), (1_000_000, 64, 6.0),
        (1_000_000, 32, 5.0), (1_000_000, 128, 5.0), (1_000_000, 256, 5.0),
        (10_000_000, 32, 4.0),
    ),
)  # fmt: skip
QUICK = Plan(
    (10_000, 100_000), (32, 64), ((10_000, 64, 3.0),), served_rounds=1, rounds=1, budget_s=1.0
)


@dataclass(frozen=True)
class RankerCell:
    """Exact top-k throughput of the Ranker on one random catalogue."""

    items: int
    dim: int
    batch: int
    queries_per_s: float
    queries_per_s_median: float


@dataclass(frozen=True)
class ServedCell:
    """One `bertrec serve` of a synthetic version under open-loop Recommend load."""

    items: int
    dim: int
    build_s: float
    ready_s: float  # spawn to ready: interpreter start, load, warm-up
    load_s: float | None  # the load alone, as the server logs it
    rss_kib: int
    pss_kib: int | None
    rss_bytes_per_item: float
    offered_qps: float
    answered_qps: float
    p50_ms: float
    p99_ms: float
    calls: int
    errors: int
    p99_ms_rounds: list[float]  # every round's p99: the spread is the neighbours' noise
    send_late_ms_max: float  # the generator's worst lateness sending (its own stalls)
    loadavg: list[float] | None  # 1/5/15-minute load average after the cell


# ------------------------------------------------------------------------------------ ranker


def ranker_fits(items: int, dim: int, memory_bytes: int) -> bool:
    """The float32 matrix and the Ranker's (dim + 1, items) copy within half the memory: the
    machine is shared, and the rest must hold the benchmark and its neighbours."""
    return 4 * items * (2 * dim + 1) <= memory_bytes // 2


def ranker_cells(
    items: int, dim: int, batches: Sequence[int], k: int, plan: Plan, threads: int
) -> list[RankerCell]:
    """Time `Ranker.topk` at each batch size on a random catalogue of `items` x `dim`."""
    from bertrec.server.ranking import Ranker

    rng = np.random.default_rng(items + dim)
    matrix = rng.standard_normal((items, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    bias = rng.standard_normal(items, dtype=np.float32) * np.float32(0.1)
    ranker = Ranker(matrix, bias, threads=threads)
    queries = {b: rng.standard_normal((b, dim), dtype=np.float32) for b in batches}
    calls = {b: (lambda q=queries[b]: ranker.topk(q, k)) for b in batches}
    timings = time_in_turns(
        {str(b): fn for b, fn in calls.items()}, plan.rounds, plan.budget_s, turn_s=0.2
    )
    return [
        RankerCell(items, dim, b, b / timings[str(b)].best_s, b / timings[str(b)].median_s)
        for b in batches
    ]


# ------------------------------------------------------------------------------------ served


async def open_loop(
    target: str, payloads: Sequence[bytes], rate_qps: float, duration_s: float
) -> tuple[list[float], int, float, float]:
    """Send `rate_qps` requests a second for `duration_s`, each on schedule, not on answers.

    Returns (latencies in seconds from each request's scheduled send, errors, elapsed s, the
    latest a request left after its scheduled time in s).
    """
    import grpc

    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(RECOMMEND_METHOD)
        await channel.channel_ready()

        async def one(payload: bytes, due: float) -> None:
            nonlocal errors
            try:
                await call(payload, timeout=10)
                latencies.append(time.perf_counter() - due)
            except grpc.RpcError:
                errors += 1

        begin = time.perf_counter()
        tasks = []
        late = 0.0
        for i in range(int(rate_qps * duration_s)):
            due = begin + i / rate_qps
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            late = max(late, time.perf_counter() - due)
            tasks.append(asyncio.create_task(one(payloads[i % len(payloads)], due)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    return latencies, errors, elapsed, late


def pss_kib(pid: int) -> int | None:
    """Proportional set size from /proc/<pid>/smaps_rollup (None where the kernel has none)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def serve_argv(repo: Path) -> list[str]:
    from bertrec.bench.synthetic import MODEL

    return [
        sys.executable, "-m", "bertrec", "serve", "--model-repo", str(repo), "--model", MODEL,
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
        "--providers", "CPUExecutionProvider", "--model-control", "none", "--workers", "1",
    ]  # fmt: skip


def served_cell(
    items: int, dim: int, rate_qps: float, duration_s: float, rounds: int = 1
) -> ServedCell:
    """Build a synthetic version, serve it, measure it warm, and load it open-loop `rounds`
    times; the round with the lowest p99 is reported (neighbours on a shared machine can only
    add latency), every round's p99 is kept beside it."""
    from bertrec.bench.synthetic import build_synthetic_repo

    with tempfile.TemporaryDirectory(prefix="bertrec-cost-curves-") as tmp:
        started = time.monotonic()
        repo = build_synthetic_repo(Path(tmp), n_items=items, n_users=USERS, dim=dim)
        build_s = time.monotonic() - started
        spawned_at = time.monotonic()
        server = Spawned(f"serve-{items}-{dim}", serve_argv(repo), Path(tmp))
        try:
            server.wait_ready()
            ready_s = time.monotonic() - spawned_at
            payloads = recommend_payloads(USERS)
            asyncio.run(open_loop(server.target, payloads, rate_qps, min(1.0, duration_s)))
            rss = proc_memory_kib(server.proc.pid) or 0
            pss = pss_kib(server.proc.pid)
            runs = [asyncio.run(open_loop(server.target, payloads, rate_qps, duration_s))
                    for _ in range(rounds)]  # fmt: skip
        finally:
            server.stop()
        found = LOADED.search(server.log.read_text())
    p99s = [_percentile_ms(r[0], 99) for r in runs]
    latencies, errors, elapsed, late = runs[p99s.index(min(p99s))]
    return ServedCell(
        items, dim, round(build_s, 2), round(ready_s, 2),
        float(found.group(1)) if found else None, rss, pss, rss * 1024 / items, rate_qps,
        len(latencies) / elapsed, _percentile_ms(latencies, 50), min(p99s), len(latencies),
        errors, p99s, late * 1e3, loadavg(),
    )  # fmt: skip


def _percentile_ms(latencies_s: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies_s) * 1e3, q)) if latencies_s else np.nan


# ------------------------------------------------------------------------------------ report


def largest_within(cells: Sequence[ServedCell], p99_ms: float = P99_TARGET_MS) -> int | None:
    """The largest catalogue whose every served dim kept p99 within `p99_ms`, error-free and
    answering the whole offered load; None if none did."""
    sizes = sorted({c.items for c in cells})
    ok = [n for n in sizes if all(_within(c, p99_ms) for c in cells if c.items == n)]
    return max(ok) if ok else None


def _within(cell: ServedCell, p99_ms: float) -> bool:
    return (
        cell.errors == 0 and cell.p99_ms <= p99_ms and cell.answered_qps >= 0.95 * cell.offered_qps
    )


def marginal_bytes_per_item(cells: Sequence[ServedCell]) -> dict[tuple[int, int], float]:
    """RSS added per item over the smallest served catalogue of the same dim: what an item
    costs once the interpreter, ONNX Runtime and the encoder are paid for."""
    out: dict[tuple[int, int], float] = {}
    for dim in {c.dim for c in cells}:
        same = sorted((c for c in cells if c.dim == dim), key=lambda c: c.items)
        for c in same[1:]:
            out[(c.items, dim)] = (c.rss_kib - same[0].rss_kib) * 1024 / (c.items - same[0].items)
    return out


def tables(ranker: Sequence[RankerCell], served: Sequence[ServedCell]) -> str:
    """Markdown: Ranker q/s per (items, dim), then the served cells."""
    qps = {(c.items, c.dim, c.batch): c.queries_per_s for c in ranker}
    keys = sorted({(c.items, c.dim) for c in ranker})
    ranker_rows = [[f"{n:,}", d, qps.get((n, d, 1), ""), qps.get((n, d, 32), "")]
                   for n, d in keys]  # fmt: skip
    marginal = marginal_bytes_per_item(served)
    served_rows = [
        [f"{c.items:,}", c.dim, c.p50_ms, c.p99_ms, c.answered_qps, c.errors,
         c.rss_kib / 1024, marginal.get((c.items, c.dim), ""), c.load_s or "", c.ready_s]
        for c in served
    ]  # fmt: skip
    return "\n\n".join([
        markdown_table(["items", "dim", "Ranker q/s batch 1", "Ranker q/s batch 32"],
                       ranker_rows),
        markdown_table(["items", "dim", "p50 ms", "p99 ms", "answered q/s", "errors",
                        "RSS MiB", "marginal RSS B/item", "load s", "spawn to ready s"],
                       served_rows),
    ])  # fmt: skip


def statement(served: Sequence[ServedCell], rate_qps: float) -> str:
    """The README's sentence: the largest catalogue one pod serves within the p99 target."""
    best = largest_within(served)
    if best is None:
        return f"No served catalogue kept p99 within {P99_TARGET_MS:.0f} ms at {rate_qps:.0f} q/s."
    dims = sorted(c.dim for c in served if c.items == best)
    worst = max(c.p99_ms for c in served if c.items == best)
    bigger = sorted({c.items for c in served if c.items > best})
    beyond = f"; {bigger[0]:,} items did not" if bigger else "; no larger catalogue was served"
    return (
        f"One pod (one worker, this machine) serves {best:,} items (dim {dims}) within a "
        f"{P99_TARGET_MS:.0f} ms p99 at {rate_qps:.0f} q/s (worst p99 {worst:.1f} ms){beyond}."
    )


def plot(ranker: Sequence[RankerCell], served: Sequence[ServedCell], path: Path) -> None:
    """Four panels against catalogue size (log-log), one line per dim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0][0], "Ranker q/s, batch 1", [(c.items, c.dim, c.queries_per_s)
                                             for c in ranker if c.batch == 1]),
        (axes[0][1], "Ranker q/s, batch 32", [(c.items, c.dim, c.queries_per_s)
                                              for c in ranker if c.batch == 32]),
        (axes[1][0], "served Recommend p99 ms (open loop)", [(c.items, c.dim, c.p99_ms)
                                                             for c in served]),
        (axes[1][1], "served RSS MiB", [(c.items, c.dim, c.rss_kib / 1024) for c in served]),
    ]  # fmt: skip
    for ax, title, points in panels:
        for dim in sorted({d for _, d, _ in points}):
            xy = sorted((n, v) for n, d, v in points if d == dim)
            ax.plot([n for n, _ in xy], [v for _, v in xy], marker="o", label=f"dim {dim}")
        ax.set(xscale="log", yscale="log", title=title, xlabel="catalogue items")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[1][0].axhline(P99_TARGET_MS, color="red", linestyle="--", linewidth=1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -------------------------------------------------------------------------------------- main


def memory_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


def run(
    plan: Plan, k: int, threads: int, out: Path, kept: list[RankerCell] | None = None
) -> dict[str, Any]:
    """Both sweeps; the JSON-able result, also written to `out` after every cell so a run
    cut short keeps what it measured (`--from-json` reports it). `kept`: Ranker cells of an
    earlier run of this plan, reused instead of measured again."""
    started = time.monotonic()
    env = environment()
    memory = memory_total_bytes()
    ranker: list[RankerCell] = list(kept or [])
    skipped: list[dict[str, Any]] = []
    for n in plan.ranker_items:
        for dim in plan.dims:
            if not ranker_fits(n, dim, memory):
                skipped.append({"items": n, "dim": dim, "sweep": "ranker",
                                "why": "matrix + Ranker copy > half of memory"})  # fmt: skip
                continue
            if kept is not None:
                continue
            ranker += ranker_cells(n, dim, (1, 32), k, plan, threads)
            write_json(out, _result(env, memory, plan, k, threads, ranker, [], skipped, started))
            print(f"ranker {n:,} x {dim} ({time.monotonic() - started:.0f} s)", flush=True)
    served: list[ServedCell] = []
    for n, dim, seconds in plan.served:
        served.append(served_cell(n, dim, plan.rate_qps, seconds, plan.served_rounds))
        write_json(out, _result(env, memory, plan, k, threads, ranker, served, skipped, started))
        print(f"served {served[-1]} ({time.monotonic() - started:.0f} s)", flush=True)
    env["loadavg_end"] = loadavg()
    return _result(env, memory, plan, k, threads, ranker, served, skipped, started)


def _result(
    env: dict[str, Any], memory: int, plan: Plan, k: int, threads: int,
    ranker: list[RankerCell], served: list[ServedCell], skipped: list[dict[str, Any]],
    started: float,
) -> dict[str, Any]:  # fmt: skip
    return {
        "benchmark": "cost_curves", "environment": env, "memory_total_bytes": memory,
        "k_ranker": k, "k_recommend": 10, "threads": threads, "plan": asdict(plan),
        "ranker": [asdict(c) for c in ranker], "served": [asdict(c) for c in served],
        "skipped": skipped, "largest_within_p99": largest_within(served),
        "statement": statement(served, plan.rate_qps), "table": tables(ranker, served),
        "wall_s": round(time.monotonic() - started, 1),
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset (< 1 minute)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cost_curves.json"))
    parser.add_argument("--png", type=Path, default=Path("bench/results/cost_curves.png"))
    parser.add_argument("--k", type=int, default=100, help="top-k of the Ranker sweep")
    parser.add_argument("--threads", type=int, default=2, help="Ranker threads")
    parser.add_argument(
        "--keep-ranker",
        action="store_true",
        help="reuse the Ranker cells in --out, measure the served cells again",
    )
    parser.add_argument("--from-json", action="store_true",
                        help="no measuring: table, statement and plot from --out")  # fmt: skip
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(args.out.read_text())
    else:
        kept = None
        if args.keep_ranker:
            kept = [RankerCell(**c) for c in json.loads(args.out.read_text())["ranker"]]
        result = run(QUICK if args.quick else FULL, args.k, args.threads, args.out, kept)
    ranker = [RankerCell(**c) for c in result["ranker"]]
    served = [ServedCell(**c) for c in result["served"]]
    result["table"] = tables(ranker, served)
    result["statement"] = statement(served, result["plan"]["rate_qps"])
    result["largest_within_p99"] = largest_within(served)
    write_json(args.out, result)
    plot(ranker, served, args.png)
    print(result["table"])
    print(result["statement"])
    print(f"wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
