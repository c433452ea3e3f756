"""A benchmark's server subprocess: started, its ports read from what it prints, stopped.

Benchmarks (server, overload, swap, explain, request_memory) run each server, `bertrec serve`
or bench/server.py's echo servers, in a process of its own, so its CPU and memory can be
measured apart from the load generator's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path


class Spawned:
    """A server subprocess whose port is read from its first "port N"/"grpc HOST:N" line, and
    its metrics port (`bertrec serve` only, else None) from the "metrics HOST:N" on that line."""

    PORT = re.compile(r"(?:^port (\d+)|grpc \S+:(\d+) )")
    METRICS_PORT = re.compile(r" metrics \S+:(\d+)")
    WORKER = re.compile(r"worker (\d+) pid \d+ serving, its own metrics on (\S+):(\d+)")

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, cpus: set[int] | None = None
    ) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
        if cpus:  # before the server starts its threads: they inherit the affinity
            os.sched_setaffinity(self.proc.pid, cpus)
        self.metrics_port: int | None = None
        # `bertrec serve --workers N`: each worker's own /metrics, by slot (`wait_ready`).
        self.worker_metrics_urls: dict[int, str] = {}
        self.port = self._read_port()

    def _read_port(self) -> int:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            match = self.PORT.search(line)
            if match:
                metrics = self.METRICS_PORT.search(line)
                self.metrics_port = int(metrics.group(1)) if metrics else None
                return int(match.group(1) or match.group(2))
        raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")

    def wait_ready(self) -> None:
        """Block until a `bertrec serve` process prints its ready line (or exits)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            worker = self.WORKER.search(line)
            if worker:
                host, port = worker.group(2), worker.group(3)
                self.worker_metrics_urls[int(worker.group(1))] = f"http://{host}:{port}/metrics"
            if "ready on" in line:
                return
        raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
