"""The load generator: one grpc.aio event loop driving a closed or an open loop.

Requests are pre-serialised bytes and answers are not deserialised, so the generator spends
its CPU on gRPC itself; its CPU use is measured and reported so a saturated generator is seen.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bertrec.bench.loadtest.recorder import OK, Calls, Recorder, latency_stats
from bertrec.bench.loadtest.schedule import NS, open_loop_schedule, rpc_sequence
from bertrec.bench.loadtest.workload import METHODS, SERVICE

if TYPE_CHECKING:
    from bertrec.client.cli_security import ClientSecurity

CLOSED_LOOP_SEQUENCE = 1 << 16  # RPC choices cycled through by the closed loop

Call = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class LoadSpec:
    """One load step. Exactly one of `concurrency` (closed loop) or `rate_rps` (open loop)."""

    target: str
    mix: Mapping[str, float]
    duration_s: float
    warmup_s: float = 1.0
    concurrency: int | None = None
    rate_rps: float | None = None
    max_requests: int | None = None
    deadline_s: float = 5.0
    max_in_flight: int = 4096
    channels: int = 1
    seed: int = 0
    progress: bool = True
    security: ClientSecurity | None = None  # TLS and the token; None: plaintext, no token

    @property
    def label(self) -> str:
        if self.rate_rps is not None:
            return f"open {self.rate_rps:g}/s"
        return f"closed x{self.concurrency}"


@dataclass(frozen=True)
class StepResult:
    """The measured (post warm-up) calls of one step and how the generator fared."""

    spec: LoadSpec
    calls: Calls
    window_s: float
    measure_start_ns: int
    client_cpu_percent: float  # of one core, over the whole step


def run_step(spec: LoadSpec, pools: Mapping[str, Sequence[bytes]]) -> StepResult:
    """Run one step to completion (blocking) and return its measured calls."""
    if (spec.concurrency is None) == (spec.rate_rps is None):
        raise ValueError("give exactly one of concurrency and rate_rps")
    return asyncio.run(_run(spec, pools))


def _open_channels(spec: LoadSpec) -> list[Any]:
    import grpc

    # A local subchannel pool per channel gives each channel its own TCP connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    if spec.security is None:
        return [grpc.aio.insecure_channel(spec.target, options=options)
                for _ in range(spec.channels)]  # fmt: skip
    return [spec.security.channel(spec.target, options, aio=True) for _ in range(spec.channels)]


def _bound(call: Call, spec: LoadSpec) -> Call:
    """`call` sending the token with every request (the one per-call cost of auth here)."""
    metadata = spec.security.metadata if spec.security is not None else None
    return call if metadata is None else functools.partial(call, metadata=metadata)


async def _run(spec: LoadSpec, pools: Mapping[str, Sequence[bytes]]) -> StepResult:
    names = list(spec.mix)
    channels = _open_channels(spec)
    try:
        calls = [[_bound(ch.unary_unary(SERVICE + METHODS[n]), spec) for n in names]
                 for ch in channels]  # fmt: skip
        recorder = Recorder()
        t0 = time.perf_counter_ns()
        cpu0 = time.process_time()
        measure_start = int(spec.warmup_s * NS)
        progress = asyncio.create_task(_progress(recorder, t0, measure_start, spec.progress))
        try:
            if spec.rate_rps is not None:
                await _open_loop(spec, names, pools, calls, recorder, t0)
            else:
                await _closed_loop(spec, names, pools, calls, recorder, t0)
        finally:
            progress.cancel()
        wall = (time.perf_counter_ns() - t0) / NS
        cpu = 100.0 * (time.process_time() - cpu0) / max(wall, 1e-9)
    finally:
        for ch in channels:
            await ch.close()
    measured = recorder.calls(since_ns=measure_start)
    last = int(measured.done_ns.max()) if measured.done_ns.size else measure_start
    window = max(last - measure_start, 1) / NS
    return StepResult(spec, measured, window, measure_start, cpu)


async def _one_call(call: Call, payload: bytes, deadline_s: float) -> int:
    """The gRPC status code (as a number) of one call."""
    import grpc

    try:
        await call(payload, timeout=deadline_s)
        return OK
    except grpc.RpcError as error:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        return int(code.value[0])


async def _open_loop(
    spec: LoadSpec,
    names: list[str],
    pools: Mapping[str, Sequence[bytes]],
    calls: list[list[Call]],
    recorder: Recorder,
    t0: int,
) -> None:
    """Send on a Poisson schedule; never wait for answers (up to `max_in_flight`).

    A call sent late (the loop was busy, or the in-flight window was full) still has its
    latency measured from its intended time, so an overloaded server shows as latency.
    """
    assert spec.rate_rps is not None
    rng = np.random.default_rng(spec.seed)
    schedule = open_loop_schedule(spec.rate_rps, spec.warmup_s, spec.duration_s,
                                  spec.max_requests, rng)  # fmt: skip
    rpcs = rpc_sequence(list(spec.mix.values()), len(schedule), rng)
    picks = rng.integers(0, 1 << 30, len(schedule))
    window = asyncio.Semaphore(spec.max_in_flight)
    tasks: set[asyncio.Task[None]] = set()

    async def fire(i: int, intended: int) -> None:
        rpc = int(rpcs[i])
        pool = pools[names[rpc]]
        sent = time.perf_counter_ns() - t0
        code = await _one_call(calls[i % len(calls)][rpc], pool[picks[i] % len(pool)],
                               spec.deadline_s)  # fmt: skip
        recorder.add(rpc, intended, sent, time.perf_counter_ns() - t0, code)
        window.release()

    for i, intended in enumerate(schedule.tolist()):
        delay = (t0 + intended - time.perf_counter_ns()) / NS
        if delay > 0:
            await asyncio.sleep(delay)
        await window.acquire()
        task = asyncio.create_task(fire(i, intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def _closed_loop(
    spec: LoadSpec,
    names: list[str],
    pools: Mapping[str, Sequence[bytes]],
    calls: list[list[Call]],
    recorder: Recorder,
    t0: int,
) -> None:
    """`concurrency` callers, each sending its next request as soon as its answer arrives."""
    assert spec.concurrency is not None
    rng = np.random.default_rng(spec.seed)
    rpcs = rpc_sequence(list(spec.mix.values()), CLOSED_LOOP_SEQUENCE, rng).tolist()
    picks = rng.integers(0, 1 << 30, CLOSED_LOOP_SEQUENCE).tolist()
    end = int((spec.warmup_s + spec.duration_s) * NS)
    measure_start = int(spec.warmup_s * NS)
    budget = [spec.max_requests if spec.max_requests is not None else -1]
    counter = [0]

    async def caller(worker: int) -> None:
        channel_calls = calls[worker % len(calls)]
        while True:
            sent = time.perf_counter_ns() - t0
            if sent >= end:
                return
            if sent >= measure_start and budget[0] >= 0:
                if budget[0] == 0:
                    return
                budget[0] -= 1
            i = counter[0] % CLOSED_LOOP_SEQUENCE
            counter[0] += 1
            rpc = rpcs[i]
            pool = pools[names[rpc]]
            code = await _one_call(channel_calls[rpc], pool[picks[i] % len(pool)],
                                   spec.deadline_s)  # fmt: skip
            recorder.add(rpc, sent, sent, time.perf_counter_ns() - t0, code)

    await asyncio.gather(*(caller(w) for w in range(spec.concurrency)))


async def _progress(recorder: Recorder, t0: int, measure_start: int, enabled: bool) -> None:
    """Every second: elapsed time, answers/s and p99 over the last second, errors so far."""
    if not enabled:
        return
    seen, errors = 0, 0
    tty = sys.stderr.isatty()
    while True:
        await asyncio.sleep(1.0)
        recent = recorder.slice(seen, recorder.size)
        seen = recorder.size
        ok = recent.code == OK
        errors += int((~ok).sum())
        p99 = latency_stats(recent.latency_ms[ok]).percentiles_ms["p99"]
        elapsed = (time.perf_counter_ns() - t0) / NS
        phase = "warm-up" if elapsed * NS < measure_start else "measure"
        line = (f"[{elapsed:6.1f}s {phase}] {int(ok.sum()):7d} q/s  p99 {p99:8.2f} ms  "
                f"errors {errors}")  # fmt: skip
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
