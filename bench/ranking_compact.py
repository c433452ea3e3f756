"""CompactRanker (int8 scan + exact re-scoring) against the float32 Ranker, in one run.

    python -m bertrec.bench.ranking_compact [--quick] --out results/ranking_compact.json

Both rankers answer the same query batches in interleaved rounds (a turn of one, then a turn
of the other, `rounds` times), so each round yields one speed ratio measured under the same
load; on a shared machine the spread of those ratios says how noisy the run was. Exactness is
checked on every timed batch and on extra ones: the compact answer must equal the Ranker's to
the bit (rows, order, float32 scores), hence recall 1.0. Bytes read per query count the scan
(int8 codes vs the float32 matrix, shared by the batch) plus the rows re-scored from float32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.bench.common import environment, loadavg, markdown_table, proc_memory_kib, write_json
from bertrec.bench.ranking import catalogue
from bertrec.server.ranking import Ranker
from bertrec.server.ranking_compact import CompactRanker

CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8")  # fmt: skip
TARGETS = {1: 1.7, 32: 1.4}  # issue 14: compact / fp32 queries per second, 1M x 64, top-100


@dataclass(frozen=True)
class Plan:
    items: int
    batches: tuple[int, ...]
    rounds: int
    turn_s: float
    check_batches: int  # extra query batches checked for exactness per batch size


FULL = Plan(1_000_000, (1, 32), 15, 0.6, 20)
QUICK = Plan(200_000, (1, 32), 3, 0.3, 3)


def cpu_flags() -> dict[str, bool]:
    """Which of the instruction sets that matter for int8/fp16 kernels this CPU reports."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    present = set(line.split(":", 1)[-1].split())
    return {flag: flag in present for flag in CPU_FLAGS}


def interleaved(
    methods: dict[str, Callable[[], object]], rounds: int, turn_s: float, pause_s: float = 0.1
) -> dict[str, list[float]]:
    """Best seconds per call of each method in each round (turns alternate within a round)."""
    best: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            time.sleep(pause_s)  # let the other method's threads go idle
            fn()
            fastest, end = float("inf"), time.monotonic() + turn_s
            while True:
                start = time.perf_counter()
                fn()
                fastest = min(fastest, time.perf_counter() - start)
                if time.monotonic() > end:
                    break
            best[name].append(fastest)
    return best


def cpu_time_cells(
    items: int, dim: int, seed: int, k: int, batches: Sequence[int], rounds: int
) -> list[dict[str, Any]]:
    """Seconds of CPU per call, one intra-op thread (ONNX Runtime then runs in the calling
    thread, so `time.thread_time` sees all of it): waiting for a core on a loaded machine
    does not count, so this ratio is far steadier than the wall-clock one."""
    vectors, bias = catalogue(items, dim, seed)
    rankers = {"fp32 Ranker": Ranker(vectors, bias, threads=1),
               "CompactRanker": CompactRanker(vectors, bias, threads=1)}  # fmt: skip
    cells = []
    for batch in batches:
        q = np.random.default_rng(seed + batch).standard_normal((batch, dim), dtype=np.float32)
        best = {name: float("inf") for name in rankers}
        for _ in range(rounds):
            for name, ranker in rankers.items():
                ranker.topk(q, k)
                for _ in range(3):
                    start = time.thread_time()
                    ranker.topk(q, k)
                    best[name] = min(best[name], time.thread_time() - start)
        cells.append({"batch": batch, "fp32_cpu_ms": 1e3 * best["fp32 Ranker"],
                      "compact_cpu_ms": 1e3 * best["CompactRanker"],
                      "ratio": best["fp32 Ranker"] / best["CompactRanker"]})  # fmt: skip
    return cells


def exact_match(ranker: Ranker, compact: CompactRanker, queries: np.ndarray, k: int) -> bool:
    want, got = ranker.topk(queries, k), compact.topk(queries, k)
    return bool(np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1]))


def recall(ranker: Ranker, compact: CompactRanker, queries: np.ndarray, k: int) -> float:
    want, got = ranker.topk(queries, k)[0], compact.topk(queries, k)[0]
    hits = sum(len(np.intersect1d(g, w)) for g, w in zip(got, want, strict=True))
    return hits / want.size


def run_batch(
    ranker: Ranker, compact: CompactRanker, batch: int, k: int, plan: Plan, seed: int
) -> dict[str, Any]:
    """One batch size: interleaved timing, per-round ratios, exactness, work per query."""
    rng = np.random.default_rng(seed)
    dim = ranker.dim
    queries = rng.standard_normal((batch, dim), dtype=np.float32)
    checks = [
        rng.standard_normal((batch, dim), dtype=np.float32) for _ in range(plan.check_batches)
    ]
    exact = all(exact_match(ranker, compact, q, k) for q in [queries, *checks])
    recalls = [recall(ranker, compact, q, k) for q in [queries, *checks]]
    before = (compact.stats.queries, compact.stats.rescored)
    compact.topk(queries, k)
    for q in checks:
        compact.topk(q, k)
    asked = compact.stats.queries - before[0]
    rescored_per_query = (compact.stats.rescored - before[1]) / asked
    best = interleaved(
        {"fp32 Ranker": lambda: ranker.topk(queries, k),
         "CompactRanker": lambda: compact.topk(queries, k)},
        plan.rounds, plan.turn_s,
    )  # fmt: skip
    fp32_s, compact_s = min(best["fp32 Ranker"]), min(best["CompactRanker"])
    ratios = [f / c for f, c in zip(best["fp32 Ranker"], best["CompactRanker"], strict=True)]
    row_bytes = 4 * (dim + 1)  # a float32 row and its bias, re-scored
    fp32_bytes = ranker.n_items * row_bytes / batch
    compact_bytes = compact.scan_bytes(batch) / batch + rescored_per_query * row_bytes
    return {
        "batch": batch,
        "k": k,
        "fp32_queries_per_s": batch / fp32_s,
        "compact_queries_per_s": batch / compact_s,
        "ratio_best": fp32_s / compact_s,
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "fp32_round_best_ms": [1e3 * s for s in best["fp32 Ranker"]],
        "compact_round_best_ms": [1e3 * s for s in best["CompactRanker"]],
        "exact_same_as_fp32": exact,
        "recall_vs_fp32": min(recalls),
        "batches_checked": 1 + len(checks),
        "rescored_per_query": rescored_per_query,
        "fp32_bytes_per_query": fp32_bytes,
        "compact_bytes_per_query": compact_bytes,
        "bytes_ratio": compact_bytes / fp32_bytes,
        "target": TARGETS.get(batch),
    }


def build(
    n: int, dim: int, seed: int, threads: int
) -> tuple[Ranker, CompactRanker, dict[str, Any]]:
    """Both rankers over one catalogue, with their build times and resident-memory growth."""
    items, bias = catalogue(n, dim, seed)
    info: dict[str, Any] = {"items": n, "dim": dim}
    rankers: dict[str, Any] = {}
    for name, cls in (("compact", CompactRanker), ("fp32", Ranker)):
        rss, start = proc_memory_kib(os.getpid()), time.monotonic()
        rankers[name] = cls(items, bias, threads=threads)
        info[f"{name}_build_s"] = time.monotonic() - start
        grown = (proc_memory_kib(os.getpid()) or 0) - (rss or 0)
        info[f"{name}_rss_growth_bytes_per_item"] = grown * 1024 / n
    compact = rankers["compact"]
    info["compact_outliers"] = int(compact.book.outliers.size)
    info["compact_scan_bytes"] = {
        "batch 1": compact.scan_bytes(1),
        "batch 32": compact.scan_bytes(32),
    }
    return rankers["fp32"], compact, info


def table(cells: list[dict[str, Any]]) -> str:
    rows = [
        [c["batch"], c["fp32_queries_per_s"], c["compact_queries_per_s"],
         f"{c['ratio_best']:.2f}x", f"{c['ratio_median']:.2f}x "
         f"({c['ratio_min']:.2f}-{c['ratio_max']:.2f})", f">= {c['target']}x",
         f"{c['fp32_bytes_per_query'] / 1e6:.2f} MB",
         f"{c['compact_bytes_per_query'] / 1e6:.2f} MB",
         round(c["rescored_per_query"]), c["recall_vs_fp32"], c["exact_same_as_fp32"]]
        for c in cells
    ]  # fmt: skip
    return markdown_table(
        ["batch", "fp32 q/s", "compact q/s", "ratio (best)", "ratio per round: median (range)",
         "target", "fp32 bytes/query", "compact bytes/query", "re-scored/query", "recall",
         "bit-exact"],
        rows,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (< 1 min)")
    parser.add_argument("--out", type=Path, default=Path("results/ranking_compact.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, help="override the plan's rounds")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    rounds = args.rounds or plan.rounds
    plan = Plan(plan.items, plan.batches, rounds, plan.turn_s, plan.check_batches)
    started = time.monotonic()
    env = environment()
    env["cpu_flags"] = cpu_flags()
    print(f"environment: {env}", flush=True)
    ranker, compact, built = build(plan.items, args.dim, args.seed, args.threads)
    print(f"built: {built}", flush=True)
    cells = []
    for batch in plan.batches:
        cells.append(run_batch(ranker, compact, batch, args.k, plan, args.seed + batch))
        print(f"done batch {batch} ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"\nTop-{args.k}, {plan.items:,} x {args.dim}, {args.threads} threads, "
          f"{plan.rounds} interleaved rounds\n")  # fmt: skip
    print(table(cells))
    # Judged on the median of the per-round ratios: one lucky turn of either ranker moves the
    # best-of-run ratio (seen 1.55x and 2.22x at batch 1 in two runs), the median far less.
    targets = {f"batch {c['batch']} >= {c['target']}x fp32": {
        "value": c["ratio_median"], "best_of_run": c["ratio_best"],
        "met": c["ratio_median"] >= c["target"] and c["exact_same_as_fp32"]}
        for c in cells if c["target"] is not None and plan.items >= 1_000_000}  # fmt: skip
    del ranker, compact
    cpu = cpu_time_cells(plan.items, args.dim, args.seed, args.k, plan.batches, plan.rounds)
    print("\nCPU time per call, 1 thread (steady under load):")
    print(markdown_table(
        ["batch", "fp32 CPU ms", "compact CPU ms", "ratio"],
        [[c["batch"], c["fp32_cpu_ms"], c["compact_cpu_ms"], f"{c['ratio']:.2f}x"] for c in cpu],
    ))  # fmt: skip
    print("\ntargets:", {name: t["met"] for name, t in targets.items()})
    env["loadavg_end"] = loadavg()
    write_json(
        args.out,
        {"benchmark": "ranking_compact", "quick": args.quick, "threads": args.threads,
         "rounds": plan.rounds, "environment": env, "catalogue": built, "results": cells,
         "cpu_time_1_thread": cpu, "targets": targets, "wall_s": time.monotonic() - started},
    )  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
