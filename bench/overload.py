"""Overload benchmark: goodput, latency and refusals from 0.5x to 4x of measured capacity.

    python -m bertrec.bench.overload [--out bench/results/overload.json] [--quick]

One bounded run on loopback (about four minutes; `--quick` about one):

1. A model version in a temporary repository: a BERT encoder (`--bert pretrained`, the demo's
   all-MiniLM-L6-v2, or `--bert tiny`, the random-weight test BERT) with random factors for
   `--items` items, exported by the real exporter (or `--model-repo/--model` to use yours).
2. One `bertrec serve` process with its default settings (CPU provider).
3. Per RPC (RecommendForText and Recommend): capacity = OK answers/s of a closed loop with
   `--capacity-concurrency` callers (best of `--capacity-rounds`); then open-loop Poisson
   steps at `--factors` x capacity with a per-call deadline of `--deadline-ms`, each bounded
   in time and count. Steps reuse `bertrec loadtest`'s generator (`bench/loadtest/runner.py`):
   latency counts from the intended send time, so a late generator shows as latency, not as a
   lower load.

Per step: offered and answered rates, goodput (OK answers/s, all within the deadline), p99 of
the OK calls, the share of calls refused at once (RESOURCE_EXHAUSTED) and of calls that ran out
of time (DEADLINE_EXCEEDED), the server's peak RSS, and from the server's /metrics: calls shed
by a batcher, texts encoded and queued work dropped. "Wasted" encoder work is texts encoded
minus RecommendForText calls answered OK.

The generator shares the machine's cores with the server (its CPU share is recorded), so on a
small machine the highest steps also measure the generator; the JSON keeps every number.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bertrec.bench.common import (
    environment,
    loadavg,
    markdown_table,
    proc_memory_kib,
    write_json,
)
from bertrec.bench.loadtest.recorder import summarize
from bertrec.bench.loadtest.runner import LoadSpec, run_step
from bertrec.bench.loadtest.workload import Limits, build_pools, inputs_from_version
from bertrec.bench.server import process_cpu_s
from bertrec.bench.spawned import Spawned

RPCS = ("recommend_for_text", "recommend")
MODEL = "overload"
CAPACITY_WARMUP_S = 4.0


@dataclass(frozen=True)
class Step:
    """One load step against one RPC."""

    rpc: str
    factor: float  # offered load / capacity (0 for the capacity measurement)
    offered_rps: float
    requests: int
    goodput_rps: float
    p99_ms: float
    resource_exhausted: float  # share of requests
    deadline_exceeded: float
    other_errors: float
    errors: dict[str, int]  # every error status, by name
    rss_peak_mb: float
    server_cpu_s: float
    client_cpu_percent: float
    shed: float  # calls refused by a batcher's expected-wait admission (server /metrics)
    encoded: float  # texts run through the encoder
    dropped: float  # queued items dropped (expired or cancelled) before computing
    handled: float  # calls the server's handlers finished, any status (the rest never got one)


class RssSampler:
    """Peak resident memory of a process, sampled every `period_s` while running."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        self.pid, self.period_s, self.peak_kb = pid, period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, proc_memory_kib(self.pid) or 0)
            if self._stop.wait(self.period_s):
                return


def server_counters(metrics_url: str) -> dict[str, float]:
    """Shed, encoded, dropped and handled totals from the server's /metrics (summed over labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    totals = {"shed": 0.0, "encoded": 0.0, "dropped": 0.0, "handled": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "bertrec_rejected_total":
                totals["shed"] += s.value
            elif s.name == "bertrec_batch_size_sum" and s.labels.get("batcher") == "encoder":
                totals["encoded"] += s.value
            elif s.name == "bertrec_dropped_total":
                totals["dropped"] += s.value
            elif s.name == "grpc_server_handled_total" and s.labels.get("grpc_method") in (
                "Recommend",
                "RecommendForText",
            ):
                totals["handled"] += s.value
    return totals


def measure(
    spec: LoadSpec, pools: dict[str, list[bytes]], server: Spawned, metrics_url: str,
    rpc: str, factor: float,
) -> Step:  # fmt: skip
    """Run one step and summarise it with the server's side of the story."""
    before, cpu0 = server_counters(metrics_url), process_cpu_s(server.proc.pid)
    with RssSampler(server.proc.pid) as rss:
        result = run_step(spec, {rpc: pools[rpc]})
    after, cpu1 = server_counters(metrics_url), process_cpu_s(server.proc.pid)
    s = summarize(result.calls, result.window_s)
    n = max(s.requests, 1)
    re_, de = s.errors.get("RESOURCE_EXHAUSTED", 0), s.errors.get("DEADLINE_EXCEEDED", 0)
    return Step(
        rpc=rpc, factor=factor, offered_rps=s.offered_rps, requests=s.requests,
        goodput_rps=s.throughput_rps, p99_ms=s.latency.percentiles_ms["p99"],
        resource_exhausted=re_ / n, deadline_exceeded=de / n,
        other_errors=(s.error_count - re_ - de) / n, errors=s.errors,
        rss_peak_mb=rss.peak_kb / 1024,
        server_cpu_s=cpu1 - cpu0, client_cpu_percent=result.client_cpu_percent,
        **{k: after[k] - before[k] for k in ("shed", "encoded", "dropped", "handled")},
    )  # fmt: skip


def run_rpc(
    rpc: str, args: argparse.Namespace, pools: dict[str, list[bytes]], server: Spawned,
    metrics_url: str,
) -> list[Step]:  # fmt: skip
    """Capacity (closed loop), then the open-loop steps at each factor of it."""
    base = LoadSpec(target=server.target, mix={rpc: 1.0}, duration_s=args.duration_s,
                    warmup_s=args.warmup_s, deadline_s=args.deadline_ms / 1000,
                    max_in_flight=args.max_in_flight, progress=False)  # fmt: skip
    # A long warm-up: with slow calls (seconds each in a closed loop on MiniLM), calls sent
    # during warm-up but answered in the window would make a short window under-count.
    closed = replace(base, concurrency=args.capacity_concurrency, deadline_s=30.0,
                     warmup_s=max(args.warmup_s, CAPACITY_WARMUP_S))  # fmt: skip
    # The best of a few rounds: other work on a shared machine only ever lowers a round.
    rounds = [measure(closed, pools, server, metrics_url, rpc, 0.0)
              for _ in range(args.capacity_rounds)]  # fmt: skip
    capacity = max(rounds, key=lambda s: s.goodput_rps)
    # --capacity-rps: the same offered loads for two builds, whatever each one measured.
    scale = args.capacity_rps or capacity.goodput_rps
    print(f"{rpc}: capacity {capacity.goodput_rps:.0f} q/s", file=sys.stderr, flush=True)
    steps = [capacity]
    for factor in args.factors:
        rate = factor * scale
        spec = replace(base, rate_rps=rate, max_requests=int(rate * args.duration_s) + 1)
        time.sleep(args.pause_s)  # let the previous step's queues drain
        step = measure(spec, pools, server, metrics_url, rpc, factor)
        print(f"  {factor:g}x: {step}", file=sys.stderr, flush=True)
        steps.append(step)
    return steps


def table(steps: Sequence[Step]) -> str:
    """The README table: one row per open-loop step, capacity rows marked."""
    capacity = {s.rpc: s.goodput_rps for s in steps if s.factor == 0}
    rows = [
        [s.rpc, "capacity" if s.factor == 0 else f"{s.factor:g}x", s.offered_rps,
         s.goodput_rps, s.goodput_rps / capacity[s.rpc], s.p99_ms,
         f"{100 * s.resource_exhausted:.1f}%", f"{100 * s.deadline_exceeded:.1f}%",
         f"{100 * s.other_errors:.1f}%", s.rss_peak_mb]
        for s in steps
    ]  # fmt: skip
    headers = ["RPC", "load", "offered q/s", "goodput q/s", "goodput / capacity",
               "p99 ms (OK)", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "other errors",
               "server RSS peak MB"]  # fmt: skip
    return markdown_table(headers, rows)


def build_repo(root: Path, bert: str, n_items: int, n_users: int, dim: int) -> Path:
    """A repository with one exported version of `MODEL` (random factors, a real BERT)."""
    from bertrec.bench.overload_model import write_trained_output
    from bertrec.export.onnx_export import export_model

    trained = write_trained_output(root / "trained", bert, n_items, n_users, dim)
    repo = root / "repo"
    export_model(trained, repo, MODEL)
    return repo


def start_server(repo: Path, model: str, log_dir: Path) -> Spawned:
    argv = [sys.executable, "-m", "bertrec", "serve", "--model-repo", str(repo),
            "--model", model, "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
            "--providers", "CPUExecutionProvider", "--workers", "1"]  # fmt: skip
    server = Spawned("server", argv, log_dir)
    server.wait_ready()
    return server


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = environment()  # load average before, not after
    with tempfile.TemporaryDirectory(prefix="bertrec-bench-overload-") as tmp:
        root = Path(tmp)
        start = time.monotonic()
        repo, model = args.model_repo, args.model
        if repo is None:
            repo, model = build_repo(root, args.bert, args.items, args.users, args.dim), MODEL
        build_s = time.monotonic() - start
        from bertrec.repository.versions import resolve_version

        inputs = inputs_from_version(resolve_version(repo, model, None), Limits(1000, 1000, 64,
                                                                                16384))  # fmt: skip
        pools = build_pools(inputs, {r: 1.0 for r in args.rpcs}, k=10, seed=0)
        server = start_server(repo, model, root)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        try:
            steps = [s for rpc in args.rpcs for s in run_rpc(rpc, args, pools, server, url)]
        finally:
            server.stop()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {
        "environment": env,
        "settings": {**settings, "build_s": round(build_s, 1)},
        "steps": [asdict(s) for s in steps],
        "table": table(steps),
        "loadavg_end": loadavg(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/overload.json"))
    p.add_argument("--rpcs", default=",".join(RPCS), help="default %(default)s")
    p.add_argument("--factors", default="0.5,1,1.5,2,3,4", help="offered load / capacity")
    p.add_argument("--duration-s", type=float, default=8.0, help="measured seconds per step")
    p.add_argument("--warmup-s", type=float, default=1.0, help="sent and discarded per step")
    p.add_argument("--deadline-ms", type=float, default=2000.0, help="per-call deadline")
    p.add_argument("--capacity-concurrency", type=int, default=64)
    p.add_argument("--capacity-rounds", type=int, default=2, help="closed-loop rounds (best)")
    p.add_argument(
        "--capacity-rps",
        type=float,
        default=None,
        help="take this as the capacity (compare two builds at the same loads)",
    )
    p.add_argument("--max-in-flight", type=int, default=8192, help="open-loop cap")
    p.add_argument("--pause-s", type=float, default=2.0, help="idle time between steps")
    p.add_argument(
        "--bert",
        choices=("tiny", "pretrained"),
        default="pretrained",
        help="the demo's all-MiniLM-L6-v2 (default) or the random-weight test BERT",
    )
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--model-repo", type=Path, default=None, help="serve this repository")
    p.add_argument("--model", default=None, help="with --model-repo")
    p.add_argument("--quick", action="store_true", help="factors 1,4 and 3 s steps")
    args = p.parse_args(argv)
    if (args.model_repo is None) != (args.model is None):
        p.error("give --model-repo and --model together")
    if args.quick:
        args.factors, args.duration_s, args.pause_s = "1,4", 3.0, 1.0
    args.rpcs = [r.strip() for r in args.rpcs.split(",") if r.strip()]
    args.factors = [float(f) for f in args.factors.split(",")]
    if any(r not in RPCS for r in args.rpcs) or any(f <= 0 for f in args.factors):
        p.error(f"--rpcs must name some of {', '.join(RPCS)}; --factors must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    write_json(args.out, result)
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
