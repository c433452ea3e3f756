"""Feedback store throughput: 64 concurrent callers appending one event per call, with fsync on.

    python -m bertrec.bench.feedback_store [--threads 64] [--duration-s 5] \
        [--out bench/results/feedback_store.json]

For each store (SQLite in WAL mode with synchronous=FULL; a redis-server started here with
`appendonly yes`, `appendfsync always`, `save ""`), in a fresh folder on the disk of
`--data-dir`: `--threads` threads append one event per call, each with a new key, for
`--warmup-s` (discarded) then `--duration-s`. Reports events/s, call latency p50/p99, and
fsyncs per call: on SQLite the store's commits (each one WAL fsync) per call; on Redis the
fdatasync calls of redis-server counted by `strace -c` during a second, traced run (tracing
slows Redis, so that run's throughput is not reported), when strace is available.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.bench.common import environment, loadavg, markdown_table, write_json
from bertrec.feedback.events import FeedbackEvent, FeedbackKind
from bertrec.feedback.store import FeedbackStore, StoreError, open_store


class Commits:
    """Counts the store's durable writes (SQLite: one WAL fsync each) and the calls in them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commits = 0
        self.calls = 0

    def committed(self, duration_s: float, events: int, calls: int) -> None:
        with self.lock:
            self.commits += 1
            self.calls += calls


def hammer(
    store: FeedbackStore,
    threads: int,
    warmup_s: float,
    duration_s: float,
    tag: str,
    on_measure: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """`threads` callers appending one event per call; the numbers of the measured window."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    measure_from = [0.0]
    stop_at = [float("inf")]

    def caller(n: int) -> None:
        start.wait()
        i = 0
        while (now := time.perf_counter()) < stop_at[0]:
            key = f"{tag}-{n}-{i}"
            store.append([FeedbackEvent(f"u{n}", f"i{i}", FeedbackKind.CLICK, 0.0, 1.0, key)])
            if now >= measure_from[0]:
                latencies[n].append(time.perf_counter() - now)
            i += 1

    workers = [threading.Thread(target=caller, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    measure_from[0] = time.perf_counter() + warmup_s
    stop_at[0] = measure_from[0] + duration_s
    start.wait()
    time.sleep(warmup_s)
    on_measure()
    for w in workers:
        w.join()
    calls = np.concatenate([np.asarray(x) for x in latencies])
    return {
        "calls": int(calls.size),
        "events_per_s": round(calls.size / duration_s, 1),
        "latency_p50_ms": round(float(np.percentile(calls, 50)) * 1e3, 2),
        "latency_p99_ms": round(float(np.percentile(calls, 99)) * 1e3, 2),
    }


def run_sqlite(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    commits = Commits()
    store = open_store(f"sqlite://{folder / 'feedback.db'}", commits)
    before: list[int] = []
    try:
        mark = lambda: before.extend([commits.commits, commits.calls])  # noqa: E731
        result = hammer(store, args.threads, args.warmup_s, args.duration_s, "s", mark)
    finally:
        store.close()
    fsyncs, calls = commits.commits - before[0], commits.calls - before[1]
    return {**result, "fsyncs_per_call": round(fsyncs / max(calls, 1), 4)}


def run_redis(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    folder, port = folder.resolve(), _free_port()  # redis-server chdirs to --dir first
    server = subprocess.Popen(
        [args.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
         "--appendonly", "yes", "--appendfsync", "always", "--save", "",
         "--logfile", str(folder / "redis.log")],
    )  # fmt: skip
    try:
        store = _open_when_up(f"redis://127.0.0.1:{port}/0", server)
        try:
            result = hammer(store, args.threads, args.warmup_s, args.duration_s, "r")
            result["fsyncs_per_call"] = _traced_fsyncs_per_call(store, server.pid, args)
        finally:
            store.close()
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    return result


def _traced_fsyncs_per_call(store: FeedbackStore, pid: int, args: argparse.Namespace) -> Any:
    """fdatasync+fsync calls of redis-server per append, from `strace -c` over a second run."""
    if shutil.which("strace") is None:
        return None
    tracer: list[subprocess.Popen[str]] = []

    def attach() -> None:
        tracer.append(subprocess.Popen(
            ["strace", "-c", "-f", "-e", "trace=fsync,fdatasync", "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
        time.sleep(0.3)  # attached before the window opens (it opens after the warm-up)

    traced = hammer(store, args.threads, args.warmup_s, args.duration_s, "t", attach)
    tracer[0].send_signal(signal.SIGINT)
    _, report = tracer[0].communicate(timeout=30)
    # `strace -c` rows: % time, seconds, usecs/call, calls, [errors,] syscall.
    rows = [line.split() for line in report.splitlines()]
    counted = sum(int(r[3]) for r in rows if len(r) >= 5 and r[-1] in ("fsync", "fdatasync"))
    if counted == 0:
        return None  # not permitted to trace, or the format changed
    # The trace also counts the warm-up's last 0.3 s: a small overestimate of fsyncs per call.
    return round(counted / max(traced["calls"], 1), 4)


def _open_when_up(
    url: str, server: subprocess.Popen[bytes], timeout_s: float = 30.0
) -> FeedbackStore:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return open_store(url)
        except StoreError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def filesystem(path: Path) -> str | None:
    """The type of the filesystem holding `path` (tmpfs would make fsync free)."""
    best: tuple[str, str | None] = ("", None)
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, kind, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best[0]):
                best = (mount, kind)
    except OSError:
        pass
    return best[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/feedback_store.json"))
    p.add_argument("--threads", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=5.0)
    p.add_argument("--warmup-s", type=float, default=1.0)
    where = "the stores live in a temporary folder here (its disk is what is measured)"
    p.add_argument("--data-dir", type=Path, default=Path("bench/results"), help=where)
    p.add_argument("--redis-server", default="redis-server")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    env = {**environment(), "filesystem": filesystem(args.data_dir)}
    stores: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=args.data_dir, prefix=".feedback-bench-") as tmp:
        for name, run in [("sqlite", run_sqlite), ("redis", run_redis)]:
            folder = Path(tmp) / name
            folder.mkdir()
            stores[name] = run(folder, args)
            print(name, stores[name], flush=True)
    table = markdown_table(
        ["store", "events/s", "p50 ms", "p99 ms", "fsyncs/call"],
        [[n, r["events_per_s"], r["latency_p50_ms"], r["latency_p99_ms"], r["fsyncs_per_call"]]
         for n, r in stores.items()],
    )  # fmt: skip
    print(table)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(args.out, {
        "stores": stores, "table": table, "environment": env, "loadavg_end": loadavg(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
        "events_per_call": 1,
    })  # fmt: skip


if __name__ == "__main__":
    main()
