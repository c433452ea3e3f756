"""Swap benchmark: latency and memory while the server swaps model versions under steady load.

    python -m bertrec.bench.swap --out results/swap.json [--quick]

1. A synthetic model (`synthetic.py`, default 100k items x 64 factors, 10k users) as version 1
   and a perturbed copy as version 2 (`versions.py`), in a temporary repository.
2. `bertrec serve --model-control explicit` on loopback.
3. One grpc.aio event loop runs an open-loop load (Poisson arrivals, Recommend and
   RecommendForText, `--rate` calls/s) and, after `--steady-s` seconds, swaps versions
   `--swaps` times, one every `--swap-every-s`, with the model-repository RPC
   (`RepositoryModelLoad` with "version" = 2, 1, 2, ...): every swap loads a version from disk
   (hashes verified, arrays mapped, warm-up run), serves it, and unloads the other.
4. A call is "during a swap" when its time in flight (intended send to answer) overlaps a
   swap's load call or the `--settle-s` after it; every other call after warm-up is "steady".
   Latency counts from the intended send time, so a stalled server cannot hide queueing.

Reports p50/p99/max for both groups (and per RPC), failures by status (the goal is none), each
swap's duration, and the server's RSS before the first swap, after each swap, and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NS = 1_000_000_000
RPCS = ("recommend", "recommend_for_text")


@dataclass(frozen=True)
class SwapWindow:
    """One swap: its load call's start and end (ns since t0), the version, the RSS after."""

    start_ns: int
    end_ns: int
    version: int
    rss_mb: float
    error: str = ""


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB (from /proc; NaN where unreadable)."""
    from bertrec.bench.common import proc_memory_kib

    try:
        kib = proc_memory_kib(pid)
    except OSError:
        kib = None
    return float("nan") if kib is None else kib / 1024


def payloads(n_users: int, count: int = 1024) -> dict[str, list[bytes]]:
    """Pre-serialised Recommend and RecommendForText requests (synthetic users and words)."""
    from bertrec.bench.synthetic import WORDS
    from bertrec.v1 import recommender_pb2 as pb

    rng = np.random.default_rng(7)
    users = rng.integers(0, n_users, count)
    texts = [" ".join(rng.choice(WORDS, 6)) for _ in range(count)]
    return {
        "recommend": [pb.RecommendRequest(user_id=f"u{u:07d}", k=10).SerializeToString()
                      for u in users],
        "recommend_for_text": [pb.RecommendForTextRequest(text=t, k=10).SerializeToString()
                               for t in texts],
    }  # fmt: skip


async def drive(
    target: str, pid: int, pools: dict[str, list[bytes]], args: argparse.Namespace
) -> tuple[Any, list[SwapWindow], float]:
    """Run the load and the swaps on one event loop; returns calls, swaps, RSS before."""
    import grpc

    from bertrec.bench.loadtest.recorder import OK, Recorder
    from bertrec.bench.loadtest.schedule import open_loop_schedule, rpc_sequence
    from bertrec.bench.loadtest.workload import METHODS, SERVICE
    from bertrec.oip.v2 import grpc_service_pb2 as oip
    from bertrec.oip.v2 import grpc_service_pb2_grpc as oip_grpc
    from bertrec.server.models_cli import VERSION_PARAMETER

    duration_s = args.steady_s + args.swaps * args.swap_every_s + args.steady_s
    rng = np.random.default_rng(0)
    schedule = open_loop_schedule(args.rate, args.warmup_s, duration_s, None, rng).tolist()
    rpcs = rpc_sequence([args.text_share_inverse - 1, 1], len(schedule), rng).tolist()
    recorder = Recorder()
    rss_before = float("nan")
    async with grpc.aio.insecure_channel(target) as channel:
        calls = [channel.unary_unary(SERVICE + METHODS[name]) for name in RPCS]
        repository = oip_grpc.GRPCInferenceServiceStub(channel)
        t0 = time.perf_counter_ns()

        async def fire(i: int, intended: int) -> None:
            pool = pools[RPCS[rpcs[i]]]
            sent = time.perf_counter_ns() - t0
            try:
                await calls[rpcs[i]](pool[i % len(pool)], timeout=args.deadline_s)
                code = OK
            except grpc.RpcError as exc:
                code = int(exc.code().value[0]) if hasattr(exc, "code") else 2
            recorder.add(rpcs[i], intended, sent, time.perf_counter_ns() - t0, code)

        async def load() -> None:
            tasks = []
            for i, intended in enumerate(schedule):
                delay = (t0 + intended - time.perf_counter_ns()) / NS
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(fire(i, intended)))
            await asyncio.gather(*tasks)

        async def swap(version: int) -> SwapWindow:
            request = oip.RepositoryModelLoadRequest(model_name=args.model)
            request.parameters[VERSION_PARAMETER].int64_param = version
            start = time.perf_counter_ns() - t0
            error = ""
            try:
                await repository.RepositoryModelLoad(request, timeout=120)
            except grpc.RpcError as exc:
                error = f"{exc.code().name}: {exc.details()}" if hasattr(exc, "code") else str(exc)
            end = time.perf_counter_ns() - t0
            await asyncio.sleep(args.settle_s)  # let the old version close before measuring
            return SwapWindow(start, end, version, rss_mb(pid), error)

        async def swaps() -> list[SwapWindow]:
            nonlocal rss_before
            await asyncio.sleep(args.warmup_s + args.steady_s)
            rss_before = rss_mb(pid)
            done = []
            for n in range(args.swaps):
                began = time.monotonic()
                done.append(await swap(2 if n % 2 == 0 else 1))
                await asyncio.sleep(max(args.swap_every_s - (time.monotonic() - began), 0))
            return done

        _, windows = await asyncio.gather(load(), swaps())
    return recorder.calls(since_ns=int(args.warmup_s * NS)), windows, rss_before


def during_swaps(calls: Any, windows: Sequence[SwapWindow], settle_ns: int) -> np.ndarray:
    """Mask of the calls whose time in flight overlaps a swap (its load call + settle)."""
    mask = np.zeros(calls.code.size, bool)
    for w in windows:
        mask |= (calls.intended_ns <= w.end_ns + settle_ns) & (calls.done_ns >= w.start_ns)
    return mask


def report(calls: Any, windows: list[SwapWindow], rss_before: float, args: argparse.Namespace,
           rss_end: float) -> dict[str, Any]:  # fmt: skip
    """The JSON report: both groups overall and per RPC, swaps, RSS, settings."""
    from dataclasses import asdict

    from bertrec.bench.common import environment, loadavg
    from bertrec.bench.loadtest.recorder import per_rpc, summarize

    mask = during_swaps(calls, windows, int(args.settle_s * NS))
    groups = {"steady": calls.select(~mask), "during_swaps": calls.select(mask)}
    window_s = float(calls.done_ns.max() - calls.intended_ns.min()) / NS if calls.code.size else 0
    return {
        "groups": {
            name: {
                "all": asdict(summarize(group, window_s)),
                "per_rpc": {k: asdict(v) for k, v in per_rpc(group, RPCS, window_s).items()},
            }
            for name, group in groups.items()
        },
        "swaps": [asdict(w) | {"duration_s": (w.end_ns - w.start_ns) / NS} for w in windows],
        "rss_mb": {
            "before": rss_before,
            "after_each_swap": [w.rss_mb for w in windows],
            "end": rss_end,
        },
        "settings": vars(args) | {"out": str(args.out)},
        "environment": environment(),
        "loadavg": loadavg(),
    }


def table(result: dict[str, Any]) -> str:
    """A markdown table of the two groups, for the console and the README."""
    from bertrec.bench.common import markdown_table

    rows = []
    for name, group in result["groups"].items():
        s = group["all"]
        p = s["latency"]["percentiles_ms"]
        rows.append([name, s["requests"], sum(s["errors"].values()), f"{p['p50']:.2f}",
                     f"{p['p99']:.2f}", f"{s['latency']['max_ms']:.2f}"])  # fmt: skip
    rss = result["rss_mb"]
    swaps = [round(s["duration_s"], 2) for s in result["swaps"]]
    return (
        markdown_table(["calls", "n", "failed", "p50 ms", "p99 ms", "max ms"], rows)
        + f"\n\nswap durations (s): {swaps}\nRSS MiB: before {rss['before']:.0f}, after each "
        f"swap {[round(r) for r in rss['after_each_swap']]}, end {rss['end']:.0f}"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bertrec.bench.spawned import Spawned
    from bertrec.bench.synthetic import MODEL, build_synthetic_repo
    from bertrec.bench.versions import publish_variant

    args.model = MODEL
    with tempfile.TemporaryDirectory(prefix="bertrec-swap-") as tmp:
        root = Path(tmp)
        repo = build_synthetic_repo(root, args.items, args.users, args.dim)
        publish_variant(repo, MODEL, 1, seed=2, version=2)
        argv = [
            sys.executable, "-m", "bertrec", "serve", "--model-repo", str(repo),
            "--model", MODEL, "--version-policy", "specific 1", "--model-control", "explicit",
            "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
            "--providers", "CPUExecutionProvider", "--workers", "1",
        ]  # fmt: skip
        server = Spawned("swap-server", argv, root)
        try:
            server.wait_ready()
            calls, windows, rss_before = asyncio.run(
                drive(server.target, server.proc.pid, payloads(args.users), args)
            )
            rss_end = rss_mb(server.proc.pid)
        finally:
            server.stop()
    return report(calls, windows, rss_before, args, rss_end)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/swap.json"))
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second (open loop)")
    parser.add_argument("--text-share-inverse", type=int, default=5,
                        help="one call in N is RecommendForText (default 5)")  # fmt: skip
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--steady-s", type=float, default=8.0, help="before and after the swaps")
    parser.add_argument("--swaps", type=int, default=6)
    parser.add_argument("--swap-every-s", type=float, default=3.0)
    parser.add_argument("--settle-s", type=float, default=0.5)
    parser.add_argument("--deadline-s", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="10k items, 2 swaps, short phases")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.users, args.swaps, args.steady_s, args.swap_every_s = 10_000, 1000, 2, 3, 2
    from bertrec.bench.common import write_json

    result = run(args)
    write_json(args.out, result)  # creates the folder
    print(table(result))
    failed = sum(sum(g["all"]["errors"].values()) for g in result["groups"].values())
    return 1 if failed or any(s["error"] for s in result["swaps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
