"""Cross-check `bertrec loadtest` against locust: same server, same closed-loop concurrency.

Run manually (locust is not a project dependency; install it in its own virtualenv, since
gevent pins may clash with the project's):

    python3 -m venv /tmp/locust-venv && /tmp/locust-venv/bin/pip install locust grpcio
    python -m bertrec.bench.loadtest.locust_compare --target 127.0.0.1:50051 \
        --model-repo bertrec-demo/models --model bertrec --users 8 --duration-s 20 \
        --locust /tmp/locust-venv/bin/locust

Both send Recommend only (k=10, random known users), closed loop, `--users` callers. Locust runs
a generated gRPC user class (gevent-patched grpcio, pre-serialised requests, no think time),
one process, stats reset once all users are spawned. The two throughputs should agree within
10% unless one generator saturates its core (both CPU figures are printed).

On a 2-core machine the generators compete with the server for CPU, and locust spends more CPU
per call than `bertrec loadtest`, so with a saturated server the tool that uses less CPU measures
more throughput. `--client-cpu N` pins both generators to core N (locust inherits the
affinity); start the server pinned to the other core (`taskset -c 0 bertrec serve ...`) so
each tool gets the same server.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LOCUSTFILE = """
import base64, os, time
import grpc.experimental.gevent as grpc_gevent
grpc_gevent.init_gevent()
import grpc
from locust import User, task

PAYLOADS = [base64.b64decode(x) for x in open(os.environ["LT_PAYLOADS"]).read().split()]
METHOD = "/bertrec.v1.RecommenderService/Recommend"


class RecommendUser(User):
    wait_time = staticmethod(lambda: 0)  # closed loop: next call as soon as the answer is in

    def on_start(self):
        self.channel = grpc.insecure_channel(os.environ["LT_TARGET"])
        self.call = self.channel.unary_unary(METHOD)
        self.i = id(self) % len(PAYLOADS)

    @task
    def recommend(self):
        self.i = (self.i + 1) % len(PAYLOADS)
        payload = PAYLOADS[self.i]
        start = time.perf_counter()
        error = None
        try:
            answer = self.call(payload, timeout=5)
        except grpc.RpcError as exc:
            error, answer = exc, b""
        self.environment.events.request.fire(
            request_type="grpc", name="Recommend",
            response_time=(time.perf_counter() - start) * 1000,
            response_length=len(answer), exception=error, context={})
"""


def run_locust(
    locust: str, target: str, payloads: list[bytes], users: int, seconds: float
) -> dict[str, float]:
    """Locust headless; returns its aggregated requests/s, failures and median/p99 (ms)."""
    import base64
    import time

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "locustfile.py").write_text(LOCUSTFILE)
        (folder / "payloads.txt").write_text(
            "\n".join(base64.b64encode(p).decode() for p in payloads)
        )
        env = {**os.environ, "LT_TARGET": target, "LT_PAYLOADS": str(folder / "payloads.txt")}
        command = [
            locust, "-f", str(folder / "locustfile.py"), "--headless", "--users", str(users),
            "--spawn-rate", str(users), "--run-time", f"{int(seconds)}s", "--reset-stats",
            "--csv", str(folder / "out"), "--only-summary", "--loglevel", "WARNING",
        ]  # fmt: skip
        cpu0 = os.times()
        t0 = time.monotonic()
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        wall = time.monotonic() - t0
        cpu1 = os.times()
        with (folder / "out_stats.csv").open() as f:
            row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    child_cpu = (cpu1.children_user - cpu0.children_user) + (
        cpu1.children_system - cpu0.children_system
    )
    return {
        "throughput_rps": float(row["Requests/s"]),
        "requests": float(row["Request Count"]),
        "failures": float(row["Failure Count"]),
        "p50_ms": float(row["50%"]),
        "p99_ms": float(row["99%"]),
        "client_cpu_percent": 100 * child_cpu / wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--model-repo", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--users", type=int, default=8, help="concurrency of both tools")
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--locust", default="/tmp/locust-venv/bin/locust")
    parser.add_argument("--client-cpu", type=int, default=None,
                        help="pin both load generators to this CPU core")  # fmt: skip
    args = parser.parse_args(argv)
    if args.client_cpu is not None:
        os.sched_setaffinity(0, {args.client_cpu})

    from bertrec.bench.loadtest.recorder import summarize
    from bertrec.bench.loadtest.runner import LoadSpec, run_step
    from bertrec.bench.loadtest.workload import Limits, build_pools, inputs_from_version
    from bertrec.repository.versions import resolve_version

    mix = {"recommend": 1.0}
    inputs = inputs_from_version(resolve_version(args.model_repo, args.model), Limits())
    payloads = build_pools(inputs, mix, k=10, seed=0)["recommend"]
    spec = LoadSpec(args.target, mix, duration_s=args.duration_s, warmup_s=2.0,
                    concurrency=args.users, progress=False)  # fmt: skip
    step = run_step(spec, {"recommend": payloads})
    ours = summarize(step.calls, step.window_s)
    theirs = run_locust(args.locust, args.target, payloads, args.users, args.duration_s + 2)
    ratio = ours.throughput_rps / max(theirs["throughput_rps"], 1e-9)
    p = ours.latency.percentiles_ms
    print(f"bertrec loadtest: {ours.throughput_rps:.1f} q/s, p50 {p['p50']:.2f} ms, "
          f"p99 {p['p99']:.2f} ms, errors {ours.error_count}, "
          f"client CPU {step.client_cpu_percent:.0f}%")  # fmt: skip
    print(f"locust:           {theirs['throughput_rps']:.1f} q/s, p50 {theirs['p50_ms']:.0f} ms, "
          f"p99 {theirs['p99_ms']:.0f} ms, failures {theirs['failures']:.0f}, "
          f"client CPU {theirs['client_cpu_percent']:.0f}%")  # fmt: skip
    within = abs(ratio - 1) <= 0.10
    print(f"ratio loadtest/locust: {ratio:.3f} ({'within' if within else 'OUTSIDE'} 10%)")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"generators on CPUs {sorted(os.sched_getaffinity(0))}")  # fmt: skip
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
