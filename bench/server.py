"""Server benchmark: Recommend throughput and latency against the gRPC transport ceiling.

    python -m bertrec.bench.server --out results/server.json [--quick]

Everything runs on loopback, on this machine, in one bounded run (about two minutes):

1. A synthetic model version (`synthetic.py`): 100k items x 64 factors, 10k users, 20 rated
   items per user and a tiny ONNX encoder, in a temporary model repository.
2. Server processes, all started before measuring:
   - echo-sync / echo-aio: bare grpcio servers (sync thread pool / grpc.aio) echoing 64 bytes,
     and with `--load-generator go` echo-sync-go: the echo-sync server answering the Go
     generator's Recommend calls with an empty response, over as many connections as the
     worker rows (the same client, connections and path as the Recommend rows it is set
     against),
     the transport ceiling;
   - recommend-sync-batched: `bertrec serve` (sync grpcio) with dynamic batching;
   - recommend-sync-unbatched: the same with batching off (max batch size 1, no window);
   - recommend-aio-batched: a grpc.aio server over the same `Recommender` and batcher, to
     compare server styles on this workload (Recommend only, no interceptor, which flatters it);
   - recommend-1-worker, recommend-2-workers, ... (`--workers 1,2`): `bertrec serve --workers N`
     with batching, loaded over `--worker-channels` connections (so_reuseport spreads
     connections, not calls: one channel reaches one worker); CPU and memory are the whole
     process tree's (RSS and PSS after loading in "memory_after_load"); with `--unpinned`,
     twins of the N > 1 rows with `--pin-workers off`; with `--normal-scheduling`, a
     `-sched-normal` twin of every `bertrec serve` row with `--thread-scheduling normal`, and
     with `--batch-echo` a `-sched-batch` twin of every echo row under SCHED_BATCH (the
     policy `bertrec serve` runs under by default).
3. A closed-loop load generator (grpc.aio, pre-serialised requests; `--client-procs` processes;
   `--load-generator go`: grpc-go for the Recommend rows, `bench/go_load.py`)
   at each concurrency, for every server in turn within each round (noise hits all alike).
   Requests: random known users, k=10, rated items excluded.

`--server-cpus 0 --client-cpus 1` pins the servers and the generator to separate cores (off by
default). Pinned, the bare echo server got faster (3.9k q/s on one core) and Recommend slower
(it needs both cores), so the README's table is unpinned.

Per cell: q/s, p50/p99 latency (ms), errors, and the server process's CPU time per answered
call (user + system, from /proc), which shared machines disturb far less than throughput, with
its context switches per call and its split by thread role (gRPC handlers, the ranking
batcher, grpc's completion-queue poller, the C core's event engine: `bertrec serve` names its
threads, `server/thread_names.py`).
The JSON keeps every round ("rounds"), the best round per cell ("best", also printed as a
markdown table) and the headline ratios at the highest concurrency from the best and from the
median rounds ("summary"), with the machine, the load average and the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.bench.go_load import build_go_loadgen, run_go_load
from bertrec.bench.spawned import Spawned
from bertrec.bench.synthetic import MODEL, build_synthetic_repo

ECHO_METHOD = "/bench.Echo/Echo"
RECOMMEND_METHOD = "/bertrec.v1.RecommenderService/Recommend"
SERVER_STYLES = {
    "echo-sync", "echo-aio", "recommend-sync-batched", "recommend-sync-unbatched",
    "recommend-aio-batched",
}  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One measurement: a server at one concurrency."""

    server: str
    concurrency: int
    qps: float
    p50_ms: float
    p99_ms: float
    calls: int
    errors: int
    server_cpu_us_per_call: float  # user + system CPU of the server process, per answered call
    # Context switches of all the server's threads per answered call: how often a call hops
    # between threads or waits for the GIL (a bare sync echo needs about 7-10).
    server_switches_per_call: float = 0.0
    # Server CPU per call by thread role (`thread_counters`): which part of the server spends it.
    server_cpu_us_per_call_by_thread: dict[str, float] = field(default_factory=dict)
    # `--workers N` rows: calls each worker answered (the kernel spreads connections, not
    # calls, by a hash: a round may load the workers unevenly, or leave one idle).
    calls_per_worker: list[int] = field(default_factory=list)


def thread_counters(pid: int) -> dict[str, tuple[float, int]]:
    """CPU seconds and context switches (voluntary + involuntary) so far of every live thread
    of a process tree, summed per thread role: the OS thread name without its pool number
    ("grpc_12" -> "grpc"), which `bertrec serve` sets from the Python name (`thread_names`)."""
    ticks = os.sysconf("SC_CLK_TCK")
    roles: dict[str, tuple[float, int]] = {}
    for p in [pid, *_children(pid)]:
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                stat, status = (task / "stat").read_text(), (task / "status").read_text()
            except OSError:  # a thread that ended meanwhile
                continue
            name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1]
            cpu_s = (int(fields.split()[11]) + int(fields.split()[12])) / ticks
            lines = status.splitlines()
            switches = sum(int(line.split()[1]) for line in lines if "ctxt_switches:" in line)
            role = re.sub(r"[_-]?\d+$", "", name) or name
            before = roles.get(role, (0.0, 0))
            roles[role] = (before[0] + cpu_s, before[1] + switches)
    return roles


def per_call_by_role(
    start: dict[str, tuple[float, int]], end: dict[str, tuple[float, int]], calls: int
) -> tuple[dict[str, float], float]:
    """Server CPU us per call of each thread role (the busy ones, largest first) and context
    switches per call of all threads, between two `thread_counters` snapshots."""
    calls = max(calls, 1)
    cpu = {role: (end[role][0] - start.get(role, (0.0, 0))[0]) / calls * 1e6 for role in end}
    switches = sum(end[role][1] - start.get(role, (0.0, 0))[1] for role in end) / calls
    busy = sorted(((us, role) for role, us in cpu.items() if us >= 1.0), reverse=True)
    return {role: round(us, 1) for us, role in busy}, switches


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by a process and its children (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(process_cpu_s(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    """Running child processes (a `--workers N` supervisor's workers)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def tree_memory_mb(pid: int) -> dict[str, float]:
    """RSS and PSS (resident pages shared by k processes count 1/k each) of a process tree."""
    totals = {"rss_mb": 0.0, "pss_mb": 0.0}
    for p in [pid, *_children(pid)]:
        for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("Rss", "Pss"):
                totals[f"{name.lower()}_mb"] += int(value.split()[0]) / 1024
    return {k: round(v, 1) for k, v in totals.items()}


# ------------------------------------------------------------------------------ server roles


def serve_echo_sync(workers: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
    )
    # The Go generator's Recommend path, answered as bare: request bytes in, an empty
    # RecommendResponse out, nothing decoded (the echo-sync-go row).
    recommend = grpc.method_handlers_generic_handler(
        "bertrec.v1.RecommenderService",
        {"Recommend": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"")},
    )
    server = grpc.server(
        ThreadPoolExecutor(workers, thread_name_prefix="grpc"),  # named as `bertrec serve`'s
        handlers=[handler, recommend],
        options=[("grpc.so_reuseport", 0)],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    server.wait_for_termination()


async def serve_echo_aio() -> None:
    import grpc

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server(handlers=[handler], options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"port {port}", flush=True)
    await server.wait_for_termination()


async def serve_recommend_aio(repo: Path, batch: int, delay_us: int, threads: int) -> None:
    """grpc.aio over the same Recommender and batcher as `bertrec serve` (Recommend only)."""
    import grpc

    from bertrec.server.config import ServerConfig
    from bertrec.server.engine import Recommender
    from bertrec.server.metrics import ServerMetrics
    from bertrec.server.model import load_model
    from bertrec.server.service import model_ref, ranked_items
    from bertrec.v1 import recommender_pb2 as pb

    config = ServerConfig(
        model_repo=repo, model=MODEL, ranker_max_batch_size=batch,
        ranker_max_queue_delay_us=delay_us, providers=("CPUExecutionProvider",),
        ranker_threads=threads,
    )  # fmt: skip
    model = load_model(config)
    model.warm_up(config.warmup_iterations, batch, config.encoder_max_batch_size)
    engine = Recommender(model, config, ServerMetrics())
    engine.start()

    async def recommend(request: Any, context: Any) -> Any:
        remaining = context.time_remaining() or config.request_timeout_s
        exclude_rated = request.exclude_rated if request.HasField("exclude_rated") else True
        result = await asyncio.wrap_future(engine.recommend_future(
            request.user_id, request.k, exclude_rated, list(request.include_item_ids),
            list(request.exclude_item_ids), time.monotonic() + remaining,
        ))  # fmt: skip
        return pb.RecommendResponse(items=ranked_items(result), model=model_ref(result.model))

    handler = grpc.method_handlers_generic_handler(
        "bertrec.v1.RecommenderService",
        {"Recommend": grpc.unary_unary_rpc_method_handler(
            recommend,
            request_deserializer=pb.RecommendRequest.FromString,
            response_serializer=pb.RecommendResponse.SerializeToString,
        )},
    )  # fmt: skip
    server = grpc.aio.server(handlers=[handler], options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"port {port}", flush=True)
    await server.wait_for_termination()


# ---------------------------------------------------------------------------- load generator


async def run_load(
    target: str, method: str, payloads: Sequence[bytes], concurrency: int, duration_s: float,
    channels: int = 1,
) -> tuple[float, list[float], int]:  # fmt: skip
    """Closed loop: `concurrency` callers, each sending its next request on each answer, spread
    over `channels` connections (each its own TCP connection: a local subchannel pool).

    Returns (elapsed seconds, latencies in seconds, error count).
    """
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1)] if channels > 1 else []
    opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    calls = [channel.unary_unary(method) for channel in opened]
    await asyncio.gather(*(channel.channel_ready() for channel in opened))
    result = await closed_loop(calls, payloads, concurrency, duration_s)
    await asyncio.gather(*(channel.close() for channel in opened))
    return result


async def closed_loop(
    calls: Sequence[Any], payloads: Sequence[bytes], concurrency: int, duration_s: float,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> tuple[float, list[float], int]:  # fmt: skip
    """`concurrency` callers, caller c on `calls[c % len(calls)]`, each sending its next
    request on each answer for `duration_s`; (elapsed seconds, latencies, error count)."""
    import grpc

    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration_s

    async def caller(offset: int) -> None:
        nonlocal errors
        i, call = offset, calls[offset % len(calls)]
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                await call(payloads[i % len(payloads)], timeout=30, metadata=metadata)
                latencies.append(time.perf_counter() - start)
            except grpc.RpcError:
                errors += 1
            i += concurrency

    begin = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(concurrency)))
    return time.perf_counter() - begin, latencies, errors


def _load(
    target: str, method: str, payloads: Sequence[bytes], concurrency: int, duration_s: float,
    channels: int = 1,
) -> tuple[float, list[float], int]:  # fmt: skip
    return asyncio.run(run_load(target, method, payloads, concurrency, duration_s, channels))


def measure_go(
    binary: Path, name: str, target: str, concurrency: int, duration_s: float, pid: int,
    channels: int, users: int, worker_urls: Sequence[str] = (),
) -> Cell:  # fmt: skip
    """`measure` with the Go load generator (Recommend only): a short run, then the counted one."""
    run_go_load(binary, target, concurrency, min(0.3, duration_s), channels, users)
    start = ServerCost.now(pid, worker_urls)
    run = run_go_load(binary, target, concurrency, duration_s, channels, users)
    return Cell(
        name, concurrency, run.calls / run.elapsed_s, run.p50_ms, run.p99_ms, run.calls,
        run.errors, *start.per_call(ServerCost.now(pid, worker_urls), run.calls),
    )  # fmt: skip


@dataclass(frozen=True)
class ServerCost:
    """What a server process tree has spent so far: CPU, per-role thread counters, and the
    calls each `--workers N` worker answered (its own /metrics at `worker_urls`)."""

    cpu_s: float
    threads: dict[str, tuple[float, int]]
    worker_calls: list[int]

    @classmethod
    def now(cls, pid: int, worker_urls: Sequence[str] = ()) -> ServerCost:
        from bertrec.bench.overload import server_counters

        calls = [int(server_counters(url)["handled"]) for url in worker_urls]
        return cls(process_cpu_s(pid), thread_counters(pid), calls)

    def per_call(
        self, end: ServerCost, calls: int
    ) -> tuple[float, float, dict[str, float], list[int]]:
        """Cell's cost fields from here to `end`: CPU us and switches per call, CPU us per
        call by thread role, calls per worker."""
        by_thread, switches = per_call_by_role(self.threads, end.threads, calls)
        split = [b - a for a, b in zip(self.worker_calls, end.worker_calls, strict=True)]
        return (end.cpu_s - self.cpu_s) / max(calls, 1) * 1e6, switches, by_thread, split


def measure(
    name: str, target: str, method: str, payloads: Sequence[bytes], concurrency: int,
    duration_s: float, pid: int, pool: ProcessPoolExecutor | None, pool_size: int = 1,
    channels: int = 1, worker_urls: Sequence[str] = (),
) -> Cell:  # fmt: skip
    """Warm up briefly, then load the server `pid` from `pool`'s processes (or this one)."""
    procs = 1 if pool is None else min(pool_size, concurrency)
    shares = [concurrency // procs + (p < concurrency % procs) for p in range(procs)]
    results = []
    for seconds in (min(0.3, duration_s), duration_s):
        start = ServerCost.now(pid, worker_urls)
        if pool is None:
            results = [_load(target, method, payloads, concurrency, seconds, channels)]
        else:
            jobs = [pool.submit(_load, target, method, payloads, c, seconds, channels)
                    for c in shares]  # fmt: skip
            results = [job.result() for job in jobs]
    end = ServerCost.now(pid, worker_urls)
    elapsed = max(r[0] for r in results)
    latencies = [t for r in results for t in r[1]]
    errors = sum(r[2] for r in results)
    lat = np.sort(np.asarray(latencies)) * 1e3 if latencies else np.array([np.nan])
    return Cell(
        name, concurrency, len(latencies) / elapsed, float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)), len(latencies), errors,
        *start.per_call(end, len(latencies)),
    )  # fmt: skip


# ---------------------------------------------------------------------------------- harness


def _me(role: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "bertrec.bench.server", "--role", role, *args]


def _serve(repo: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "bertrec", "serve", "--model-repo", str(repo), "--model", MODEL,
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
        "--providers", "CPUExecutionProvider", "--workers", "1", *flags,  # rows may override
    ]  # fmt: skip


def start_servers(repo: Path, log_dir: Path, args: argparse.Namespace) -> dict[str, Spawned]:
    threads = ("--ranker-threads", str(args.ranker_threads))
    batched = ("--ranker-max-batch-size", str(args.batch),
               "--ranker-max-queue-delay-us", str(args.delay_us), *threads)  # fmt: skip
    unbatched = ("--ranker-max-batch-size", "1", "--ranker-max-queue-delay-us", "0", *threads)
    aio = ("--repo", str(repo), "--batch", str(args.batch), "--delay-us", str(args.delay_us),
           "--ranker-threads", str(args.ranker_threads))  # fmt: skip
    argvs = {
        "echo-sync": _me("echo-sync"),
        "echo-aio": _me("echo-aio"),
        "recommend-sync-batched": _serve(repo, *batched),
        "recommend-sync-unbatched": _serve(repo, *unbatched),
        "recommend-aio-batched": _me("recommend-aio", *aio),
        **{
            worker_row(n): _serve(repo, *batched, "--workers", str(n))
            for n in (int(w) for w in args.workers.split(","))
        },
        **{
            f"{worker_row(n)}-unpinned": _serve(
                repo, *batched, "--workers", str(n), "--pin-workers", "off"
            )
            for n in (int(w) for w in args.workers.split(","))
            if args.unpinned and n > 1
        },
    }
    if args.load_generator == "go":  # the same echo server, driven as the Recommend rows are
        argvs["echo-sync-go"] = _me("echo-sync")
    if args.batch_echo:  # twins of the echo rows, under SCHED_BATCH as `bertrec serve`
        argvs |= {
            f"{name}-sched-batch": [*argv, "--role-scheduling", "batch"]
            for name, argv in argvs.items()
            if name.startswith("echo-")
        }
    if args.normal_scheduling:  # twins of every `bertrec serve` row, under SCHED_OTHER
        argvs |= {
            f"{name}-sched-normal": [*argv, "--thread-scheduling", "normal"]
            for name, argv in argvs.items()
            if argv[1:3] == ["-m", "bertrec"]
        }
    if args.only:
        argvs = {name: argv for name, argv in argvs.items() if name in args.only.split(",")}
    cpus = _cpus(args.server_cpus)
    servers = {}
    for name, argv in argvs.items():  # one at a time: loading competes for the CPUs
        servers[name] = spawned = Spawned(name, argv, log_dir, cpus)
        if argv[1:3] == ["-m", "bertrec"]:
            spawned.wait_ready()
    return servers


def worker_row(workers: int) -> str:
    """The name of a `bertrec serve --workers N` row."""
    return f"recommend-{workers}-worker{'s' if workers > 1 else ''}"


def _cpus(spec: str) -> set[int] | None:
    """ "0,1" -> {0, 1}; "" -> None (no pinning)."""
    return {int(c) for c in spec.split(",")} if spec else None


def recommend_payloads(n_users: int, count: int = 4096, k: int = 10) -> list[bytes]:
    from bertrec.v1 import recommender_pb2 as pb

    rng = np.random.default_rng(1)
    users = rng.integers(0, n_users, size=count)
    return [pb.RecommendRequest(user_id=f"u{u:07d}", k=k).SerializeToString() for u in users]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bertrec.bench.common import environment, loadavg, markdown_table

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="bertrec-bench-server-") as tmp:
        root = Path(tmp)
        start = time.monotonic()
        repo = build_synthetic_repo(root, args.items, args.users, args.dim)
        build_s = time.monotonic() - start
        go = build_go_loadgen(root / "go") if args.load_generator == "go" else None
        servers = start_servers(repo, root, args)
        try:
            memory = {name: tree_memory_mb(s.proc.pid) for name, s in servers.items()}
            measured = _measure_all(servers, args, concurrencies, go)
        finally:
            for server in servers.values():
                server.stop()
    cells = _best(measured)
    table = markdown_table(
        [
            "server",
            "concurrency",
            "q/s",
            "p50 ms",
            "p99 ms",
            "server CPU us/call",
            "switches/call",
            "calls per worker",
            "errors",
        ],
        [
            [
                c.server,
                c.concurrency,
                c.qps,
                c.p50_ms,
                c.p99_ms,
                c.server_cpu_us_per_call,
                c.server_switches_per_call,
                " / ".join(str(n) for n in c.calls_per_worker),
                c.errors,
            ]
            for c in cells
        ],
    )
    return {
        "environment": environment(),
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "build_s": round(build_s, 2),
        },
        "best": [asdict(c) for c in cells],
        "rounds": [asdict(c) for c in measured],
        "summary": _summary(measured, max(concurrencies)),
        "memory_after_load": memory,
        "table": table,
        "loadavg_end": loadavg(),
    }


def _measure_all(
    servers: dict[str, Spawned], args: argparse.Namespace, concurrencies: list[int],
    go_binary: Path | None = None,
) -> list[Cell]:  # fmt: skip
    """Every cell of every round (servers in turn within a round)."""
    pool = None
    if args.client_procs > 1:
        pool = ProcessPoolExecutor(args.client_procs, mp_context=mp.get_context("spawn"))
    echo = [b"x" * 64]
    recommend = recommend_payloads(args.users)
    measured = []
    try:
        for round_ in range(args.rounds):
            for concurrency in concurrencies:
                for name, server in servers.items():
                    is_echo = name.startswith("echo")
                    go_echo = name.startswith("echo-sync-go")
                    like_workers = "worker" in name or go_echo
                    channels = args.worker_channels if like_workers else 1
                    urls = [url for _, url in sorted(server.worker_metrics_urls.items())]
                    if go_binary is not None and (not is_echo or go_echo):
                        cell = measure_go(
                            go_binary, name, server.target, concurrency, args.duration_s,
                            server.proc.pid, channels, args.users, urls,
                        )  # fmt: skip
                    else:
                        cell = measure(
                            name, server.target, ECHO_METHOD if is_echo else RECOMMEND_METHOD,
                            echo if is_echo else recommend, concurrency, args.duration_s,
                            server.proc.pid, pool, args.client_procs, channels, urls,
                        )  # fmt: skip
                    print(f"round {round_ + 1}: {cell}", file=sys.stderr, flush=True)
                    measured.append(cell)
    finally:
        if pool is not None:
            pool.shutdown()
    return measured


def _best(measured: list[Cell]) -> list[Cell]:
    """The highest-throughput round of each (server, concurrency), grouped by server."""
    best: dict[tuple[str, int], Cell] = {}
    for cell in measured:
        key = (cell.server, cell.concurrency)
        if key not in best or cell.qps > best[key].qps:
            best[key] = cell
    servers = list(dict.fromkeys(c.server for c in measured))
    return sorted(best.values(), key=lambda c: (servers.index(c.server), c.concurrency))


def _summary(measured: list[Cell], concurrency: int) -> dict[str, Any]:
    """Ratios at `concurrency` from the best round and from the median round of each cell."""
    runs: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    leanest: dict[str, Cell] = {}
    for c in measured:
        if c.concurrency == concurrency:
            runs.setdefault(c.server, []).append(c.qps)
            cpu.setdefault(c.server, []).append(c.server_cpu_us_per_call)
            if c.server_cpu_us_per_call < getattr(
                leanest.get(c.server), "server_cpu_us_per_call", 1e18
            ):
                leanest[c.server] = c
    out: dict[str, Any] = {
        "concurrency": concurrency,
        # Where each server's CPU per call goes, by thread role, in its leanest round.
        "cpu_us_per_call_by_thread": {
            name: c.server_cpu_us_per_call_by_thread for name, c in leanest.items()
        },
    }
    for stat, pick in (("best", max), ("median", statistics.median)):
        at = {name: float(pick(qps)) for name, qps in runs.items()}
        for echo in [name for name in cpu if name.startswith("echo-sync")]:
            # Issue 14's "less Python per call": each Recommend row's server CPU per call over
            # a bare sync echo's (the best round being the least CPU per call).
            least = min if stat == "best" else statistics.median
            out.setdefault(stat, {})[f"cpu_per_call_vs_{echo.replace('-', '_')}"] = {
                name: float(least(spent) / least(cpu[echo]))
                for name, spent in cpu.items()
                if name.startswith("recommend-")
            }
        for name, qps in at.items():
            if name.startswith("recommend-") and "-workers" in name:
                n, twin = name.split("-")[1], name.partition("-workers")[2]
                # The same twin's one worker where there is one (-sched-normal); pinning
                # (-unpinned) means nothing to one worker, whose row is then the default's.
                one = at.get(worker_row(1) + twin) or at.get(worker_row(1))
                if one:
                    out.setdefault(stat, {})[f"workers_{n}{twin.replace('-', '_')}_vs_1"] = (
                        qps / one
                    )
        if not at.keys() >= SERVER_STYLES:  # a run of some servers only (--only)
            continue
        out[stat] = {
            **out.get(stat, {}),
            "recommend_vs_fastest_echo": at["recommend-sync-batched"]
            / max(at["echo-sync"], at["echo-aio"]),
            "batching_speedup": at["recommend-sync-batched"] / at["recommend-sync-unbatched"],
            "sync_vs_aio_recommend": at["recommend-sync-batched"] / at["recommend-aio-batched"],
            "sync_vs_aio_echo": at["echo-sync"] / at["echo-aio"],
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/server.json"))
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--duration-s", type=float, default=2.0, help="per cell and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="ranker max batch size")
    parser.add_argument("--delay-us", type=int, default=200, help="ranker max queue delay")
    parser.add_argument("--ranker-threads", type=int, default=1, help="0: one per CPU")
    parser.add_argument("--client-procs", type=int, default=1, help="load generator processes")
    parser.add_argument(
        "--server-cpus",
        default="",
        help="pin every server to these cores, e.g. 0 (default: no pinning)",
    )
    parser.add_argument(
        "--client-cpus", default="", help="pin the load generator(s) to these cores, e.g. 1"
    )
    parser.add_argument("--workers", default="1,2", help="rows for bertrec serve --workers N")
    parser.add_argument(
        "--unpinned", action="store_true",
        help="also rows of N > 1 workers with --pin-workers off (the scheduler places them)",
    )  # fmt: skip
    parser.add_argument(
        "--normal-scheduling", action="store_true",
        help="also a twin of every bertrec serve row with --thread-scheduling normal",
    )  # fmt: skip
    parser.add_argument(
        "--worker-channels", type=int, default=8, help="connections to the --workers servers"
    )
    parser.add_argument("--only", default="", help="these servers only (comma-separated names)")
    parser.add_argument(
        "--load-generator", choices=("python", "go"), default="python",
        help="Recommend rows' closed-loop generator: grpc.aio in Python, or grpc-go "
        "(clients/go/cmd/bertrec-loadgen: a fraction of the CPU per call); echo rows use Python, "
        "and an echo-sync-go row uses Go",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="10k items, 1 round of 1 s")
    parser.add_argument(
        "--batch-echo", action="store_true",
        help="also a twin of every echo row whose threads run under SCHED_BATCH, as "
        "bertrec serve's do by default (--thread-scheduling)",
    )  # fmt: skip
    parser.add_argument("--role", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--role-scheduling", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role != "bench":  # a server role: its threads named as `bertrec serve`'s are
        from bertrec.server import thread_names

        thread_names.install()
        if args.role_scheduling:
            from bertrec.server.thread_placement import schedule_every_thread

            schedule_every_thread(args.role_scheduling)
    if args.role == "echo-sync":
        serve_echo_sync(workers=max(16, 2 * (os.cpu_count() or 1)))
        return 0
    if args.role == "echo-aio":
        asyncio.run(serve_echo_aio())
        return 0
    if args.role == "recommend-aio":
        asyncio.run(serve_recommend_aio(args.repo, args.batch, args.delay_us, args.ranker_threads))
        return 0
    if args.quick:
        args.items, args.rounds, args.duration_s = 10_000, 1, 1.0
    client_cpus = _cpus(args.client_cpus)
    if client_cpus:  # the generator pool's processes inherit it
        os.sched_setaffinity(0, client_cpus)
    result = run(args)
    from bertrec.bench.common import write_json

    write_json(args.out, result)
    print(result["table"])
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
