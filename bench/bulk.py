"""Bulk recommendations: users/s over gRPC (RecommendBatch, StreamRecommendations) against the
Ranker's own throughput at the same batch, in the same run.

    python -m bertrec.bench.bulk --out bench/results/bulk.json [--quick]

1. A synthetic model version (`synthetic.py`): 100k items x 64 factors, 10k users.
2. `bertrec serve` in its own process with ranking batches of `--batch` (256) and the server's
   ordinary settings otherwise.
3. Rounds, interleaved so machine noise hits both alike:
   - ranker: `Ranker.topk` in this process (the server's own code, on the same version), on
     batches of `--batch` random known users, k=10, rated items excluded: the ceiling; and
     model-rank: `Model.rank`, the batcher's whole step (the scan plus predicted ratings);
   - batch-cN: N closed-loop callers each sending RecommendBatch of `--batch` users
     (pre-serialised requests; responses taken as bytes, so the client parses nothing);
   - stream: one StreamRecommendations of `--stream-users` users read to its end.
Headline: the best round's gRPC users/s over the best round's ranker users/s (target >= 0.8,
issue 14), and the median of the per-round ratios beside it. The machine's CPU and flags come
with the numbers (`common.environment()`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bertrec.bench.common import environment, loadavg, markdown_table, write_json
from bertrec.bench.spawned import Spawned
from bertrec.bench.synthetic import MODEL, build_synthetic_repo
from bertrec.v1 import recommender_pb2 as pb

BATCH_METHOD = "/bertrec.v1.RecommenderService/RecommendBatch"
STREAM_METHOD = "/bertrec.v1.RecommenderService/StreamRecommendations"
TARGET_RATIO = 0.8
K = 10


def user_batches(n_users: int, batch: int, count: int, seed: int = 0) -> list[list[str]]:
    """`count` batches of `batch` distinct random known users (synthetic ids)."""
    rng = np.random.default_rng(seed)
    return [[f"u{u:07d}" for u in rng.choice(n_users, batch, replace=False)] for _ in range(count)]


def ranker_users_per_s(repo: Path, batches: list[list[str]], seconds: float) -> dict[str, float]:
    """Users/s of the ranking alone, batch after batch, on the server's own code: "ranker" is
    `Ranker.topk` (the scan, rated items excluded), "model-rank" is `Model.rank` (the batcher's
    step: the scan plus predicted ratings)."""
    from bertrec.server.config import ServerConfig
    from bertrec.server.model import RankQuery, load_model

    model = _models.get(repo)
    if model is None:
        model = _models[repo] = load_model(ServerConfig(model_repo=repo, model=MODEL))
    queries = []
    for ids in batches:
        rows = [model.training_row(u) for u in ids]
        queries.append([RankQuery(model.user_vector(r), K, model.rated_rows(r), None, r)
                        for r in rows])  # fmt: skip
    scans = [(np.stack([q.vector for q in batch]), [q.exclude for q in batch]) for batch in queries]

    def scan(i: int) -> None:
        vectors, exclude = scans[i % len(scans)]
        model.ranker.topk(vectors, K, exclude=exclude)

    def rank(i: int) -> None:
        model.rank(queries[i % len(queries)])

    return {"ranker": _rate(scan, len(batches[0]), seconds),
            "model-rank": _rate(rank, len(batches[0]), seconds)}  # fmt: skip


def _rate(step: Callable[[int], None], users_per_step: int, seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(done)
        done += 1
    return done * users_per_step / (time.perf_counter() - start)


_models: dict[Path, Any] = {}


def grpc_batch_users_per_s(
    target: str, batches: list[list[str]], callers: int, seconds: float
) -> float:
    """Users/s of `callers` closed-loop RecommendBatch callers, each on its own channel."""
    payloads = [pb.RecommendBatchRequest(user_ids=ids, k=K).SerializeToString() for ids in batches]
    counts = [0] * callers
    stop = time.perf_counter() + seconds

    def caller(i: int) -> None:
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(BATCH_METHOD)
            n = i
            while time.perf_counter() < stop:
                call(payloads[n % len(payloads)], timeout=30)
                counts[i] += 1
                n += callers

    start = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) * len(batches[0]) / (time.perf_counter() - start)


def grpc_stream_users_per_s(target: str, n_users: int, count: int) -> float:
    """Users/s of one StreamRecommendations of `count` users, read to its end."""
    ids = [f"u{u:07d}" for u in np.random.default_rng(1).choice(n_users, count, replace=False)]
    payload = pb.StreamRecommendationsRequest(user_ids=ids, k=K).SerializeToString()
    with grpc.insecure_channel(target) as channel:
        start = time.perf_counter()
        messages = sum(1 for _ in channel.unary_stream(STREAM_METHOD)(payload, timeout=120))
        elapsed = time.perf_counter() - start
    assert messages > 0
    return count / elapsed


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bertrec-bulk-") as tmp:
        repo = build_synthetic_repo(Path(tmp), args.items, args.users, args.dim)
        batches = user_batches(args.users, args.batch, 16)
        argv = [
            sys.executable, "-m", "bertrec", "serve", "--model-repo", str(repo),
            "--model", MODEL, "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
            "--providers", "CPUExecutionProvider", "--workers", "1",
            "--ranker-max-batch-size", str(args.batch),
            "--ranker-max-queue-size", str(4 * args.batch), "--max-stream-users",
            str(args.stream_users),
        ]  # fmt: skip
        server = Spawned("bulk-server", argv, Path(tmp))
        try:
            server.wait_ready()
            rounds = [_round(args, repo, server.target, batches) for _ in range(args.rounds)]
        finally:
            server.stop()
    return _report(args, rounds)


def _round(
    args: argparse.Namespace, repo: Path, target: str, batches: list[list[str]]
) -> dict[str, float]:
    cells = ranker_users_per_s(repo, batches, args.seconds)
    for callers in args.callers:
        cells[f"batch-c{callers}"] = grpc_batch_users_per_s(target, batches, callers, args.seconds)
    cells["stream"] = grpc_stream_users_per_s(target, args.users, args.stream_users)
    print(" ".join(f"{name} {value:,.0f}" for name, value in cells.items()), flush=True)
    return cells


def _report(args: argparse.Namespace, rounds: list[dict[str, float]]) -> dict[str, Any]:
    names = list(rounds[0])
    best = {name: max(r[name] for r in rounds) for name in names}
    grpc_names = [n for n in names if n not in ("ranker", "model-rank")]
    top = max(grpc_names, key=lambda n: best[n])
    per_round = [max(r[n] for n in grpc_names) / r["ranker"] for r in rounds]
    summary = {
        "best_grpc": top,
        "ratio_best": best[top] / best["ranker"],
        "ratio_median_of_rounds": statistics.median(per_round),
        "ratio_rounds": per_round,
        "target": TARGET_RATIO,
        "meets_target": best[top] / best["ranker"] >= TARGET_RATIO,
    }
    table = markdown_table(
        ["cell", "users/s (best)", "x ranker"],
        [[n, f"{best[n]:,.0f}", f"{best[n] / best['ranker']:.2f}"] for n in names],
    )
    print(table)
    print(f"best gRPC ({top}) / ranker: {summary['ratio_best']:.2f} (median of rounds "
          f"{summary['ratio_median_of_rounds']:.2f}; target {TARGET_RATIO})")  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    return {"settings": settings, "rounds": rounds, "best": best, "summary": summary,
            "environment": environment(), "loadavg": loadavg()}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256, help="users per call and per ranking")
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stream-users", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per cell per round")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 1.0
    results = run(args)
    if args.out is not None:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
