"""The cost of explanations: Recommend with and without `explain`, same server, same run.

    python -m bertrec.bench.explain --out bench/results/explain.json [--calls 2000]

A synthetic version the size of `bertrec demo` (1500 users, 1200 items, 64 factors; every
user rated `--rated` items) gets the arrays explanations read (a text part per item, the ridge
Gram matrix, rated-pair confidences), then `bertrec serve` answers on loopback. One client
thread alternates plain and explained calls for random users (k=10, rated items excluded), so
noise from the shared machine hits both alike; p50/p99 per kind. Also timed in-process:
`server.explain.explain` alone for 10 rows, the part an explained call adds.

With `--ratings` (a MovieLens ratings.csv, e.g. ../shared/data/ml-latest-small/ratings.csv)
it also fits the ranking head (train/ials.py, default config, no text) on every rating and
measures how close the rated-item attribution comes to the served dot product: the sum of all
contributions vs collaborative_part + text_part over each user's top 10 (the CG solve stops
after a few steps, so the two differ slightly; the proto documents it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.bench.common import environment, loadavg, write_json
from bertrec.bench.server import Spawned
from bertrec.bench.synthetic import MODEL, build_synthetic_repo


def build_repo(root: Path, n_users: int, n_items: int, dim: int, rated: int) -> Path:
    """The synthetic version plus explanation arrays, its manifest rewritten to cover them."""
    from bertrec.repository.artifacts import FactorArrays
    from bertrec.repository.manifest import read_manifest, write_manifest

    repo = build_synthetic_repo(root, n_items, n_users, dim)
    version = repo / MODEL / "1"
    manifest = read_manifest(version)
    rng = np.random.default_rng(1)
    arrays = FactorArrays.load(version, manifest.scoring.global_mean, mmap=False)
    rows = np.sort(
        np.stack([rng.choice(n_items, rated, replace=False) for _ in range(n_users)]), axis=1
    )
    items = arrays.item_factors.astype(np.float64)
    stars = rng.integers(1, 6, size=rows.size)
    extra = {
        "rated_indptr.npy": np.arange(n_users + 1, dtype=np.int64) * rated,
        "rated_indices.npy": rows.ravel().astype(np.int32),
        "item_text_factors.npy": (0.5 * arrays.item_factors).astype(np.float32),
        "rank_gramian.npy": items.T @ items + 30.0 * np.eye(dim),
        "rated_confidence.npy": (5.0 * (stars / 5.0) ** 2).astype(np.float32),
    }
    for name, array in extra.items():
        np.save(version / name, array, allow_pickle=False)
    write_manifest(version, manifest)
    return repo


def time_rpcs(target: str, users: list[str], calls: int, seed: int) -> dict[str, list[float]]:
    """Latencies (s) of `calls` plain and `calls` explained Recommend calls, interleaved."""
    from bertrec.client import RecommenderClient

    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {"plain": [], "explain": []}
    with RecommenderClient(target, timeout_s=10.0) as client:
        client.wait_until_serving(60.0)
        for user in rng.choice(users, 200):  # warm both paths
            client.recommend(str(user), k=10, explain=bool(rng.integers(2)))
        for n in range(2 * calls):
            explain = n % 2 == 1
            user = str(users[int(rng.integers(len(users)))])
            start = time.perf_counter()
            client.recommend(user, k=10, explain=explain)
            out["explain" if explain else "plain"].append(time.perf_counter() - start)
    return out


def time_explain_only(repo: Path, calls: int) -> list[float]:
    """Seconds of one `explain` over 10 rows for a random user (as the engine calls it)."""
    from bertrec.repository.artifacts import FactorArrays
    from bertrec.repository.manifest import read_manifest
    from bertrec.server.explain import explain

    version = repo / MODEL / "1"
    a = FactorArrays.load(version, read_manifest(version).scoring.global_mean, mmap=False)
    ids = [str(i) for i in a.item_ids]
    rng = np.random.default_rng(2)
    times = []
    for _ in range(calls):
        u = int(rng.integers(len(a.user_ids)))
        rows = rng.choice(len(ids), 10, replace=False)
        start = time.perf_counter()
        explain(a, ids, a.user_factors[u], u, rows)
        times.append(time.perf_counter() - start)
    return times


def attribution_gap(ratings_csv: Path, users: int, seed: int = 0) -> dict[str, float]:
    """|contributions_total - dot| / |dot| over the top-10 items of `users` random users."""
    import scipy.sparse as sp

    from bertrec.repository.artifacts import FactorArrays
    from bertrec.server.explain import explain
    from bertrec.train.ials import IALSConfig, attribution_arrays, confidence_matrix, fit_ials

    table = np.loadtxt(ratings_csv, delimiter=",", skiprows=1, usecols=(0, 1, 2))
    _, u = np.unique(table[:, 0], return_inverse=True)
    _, i = np.unique(table[:, 1], return_inverse=True)
    shape = (int(u.max()) + 1, int(i.max()) + 1)
    cfg = IALSConfig()
    conf: sp.csr_matrix = confidence_matrix(u, i, table[:, 2].astype(np.float32), shape, cfg)
    start = time.monotonic()
    f = fit_ials(conf, cfg)
    fit_s = time.monotonic() - start
    gramian, confidence = attribution_arrays(conf, f.item_factors, cfg.reg)
    conf.sum_duplicates()
    n_users, n_items = shape
    a = FactorArrays(
        np.arange(n_users).astype(str), np.arange(n_items).astype(str), f.user_factors,
        f.item_factors, np.zeros(n_users, np.float32), np.zeros(n_items, np.float32),
        np.zeros(n_items, np.float32), np.eye(cfg.dim, dtype=np.float32),
        conf.indptr.astype(np.int64), conf.indices.astype(np.int32), 0.0,
        rank_gramian=gramian, rated_confidence=confidence,
    )  # fmt: skip
    ids = [str(n) for n in range(n_items)]
    gaps = []
    for user in np.random.default_rng(seed).choice(n_users, min(users, n_users), replace=False):
        scores = a.item_factors @ a.user_factors[user]
        scores[conf[user].indices] = -np.inf
        for e in explain(a, ids, a.user_factors[user], int(user), np.argsort(-scores)[:10]):
            dot = e.collaborative_part + e.text_part
            assert e.contributions_total is not None
            gaps.append(abs(e.contributions_total - dot) / max(abs(dot), 1e-12))
    g = np.asarray(gaps)
    return {
        "ratings": float(len(table)),
        "fit_s": round(fit_s, 1),
        "relative_gap_median": round(float(np.median(g)), 5),
        "relative_gap_p90": round(float(np.percentile(g, 90)), 5),
        "relative_gap_max": round(float(g.max()), 5),
        "items_explained": float(len(g)),
    }


def percentiles_ms(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "calls": len(times),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = environment()
    with tempfile.TemporaryDirectory(prefix="bertrec-bench-explain-") as tmp:
        root = Path(tmp)
        repo = build_repo(root, args.users, args.items, args.dim, args.rated)
        argv = [sys.executable, "-m", "bertrec", "serve", "--model-repo", str(repo),
                "--model", MODEL, "--host", "127.0.0.1", "--grpc-port", "0",
                "--metrics-port", "0", "--providers", "CPUExecutionProvider",
                "--workers", "1"]  # fmt: skip
        server = Spawned("server", argv, root)
        try:
            server.wait_ready()
            users = [f"u{i:07d}" for i in range(args.users)]
            rpcs = time_rpcs(server.target, users, args.calls, seed=0)
        finally:
            server.stop()
        inner = time_explain_only(repo, args.calls)
    result = {name: percentiles_ms(times) for name, times in rpcs.items()}
    return {
        "environment": env,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "recommend_k10": result,
        "explain_function_10_rows": percentiles_ms(inner),
        "attribution_gap": None if args.ratings is None else attribution_gap(args.ratings, 200),
        "loadavg_end": loadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/explain.json"))
    p.add_argument("--calls", type=int, default=2000, help="calls of each kind")
    p.add_argument("--users", type=int, default=1500)
    p.add_argument("--items", type=int, default=1200)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rated", type=int, default=60, help="rated items per user")
    p.add_argument("--ratings", type=Path, help="MovieLens ratings.csv: attribution gap")
    args = p.parse_args(argv)
    payload = run(args)
    write_json(args.out, payload)
    r = payload["recommend_k10"]
    print(
        f"Recommend k=10: plain p50 {r['plain']['p50_ms']} ms p99 {r['plain']['p99_ms']} ms; "
        f"explain p50 {r['explain']['p50_ms']} ms p99 {r['explain']['p99_ms']} ms; "
        f"explain() alone p50 {payload['explain_function_10_rows']['p50_ms']} ms"
    )
    if payload["attribution_gap"] is not None:
        print(f"attribution vs served dot product: {payload['attribution_gap']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
