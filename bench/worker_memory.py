"""Memory of `bertrec serve --workers N`: RSS and PSS of the process tree, and where it goes.

    python -m bertrec.bench.worker_memory [--items 100000 1000000] [--dim 64]
        [--workers 1 2] [--precision fp32 int8] [--label after]
        [--server-env PYTHONPATH=...] [--out bench/results/worker_memory.json]

For each catalogue size a synthetic version (`bench.synthetic`, 1,000 users) is published to a
temporary repository; for each precision and worker count a real `bertrec serve` (loopback,
ports 0) is started, and once it prints "ready" (every worker loaded and warmed up: SERVING)
the RSS and PSS of the parent and each worker are read from /proc/PID/smaps_rollup. PSS
counts a page shared by k processes 1/k in each, so the tree's PSS is what the workers cost
together; `Pss_Anon` is private heap, `Pss_File` the mapped files (the version's arrays, the
run's shared layouts).

`--breakdown` also loads the largest size in this process step by step and records how much
each part adds (RssAnon and Pss, MB): the id indexes, the Ranker's layout and sessions, the
cosine twin, the int8 copy, each warm-up (ONNX Runtime's buffers). The encoder is not
included (a few MB for the synthetic version).

`--ranker-speed` compares the rankers' q/s as they were and as they are (`ranker_speed`);
`--id-lookups` the cost of an id lookup against the dict it replaced.

`--server-env` passes variables to the servers only (e.g. a PYTHONPATH that imports another
checkout, to measure the code before a change with this harness). Results are merged into
`--out` under `--label`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

SMAPS_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File")
READY_TIMEOUT_S = 900


def smaps_mb(pid: int) -> dict[str, float]:
    """One process's smaps_rollup fields, MB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in SMAPS_FIELDS:
            out[name] = round(int(value.split()[0]) / 1024, 1)
    return out


def serve_memory(repo: Path, workers: int, precision: str, env: dict[str, str]) -> dict:
    """Start `bertrec serve`, wait until it serves, read its processes' memory, stop it."""
    from bertrec.bench.server import _children
    from bertrec.bench.synthetic import MODEL

    command = [sys.executable, "-m", "bertrec", "serve", "--model-repo", str(repo), "--model",
               MODEL, "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
               "--workers", str(workers), "--ranker-precision", precision]  # fmt: skip
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                env=dict(os.environ, **env))  # fmt: skip
        try:
            assert proc.stdout is not None
            if not any("ready on port" in line for line in proc.stdout):
                log.seek(0)
                raise RuntimeError(f"bertrec serve exited: {log.read()[-2000:]}")
            parent = smaps_mb(proc.pid)
            children = [smaps_mb(p) for p in _children(proc.pid)]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    processes = [parent, *children]
    tree = {k: round(sum(p.get(k, 0.0) for p in processes), 1) for k in SMAPS_FIELDS}
    return {"workers": workers, "precision": precision, "tree_mb": tree,
            "parent_mb": parent, "workers_mb": children}  # fmt: skip


def breakdown(repo: Path, precision: str) -> dict[str, dict[str, float]]:
    """MB of RssAnon and Pss each part of a loaded version adds, in load order, in this
    process without a shared layout directory: what one worker holds on its own."""
    from bertrec.bench.model_memory import memory_kib
    from bertrec.bench.synthetic import MODEL
    from bertrec.repository.opened import open_version
    from bertrec.server.config import ServerConfig
    from bertrec.server.id_index import IdIndex
    from bertrec.server.model import _inverse_norms, _plain_views
    from bertrec.server.ranking import Ranker
    from bertrec.server.ranking_compact import CompactRanker

    steps: dict[str, dict[str, float]] = {}
    last = memory_kib()

    def step(name: str) -> None:
        nonlocal last
        now = memory_kib()
        steps[name] = {k: round((now[k] - last[k]) / 1024, 1) for k in ("RssAnon", "Pss")}
        last = now

    config = ServerConfig(model_repo=repo, model=MODEL, ranker_precision=precision)
    opened = open_version(config.model_repo, config.model, config.version)
    a = _plain_views(opened.arrays)
    step("open_version (verify, map)")
    ids = IdIndex(a.user_ids, "user", repo), IdIndex(a.item_ids, "item", repo)
    step("id indexes")
    exact = Ranker(a.item_factors, a.item_rank_bias)
    step("Ranker layout and sessions")
    twin = exact.scaled(_inverse_norms(a.item_factors))
    step("cosine twin")
    ranker: Ranker | CompactRanker = exact
    if precision == "int8":
        ranker = CompactRanker(a.item_factors, a.item_rank_bias)
        step("CompactRanker (int8 codes, packed by ONNX Runtime)")
    rng = np.random.default_rng(0)
    for name, scanner in (("ranker", ranker), ("cosine twin", twin)):
        for _ in range(config.warmup_iterations):
            for n in (1, config.ranker_max_batch_size):
                scanner.topk(rng.standard_normal((n, a.dim)).astype(np.float32), 10)
        step(f"{name} warm-up (batches 1 and {config.ranker_max_batch_size})")
    del ids
    return steps


def ranker_speed(n_items: int, dim: int, rounds: int) -> dict[str, Any]:
    """q/s (k=100, 2 threads) in interleaved rounds, the best round and the median of
    per-round ratios to the first variant of each group: the Ranker with the scan sessions as
    they were (each its own ONNX Runtime arena) and as they are (one process arena), on the
    heap and from a mapped layout file; the CompactRanker with its codes packed (one process)
    and read in place from the run's file (workers)."""
    from bertrec.server import ranking
    from bertrec.server.providers import CPU, make_session
    from bertrec.server.ranking_compact import CompactRanker
    from bertrec.server.shared_layout import LayoutCache

    rng = np.random.default_rng(0)
    factors = (rng.standard_normal((n_items, dim)) / np.sqrt(dim)).astype(np.float32)
    bias = (rng.standard_normal(n_items) * 0.1).astype(np.float32)
    shared = ranking.scan_session

    def own(graph: bytes, threads: int, spinning: bool = True) -> Any:
        return make_session(graph, [CPU], intra_op_threads=threads)  # the sessions as they were

    ranking.scan_session = own
    fp32 = {"own arenas, heap": ranking.Ranker(factors, bias, threads=2)}
    ranking.scan_session = shared
    fp32["one arena, heap"] = ranking.Ranker(factors, bias, threads=2)
    with tempfile.TemporaryDirectory(prefix="bertrec-layout-") as tmp:
        layout = LayoutCache(Path(tmp), ("synthetic",))
        fp32["one arena, mapped file"] = ranking.Ranker(factors, bias, threads=2, layout=layout)
        int8 = {"int8 packed": CompactRanker(factors, bias, threads=2),
                "int8 codes read in place from the file": CompactRanker(
                    factors, bias, threads=2, layout=layout)}  # fmt: skip
        groups = [_interleaved(fp32, dim, rounds), _interleaved(int8, dim, rounds)]
    out: dict[str, Any] = {"n_items": n_items, "dim": dim, "k": 100, "threads": 2,
                           "rounds": rounds, "best_q_per_s": {}, "median_ratio": {}}  # fmt: skip
    for seen in groups:
        base_name, *others = seen
        out["best_q_per_s"].update(
            {n: {b: round(max(v)) for b, v in per.items()} for n, per in seen.items()}
        )
        for name in others:
            ratios = {b: round(float(np.median(np.divide(v, seen[base_name][b]))), 3)
                      for b, v in seen[name].items()}  # fmt: skip
            out["median_ratio"][f"{name} / {base_name}"] = ratios
    out["loadavg_end"] = list(os.getloadavg())
    return out


def _interleaved(variants: dict[str, Any], dim: int, rounds: int) -> dict[str, dict]:
    """name -> batch -> q/s of each round, the variants timed in turn at batches 1, 32, 64."""
    rng = np.random.default_rng(1)
    seen: dict[str, dict[int, list[float]]] = {name: {} for name in variants}
    for batch in (1, 32, 64):
        queries = rng.standard_normal((batch, dim)).astype(np.float32)
        repeats = max(1, 64 // batch)
        for ranker in variants.values():
            ranker.topk(queries, 100)
        for _ in range(rounds):
            for name, ranker in variants.items():
                start = time.perf_counter()
                for _ in range(repeats):
                    ranker.topk(queries, 100)
                rate = repeats * batch / (time.perf_counter() - start)
                seen[name].setdefault(batch, []).append(rate)
    return seen


def id_lookups(n_ids: int, asked: int = 1000, rounds: int = 5) -> dict[str, Any]:
    """Microseconds per id of the per-process dict and list the id index replaced, against
    `IdIndex` (binary search over the unicode array) and `IdList`: best of `rounds`."""
    from bertrec.server.id_index import IdIndex

    names = [f"item{i:07d}" for i in np.random.default_rng(0).permutation(n_ids)]
    index = IdIndex(np.asarray(names, dtype=str), "item", Path("."))
    rows_of = {name: row for row, name in enumerate(names)}
    wanted = [names[i] for i in np.random.default_rng(1).integers(0, n_ids, asked)]
    rows = np.random.default_rng(2).integers(0, n_ids, asked)
    cases = {
        "dict.get (before)": lambda: [rows_of.get(n) for n in wanted],
        "IdIndex.row": lambda: [index.row(n) for n in wanted],
        "IdIndex.rows, 100 ids a call": lambda: [
            index.rows(wanted[i : i + 100]) for i in range(0, asked, 100)
        ],
        "list[row] (before)": lambda: [names[r] for r in rows.tolist()],
        "IdList[row]": lambda: [index.list[r] for r in rows.tolist()],
        "IdList.of, 10 rows a call": lambda: [
            index.list.of(rows[i : i + 10]) for i in range(0, asked, 10)
        ],
    }
    out = {}
    for name, case in cases.items():
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            case()
            best = min(best, time.perf_counter() - start)
        out[name] = round(best / asked * 1e6, 3)
    return {"n_ids": n_ids, "us_per_id": out}


def _breakdown_in_a_fresh_process(repo: Path, precision: str) -> dict[str, dict[str, float]]:
    """`breakdown` in its own interpreter: the process arena never shrinks, so a second
    breakdown in one process would find its buffers already there."""
    command = [sys.executable, "-m", "bertrec.bench.worker_memory", "--breakdown-of",
               precision, str(repo)]  # fmt: skip
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    parts: dict[str, dict[str, float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return parts


def run_size(n_items: int, dim: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    from bertrec.bench.synthetic import build_synthetic_repo

    env = dict(v.split("=", 1) for v in args.server_env)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bertrec-worker-memory-") as tmp:
        repo = build_synthetic_repo(Path(tmp), n_items=n_items, n_users=1000, dim=dim)
        for precision in args.precision:
            for workers in args.workers:
                run = {"n_items": n_items, "dim": dim,
                       **serve_memory(repo, workers, precision, env)}  # fmt: skip
                print(json.dumps(run), flush=True)
                runs.append(run)
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--server-env", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--breakdown", action="store_true", help="step by step, largest size")
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", type=Path, default=Path("bench/results/worker_memory.json"))
    parser.add_argument("--ranker-speed", action="store_true", help="q/s, largest size")
    parser.add_argument("--id-lookups", action="store_true", help="us per id, largest size")
    parser.add_argument("--breakdown-of", nargs=2, help=argparse.SUPPRESS)  # precision, repo
    args = parser.parse_args(argv)
    if args.breakdown_of:
        print(json.dumps(breakdown(Path(args.breakdown_of[1]), args.breakdown_of[0])))
        return
    from bertrec.bench.common import environment

    if args.ranker_speed:
        record: dict[str, Any] = {"ranker_speed": ranker_speed(max(args.items), args.dim, 10)}
        print(json.dumps(record, indent=1))
    elif args.id_lookups:
        record = {"id_lookups": id_lookups(max(args.items))}
        print(json.dumps(record, indent=1))
    elif args.breakdown:
        from bertrec.bench.synthetic import build_synthetic_repo

        with tempfile.TemporaryDirectory(prefix="bertrec-worker-memory-") as tmp:
            repo = build_synthetic_repo(Path(tmp), max(args.items), n_users=1000, dim=args.dim)
            parts = {p: _breakdown_in_a_fresh_process(repo, p) for p in args.precision}
        print(json.dumps(parts, indent=1))
        record = {"breakdown_mb": {"n_items": max(args.items), **parts}}
    else:
        runs = [run for n in args.items for run in run_size(n, args.dim, args)]
        record = {"server_env": args.server_env, "runs": runs}
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault(args.label, {}).update(environment=environment(), **record)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
