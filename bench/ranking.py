"""Exact top-k ranking benchmark: bertrec's Ranker against faiss and numpy, in one run.

    python -m bertrec.bench.ranking [--quick] --out results/ranking.json

Scores are `query . item + bias`; faiss has no bias, so it gets the bias as an extra item
dimension and queries a matching 1 (the usual way to serve a biased dot product with faiss).
Every method is checked for recall 1.0 against an exact float64 ranking of the same batch.
At batch 1 the catalogue scan is memory-bound, so the effective bandwidth (item bytes read /
time per query) is reported against the machine's read bandwidth, measured up front and again
by a probe timed in turn with the methods.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.bench.common import (
    ReadProbe,
    environment,
    loadavg,
    markdown_table,
    memory_read_bandwidth,
    time_in_turns,
    write_json,
)
from bertrec.server.ranking import Ranker

TopK = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
RANKER = "bertrec Ranker"
RANKER_FED = "bertrec Ranker, catalogue fed per run"  # never packed once (`prepack_max_bytes`)
FAISS = "faiss IndexFlatIP"
SLOW_METHODS = ("numpy full argsort",)
PROBE = "memory read probe (BLAS gemv)"
# Catalogues smaller than this may sit in the last-level cache: no bandwidth share for them.
BANDWIDTH_MIN_BYTES = 128 << 20


@dataclass(frozen=True)
class Plan:
    catalogues: tuple[int, ...]
    batches: tuple[int, ...]
    rounds: int
    budget_s: float  # per (catalogue, batch) cell, for the fast methods
    bandwidth_bytes: int
    exclusions: tuple[int, ...]  # excluded-row counts for the exclusion strategy section
    full_sort_items: int  # the full argsort runs on catalogues up to this size


FULL = Plan((100_000, 1_000_000), (1, 32, 256), 20, 30.0, 1 << 30, (100, 1000, 3000, 10000), 10**6)
QUICK = Plan((100_000, 1_000_000), (1, 32), 2, 2.0, 1 << 28, (), 100_000)


def catalogue(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim, dtype=np.float32)
    return items, rng.standard_normal(n, dtype=np.float32) * np.float32(0.1)


def exact_rows(items: np.ndarray, bias: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Reference top-k rows (score desc, row asc), the candidates rescored in float64.

    float32 scores pick k + 64 candidates per query (far more margin than float32 rounding
    needs), then exact float64 scores order them.
    """
    out = np.empty((len(queries), k), dtype=np.int64)
    for i, q in enumerate(queries):
        rough = items @ q + bias
        wide = min(k + 64, len(rough))
        cut = np.argpartition(-rough, wide - 1)[:wide]
        exact = items[cut].astype(np.float64) @ q.astype(np.float64) + bias[cut]
        out[i] = cut[np.lexsort((cut, -exact))][:k]
    return out


def recall(got: np.ndarray, want: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(g, w)) for g, w in zip(got, want, strict=True))
    return hits / want.size


def methods(items: np.ndarray, bias: np.ndarray, threads: int, k: int) -> dict[str, TopK]:
    """Each method maps a (B, d) query batch to (rows, scores), best first."""
    import faiss

    faiss.omp_set_num_threads(threads)
    biased = faiss.IndexFlatIP(items.shape[1] + 1)
    biased.add(np.hstack([items, bias[:, None]]))
    ranker = Ranker(items, bias, threads=threads)
    fed = Ranker(items, bias, threads=threads, prepack_max_bytes=0)

    def with_one(q: np.ndarray) -> np.ndarray:
        return np.hstack([q, np.ones((len(q), 1), dtype=np.float32)])

    def faiss_topk(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = biased.search(with_one(q), k)
        return rows, scores

    def numpy_partition(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = q @ items.T
        scores += bias
        part = np.argpartition(scores, -k, axis=1)[:, -k:]
        top = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        return np.take_along_axis(part, order, axis=1), np.take_along_axis(top, order, axis=1)

    def numpy_sort(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = q @ items.T + bias
        rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return rows, np.take_along_axis(scores, rows, axis=1)

    return {
        RANKER: lambda q: ranker.topk(q, k),
        RANKER_FED: lambda q: fed.topk(q, k),
        FAISS: faiss_topk,
        "numpy matmul + argpartition": numpy_partition,
        "numpy full argsort": numpy_sort,
    }


def run_cell(
    found: dict[str, TopK],
    items: np.ndarray,
    bias: np.ndarray,
    batch: int,
    k: int,
    plan: Plan,
    seed: int,
) -> list[dict[str, Any]]:
    """Time every method on one batch; at batch 1 also time a read of as many bytes as the
    catalogue, turn about with them (equal call lengths get equal odds of a quiet moment)."""
    queries = np.random.default_rng(seed).standard_normal((batch, items.shape[1]), np.float32)
    outputs: dict[str, np.ndarray] = {}

    def timed(name: str, fn: TopK) -> Callable[[], object]:
        def call() -> None:
            outputs[name] = fn(queries)[0]

        return call

    fast = {name: timed(name, fn) for name, fn in found.items() if name not in SLOW_METHODS}
    scanned = items.nbytes + bias.nbytes
    memory_bound = batch == 1 and scanned >= BANDWIDTH_MIN_BYTES
    probe = ReadProbe(scanned) if memory_bound else None
    if probe is not None:
        fast[PROBE] = probe
    timings = time_in_turns(fast, plan.rounds, plan.budget_s)
    probe_gb_s = probe.nbytes / timings.pop(PROBE).best_s / 1e9 if probe is not None else None
    for name in SLOW_METHODS if len(items) <= plan.full_sort_items else ():
        slow = {name: timed(name, found[name])}
        rounds = 2 if batch * len(items) <= 32 * 1_000_000 else 1
        timings.update(time_in_turns(slow, rounds, budget_s=0, turn_s=0, warmup=False))
    want = exact_rows(items, bias, queries, k)
    return [
        {
            "catalogue": len(items),
            "batch": batch,
            "method": name,
            "timing": t,
            "queries_per_s": batch / t.best_s,
            "queries_per_s_median": batch / t.median_s,
            "recall": recall(outputs[name], want),
            "scan_gb_per_s": scanned / t.best_s / 1e9 if memory_bound else None,
            "probe_gb_per_s": probe_gb_s,
        }
        for name, t in timings.items()
    ]


def exclusion_cells(
    items: np.ndarray, bias: np.ndarray, threads: int, k: int, counts: Sequence[int], seed: int
) -> list[dict[str, Any]]:
    """Fetch k + |excluded| and filter, against masking the excluded items (ranked alone)."""
    fetch = Ranker(items, bias, threads=threads, exclude_fetch_limit=len(items))
    mask = Ranker(items, bias, threads=threads, exclude_fetch_limit=0)

    def by_fetch(q: np.ndarray, e: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return fetch.topk(q, k, list(e))

    def by_mask(q: np.ndarray, e: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return _masked_heavy(mask, fetch, q, k, e)

    rng = np.random.default_rng(seed)
    cells = []
    for count in counts:
        for batch in (1, 32):
            queries = rng.standard_normal((batch, items.shape[1]), np.float32)
            # One heavy user; the rest of the batch rated 100 items each.
            sizes = [count] + [100] * (batch - 1)
            exclude = [np.sort(rng.choice(len(items), s, replace=False)) for s in sizes]
            runs: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
                "fetch k + excluded, filter": functools.partial(by_fetch, queries, exclude),
                "mask heavy user, rank alone": functools.partial(by_mask, queries, exclude),
            }
            timings = time_in_turns(runs, rounds=5, budget_s=10.0)
            same = _same(*(fn() for fn in runs.values()))
            for name, t in timings.items():
                cells.append(
                    {"excluded": count, "batch": batch, "strategy": name, "timing": t,
                     "queries_per_s": batch / t.best_s, "same_result": same}
                )  # fmt: skip
    return cells


def _masked_heavy(
    mask: Ranker, fetch: Ranker, q: np.ndarray, k: int, exclude: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    heavy_rows, heavy_scores = mask.topk(q[:1], k, exclude[:1])
    if len(q) == 1:
        return heavy_rows, heavy_scores
    rest_rows, rest_scores = fetch.topk(q[1:], k, exclude[1:])
    return np.vstack([heavy_rows, rest_rows]), np.vstack([heavy_scores, rest_scores])


def _same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return bool(np.array_equal(a[0], b[0]) and np.allclose(a[1], b[1], rtol=1e-5, atol=1e-6))


def summarise(cells: list[dict[str, Any]], bandwidth: float) -> tuple[str, dict[str, Any]]:
    """The results table and the targets. A batch-1 scan is compared with the best of the
    up-front bandwidth probe and the probe timed in turn with it (noise on a shared machine
    can only lower a measured bandwidth, so the larger is the truer)."""
    faiss_qps = {(c["catalogue"], c["batch"]): c["queries_per_s"] for c in cells
                 if c["method"] == FAISS}  # fmt: skip
    rows = []
    for c in cells:
        ratio = c["queries_per_s"] / faiss_qps[(c["catalogue"], c["batch"])]
        c["vs_faiss"] = ratio
        scan = c["scan_gb_per_s"]
        best = max(bandwidth, c["probe_gb_per_s"] or 0.0)
        c["bandwidth_fraction"] = scan / best if scan is not None else None
        rows.append([
            f"{c['catalogue']:,} x 64", c["batch"], c["method"], c["queries_per_s"],
            c["queries_per_s_median"], f"{ratio:.2f}x",
            "" if scan is None else f"{scan:.1f} ({100 * scan / best:.0f}% of {best:.1f})",
            c["recall"],
        ])  # fmt: skip
    table = markdown_table(
        ["catalogue", "batch", "method", "q/s best", "q/s median", "vs faiss",
         "scan GB/s (% of read bw)", "recall"],
        rows,
    )  # fmt: skip
    ours = {(c["catalogue"], c["batch"]): c for c in cells if c["method"] == RANKER}
    targets: dict[str, Any] = {}
    if (1_000_000, 32) in ours and (1_000_000, 32) in faiss_qps:
        ratio = ours[(1_000_000, 32)]["vs_faiss"]
        targets["1M batch 32 >= 3x faiss"] = {"value": ratio, "met": ratio >= 3.0}
    if (1_000_000, 1) in ours:
        share = ours[(1_000_000, 1)]["bandwidth_fraction"]
        targets["1M batch 1 >= 85% of read bandwidth"] = {"value": share, "met": share >= 0.85}
    return table, targets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (< 60 s)")
    parser.add_argument("--out", type=Path, default=Path("results/ranking.json"))
    parser.add_argument("--threads", type=int, default=2, help="threads for every method")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--catalogues", type=int, nargs="+", help="override the plan's sizes")
    parser.add_argument("--batches", type=int, nargs="+", help="override the plan's batches")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.catalogues:
        plan = dataclasses.replace(plan, catalogues=tuple(args.catalogues))
    if args.batches:
        plan = dataclasses.replace(plan, batches=tuple(args.batches))
    started = time.monotonic()
    env = environment()
    print(f"environment: {env}", flush=True)
    bandwidth = memory_read_bandwidth(plan.bandwidth_bytes, threads=args.threads)
    print(f"read bandwidth GB/s: { {n: round(v, 1) for n, v in bandwidth.items()} }", flush=True)
    cells: list[dict[str, Any]] = []
    exclusions: list[dict[str, Any]] = []
    for n in plan.catalogues:
        items, bias = catalogue(n, args.dim, args.seed)
        found = methods(items, bias, args.threads, args.k)
        for batch in plan.batches:
            cells += run_cell(found, items, bias, batch, args.k, plan, args.seed + batch)
            print(f"done {n:,} items, batch {batch} ({time.monotonic() - started:.0f} s)",
                  flush=True)  # fmt: skip
        if n == max(plan.catalogues) and plan.exclusions:
            exclusions = exclusion_cells(items, bias, args.threads, args.k, plan.exclusions, 1)
        del found, items, bias
    table, targets = summarise(cells, bandwidth["best"])
    print(f"\nTop-{args.k}, {args.threads} threads, read bandwidth {bandwidth['best']:.1f} GB/s\n")
    print(table)
    if exclusions:
        print("\nExclusions, 1M items (one user with N excluded rows, the rest 100 each)\n")
        print(markdown_table(
            ["excluded", "batch", "strategy", "q/s best", "same result"],
            [[c["excluded"], c["batch"], c["strategy"], c["queries_per_s"], c["same_result"]]
             for c in exclusions],
        ))  # fmt: skip
    print("\ntargets:", {name: t["met"] for name, t in targets.items()})
    env["loadavg_end"] = loadavg()
    write_json(
        args.out,
        {"benchmark": "ranking", "quick": args.quick, "k": args.k, "threads": args.threads,
         "environment": env, "bandwidth_gb_per_s": bandwidth, "results": cells,
         "exclusions": exclusions, "targets": targets,
         "wall_s": time.monotonic() - started},
    )  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
