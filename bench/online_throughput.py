"""RecordFeedback throughput (issue 11): 64 concurrent callers on each store, fsync on.

    python -m bertrec.bench.online_throughput --ratings ../shared/data/ml-latest-small \\
        [--callers 64] [--duration-s 10] [--out bench/results/online_throughput.json]

Two levels, each for 1 and 16 events per call, on each store:
- "store": `store.append` from `--callers` threads in this process: what the store alone
  sustains (group commit), with commits and events per commit from its `CommitObserver`;
- "rpc": `RecordFeedback` from `--callers` concurrent grpc.aio calls against a real
  `bertrec serve --feedback-store URL` on loopback, serving the online evaluation's export
  (bench/online_model.py): validation, the durable append and the fold-in of the users.

Stores: SQLite (WAL, synchronous=FULL) in a temporary folder, and Redis: a `redis-server`
started here on a free loopback port with `--appendonly yes --appendfsync always` (its
CONFIG GET answer is in the JSON). Each caller loops (closed loop) for `--duration-s` after
a short warm-up; every call is timed, and events/s = events acknowledged / wall time.
Events: ratings of catalogue items, by users of the training data, with unique keys.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
BATCHES = (1, 16)
RATINGS = np.arange(1, 11) / 2.0  # 0.5 .. 5.0, MovieLens' scale


@dataclass(frozen=True)
class Catalogue:
    """Who and what the generated events name: known user ids and item ids."""

    users: list[str]
    items: list[str]


class EventMaker:
    """Random valid events with unique idempotency keys, one maker per caller."""

    def __init__(self, catalogue: Catalogue, tag: str, seed: int) -> None:
        self.catalogue = catalogue
        self.tag = tag
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def batch(self, size: int) -> list[tuple[str, str, float, str]]:
        """`size` events as (user, item, rating, key); one user per batch, as a client sends."""
        user = self.catalogue.users[int(self.rng.integers(len(self.catalogue.users)))]
        out = []
        for _ in range(size):
            item = self.catalogue.items[int(self.rng.integers(len(self.catalogue.items)))]
            out.append((user, item, float(self.rng.choice(RATINGS)), f"{self.tag}-{self.n}"))
            self.n += 1
        return out


@dataclass
class Counts:
    """A commit observer (the store level): durable writes and the events they carried."""

    commits: int = 0
    events: int = 0
    commit_s: float = 0.0

    def committed(self, duration_s: float, events: int, calls: int) -> None:
        self.commits += 1
        self.events += events
        self.commit_s += duration_s


def measure(
    call: Callable[[int, int], int], callers: int, duration_s: float, warmup_s: float
) -> dict[str, Any]:
    """Run `call(caller, n) -> events acknowledged` from `callers` threads in a closed loop;
    only calls that start after the warm-up and end before its end count."""
    stop_at = time.monotonic() + warmup_s + duration_s
    begin = time.monotonic() + warmup_s
    samples: list[list[tuple[float, float, int]]] = [[] for _ in range(callers)]
    errors: list[BaseException] = []

    def loop(caller: int) -> None:
        n = 0
        try:
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                events = call(caller, n)
                samples[caller].append((t0, time.monotonic(), events))
                n += 1
        except BaseException as exc:  # reported below: a failed call voids the run
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} callers failed; first: {errors[0]!r}")
    return summarize_calls([s for caller in samples for s in caller], begin, stop_at)


def summarize_calls(
    calls: Sequence[tuple[float, float, int]], begin: float, end: float
) -> dict[str, Any]:
    """events/s, calls/s and latency percentiles (ms) of the calls within [begin, end]."""
    kept = np.asarray([c for c in calls if c[0] >= begin and c[1] <= end], dtype=np.float64)
    if len(kept) == 0:
        return {"calls": 0}
    wall = float(kept[:, 1].max() - begin)
    latency = (kept[:, 1] - kept[:, 0]) * 1e3
    p50, p90, p99 = np.percentile(latency, [50, 90, 99])
    return {
        "calls": len(kept),
        "events": int(kept[:, 2].sum()),
        "events_per_s": round(float(kept[:, 2].sum() / wall), 1),
        "calls_per_s": round(len(kept) / wall, 1),
        "latency_ms": {"p50": round(p50, 2), "p90": round(p90, 2), "p99": round(p99, 2),
                       "max": round(float(latency.max()), 2)},
    }  # fmt: skip


def store_level(url: str, catalogue: Catalogue, batch: int, args: argparse.Namespace) -> Any:
    """`store.append` from `args.callers` threads, plus commits per second from the store."""
    from bertrec.feedback.events import FeedbackEvent, FeedbackKind
    from bertrec.feedback.store import open_store

    counts = Counts()
    store = open_store(url, counts)
    makers = [EventMaker(catalogue, f"s{batch}-{c}", c) for c in range(args.callers)]

    def call(caller: int, n: int) -> int:
        events = [
            FeedbackEvent(u, i, FeedbackKind.RATING, r, time.time(), key)
            for u, i, r, key in makers[caller].batch(batch)
        ]
        return store.append(events, timeout_s=60).accepted

    try:
        result = measure(call, args.callers, args.duration_s, args.warmup_s)
    finally:
        store.close()
    per_commit = counts.events / counts.commits if counts.commits else 0.0
    return result | {
        "commits_whole_run": counts.commits,
        "events_per_commit": round(per_commit, 1),
        "mean_commit_ms": round(counts.commit_s / max(counts.commits, 1) * 1e3, 2),
    }


def rpc_level(target: str, catalogue: Catalogue, batch: int, args: argparse.Namespace) -> Any:
    """`RecordFeedback` from `args.callers` concurrent calls on one grpc.aio event loop."""
    return asyncio.run(_rpc_level(target, catalogue, batch, args))


async def _rpc_level(
    target: str, catalogue: Catalogue, batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    import grpc

    from bertrec.v1 import recommender_pb2 as pb
    from bertrec.v1 import recommender_pb2_grpc as pb_grpc

    tag = f"r{batch}-{time.time_ns()}"
    makers = [EventMaker(catalogue, f"{tag}-{c}", c) for c in range(args.callers)]
    samples: list[tuple[float, float, int]] = []
    begin = time.monotonic() + args.warmup_s
    stop_at = begin + args.duration_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)

        async def caller(c: int) -> None:
            while time.monotonic() < stop_at:
                events = [
                    pb.FeedbackEvent(user_id=u, item_id=i, kind=pb.FEEDBACK_KIND_RATING,
                                     rating=r, idempotency_key=key)
                    for u, i, r, key in makers[c].batch(batch)
                ]  # fmt: skip
                t0 = time.monotonic()
                answer = await stub.RecordFeedback(
                    pb.RecordFeedbackRequest(events=events), timeout=60
                )
                samples.append((t0, time.monotonic(), answer.accepted))

        await asyncio.gather(*(caller(c) for c in range(args.callers)))
    return summarize_calls(samples, begin, stop_at) | {"calls_whole_run": len(samples)}


def server_cost(pid: int, metrics_port: int | None) -> dict[str, float]:
    """Cumulative CPU seconds of the server process and its feedback commit series, to
    difference around a run: where a call's time goes, and calls per fsync in the server."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out = {"cpu_s": (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")}
    if metrics_port is not None:
        with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
            text = page.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("bertrec_feedback_commit") and not sample.labels.get(
                    "le"
                ):
                    out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def cost_of_run(before: dict[str, float], after: dict[str, float], calls: int) -> dict[str, Any]:
    """The server's CPU per call and its group commit over one run (`server_cost` deltas)."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    commits = delta.get("bertrec_feedback_commit_calls_count", 0.0)
    return {
        "server_cpu_ms_per_call": round(delta["cpu_s"] / max(calls, 1) * 1e3, 2),
        "server_commits": int(commits),
        "server_calls_per_commit": round(
            delta.get("bertrec_feedback_commit_calls_sum", 0.0) / commits, 1
        )
        if commits
        else None,
        "server_mean_commit_ms": round(
            delta.get("bertrec_feedback_commit_seconds_sum", 0.0) / commits * 1e3, 2
        )
        if commits
        else None,
    }


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A redis-server on a free loopback port with AOF fsync on every write; yields its URL."""
    import redis

    port = _free_port()
    log_path = folder / "redis.log"
    argv = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
        "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile",
        str(log_path),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server did not start: {log_path.read_text()}"
                    ) from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def redis_fsync_config(url: str) -> dict[str, Any]:
    """The server's own answer on its durability settings."""
    import redis

    client = redis.Redis.from_url(url)
    return {k: client.config_get(k)[k] for k in ("appendonly", "appendfsync")}


def _cpu_s() -> float:
    """CPU seconds used so far by this process (the load generator), every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def catalogue_of(repo: Path) -> Catalogue:
    """Users and items of the served version (read from its manifest's arrays)."""
    from bertrec.repository.opened import open_version

    arrays = open_version(repo, "bertrec").arrays
    return Catalogue([str(u) for u in arrays.user_ids], [str(i) for i in arrays.item_ids])


def run_store(name: str, url: str, catalogue: Catalogue, args: argparse.Namespace,
              repo: Path, folder: Path) -> dict[str, Any]:  # fmt: skip
    """Both levels, both batch sizes, on one store (a fresh key space for every run)."""
    from bertrec.bench.online import serve_argv
    from bertrec.bench.spawned import Spawned

    out: dict[str, Any] = {"url": url}
    for batch in BATCHES:
        log.info("%s: store level, %d events per call", name, batch)
        out[f"store_{batch}_per_call"] = store_level(url, catalogue, batch, args)
    server = Spawned(f"{name}-server", serve_argv(repo, url), folder)
    try:
        server.wait_ready()
        for batch in BATCHES:
            log.info("%s: RecordFeedback, %d events per call", name, batch)
            before, client_s = server_cost(server.proc.pid, server.metrics_port), _cpu_s()
            result = rpc_level(server.target, catalogue, batch, args)
            client_s = _cpu_s() - client_s
            after = server_cost(server.proc.pid, server.metrics_port)
            cost = cost_of_run(before, after, result["calls_whole_run"])
            client = {
                "client_cpu_ms_per_call": round(client_s / result["calls_whole_run"] * 1e3, 2)
            }
            out[f"rpc_{batch}_per_call"] = result | cost | client
    finally:
        server.stop()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every store, every level and batch size; the environment and settings."""
    from bertrec.bench.common import environment, loadavg
    from bertrec.bench.online import code_state
    from bertrec.bench.online_model import cached_repo
    from bertrec.bench.online_protocol import time_holdout
    from bertrec.bench.quality_protocol import load_quality_data
    from bertrec.train.pipeline import TrainConfig

    data = load_quality_data(args.ratings, None)
    split = time_holdout(data.ratings)
    repo, _ = cached_repo(data, split.train, TrainConfig(baselines=False, progress=False),
                          args.cache_dir)  # fmt: skip
    catalogue = catalogue_of(repo)
    report: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "bertrec.bench.online_throughput", *args.argv]),
        "settings": {
            "callers": args.callers,
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "batches": list(BATCHES),
        },
        "environment": environment(),
        "code": code_state(),
        "stores": {},
    }
    with tempfile.TemporaryDirectory(prefix="bertrec-throughput-") as tmp:
        root = Path(tmp)
        sqlite_url = f"sqlite://{root / 'feedback.db'}"
        report["stores"]["sqlite"] = run_store("sqlite", sqlite_url, catalogue, args, repo, root)
        report["stores"]["sqlite"]["fsync"] = "WAL, synchronous=FULL"
        redis_dir = root / "redis"
        redis_dir.mkdir()
        with redis_server(redis_dir) as url:
            fsync = redis_fsync_config(url)
            report["stores"]["redis"] = run_store("redis", url, catalogue, args, repo, root)
            report["stores"]["redis"]["fsync"] = fsync
    report["loadavg_end"] = loadavg()
    return report


def table(report: dict[str, Any]) -> str:
    """One markdown row per store, level and batch size."""
    from bertrec.bench.common import markdown_table

    rows = []
    for store, result in report["stores"].items():
        for level in ("store", "rpc"):
            for batch in BATCHES:
                r = result.get(f"{level}_{batch}_per_call", {})
                if r.get("calls"):
                    lat = r["latency_ms"]
                    rows.append([store, level, batch, r["events_per_s"], r["calls_per_s"],
                                 lat["p50"], lat["p99"]])  # fmt: skip
    headers = ["store", "level", "events/call", "events/s", "calls/s", "p50 ms", "p99 ms"]
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, write its JSON and print its table."""
    from bertrec.bench.common import write_json
    from bertrec.bench.online_model import DEFAULT_CACHE

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ratings", type=Path, required=True, help="MovieLens folder or file")
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=10.0, help="per measurement")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="cached exports")
    parser.add_argument("--out", type=Path, default=Path("bench/results/online_throughput.json"))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = run(args)
    write_json(args.out, report)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
