"""Helpers to run the real server as a subprocess, and independent numpy reference answers."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertrec.client import RecommenderClient

MODEL = "tiny"
READY_TIMEOUT_S = 90.0
PORTS = re.compile(r"grpc (\S+):(\d+) metrics (\S+):(\d+)")

# Settings of the shared server, chosen so each error path can be hit deterministically:
# - a 200 ms encoder window (a 30 ms deadline always expires while the text is queued),
# - an encoder queue of 8 texts while EmbedText accepts 12 (10 texts -> RESOURCE_EXHAUSTED).
SHARED_FLAGS = (
    "--max-k", "50",
    "--max-item-ids", "20",
    "--max-texts", "12",
    "--max-text-bytes", "400",
    "--encoder-max-batch-size", "16",
    "--encoder-max-queue-size", "8",
    "--encoder-max-queue-delay-us", "200000",
    "--ranker-max-queue-delay-us", "2000",
    "--grpc-max-workers", "32",
)  # fmt: skip


def metric_value(url: str, name: str, **labels: str) -> float:
    """The value of one sample (`name` with exactly `labels`) scraped from a /metrics URL;
    0.0 when absent (a counter never incremented has no sample yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def handled_ok(url: str, method: str, service: str = "bertrec.v1.RecommenderService") -> float:
    """Unary calls of `method` the server at this /metrics URL answered OK."""
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}
    return metric_value(url, "grpc_server_handled_total", **labels, grpc_code="OK")


@dataclass
class ServerProcess:
    """A running `bertrec serve` subprocess and how to reach it."""

    proc: subprocess.Popen[str]
    stderr_path: Path
    port: int = 0
    metrics_port: int = 0
    stdout_lines: queue.Queue[str] = field(default_factory=queue.Queue)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for_line(self, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.stdout_lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = pattern.search(line)
            if match:
                return match
        raise AssertionError(f"server never printed {pattern.pattern!r}:\n{self.stderr()[-3000:]}")

    def wait_serving(self, timeout_s: float = READY_TIMEOUT_S, **client: Any) -> None:
        """Wait for SERVING; `client` holds RecommenderClient options (tls=, token=, ...)."""
        with RecommenderClient(self.target, **client) as checker:
            checker.wait_until_serving(timeout_s)

    def terminate(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_server(
    repo: Path,
    log_dir: Path,
    *flags: str,
    import_time: bool = False,
    python: str = sys.executable,
    cwd: Path | None = None,
) -> ServerProcess:
    """Start `python -m bertrec serve` on free loopback ports; returns once the ports are known.

    `python` and `cwd` let a test serve from another environment (an installed wheel) and from a
    folder outside the source tree, so nothing is imported from the checkout by accident.
    One worker process unless `flags` name `--workers`: the server's default (one per usable
    CPU) would start one per core of the test machine for every test's server.
    """
    if not any(f == "--workers" or f.startswith("--workers=") for f in flags):
        flags = ("--workers", "1", *flags)
    command = [python]
    if import_time:
        command += ["-X", "importtime"]
    command += [
        "-m", "bertrec", "serve",
        "--model-repo", str(repo), "--model", MODEL,
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
        *flags,
    ]  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = log_dir / f"server-{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTREC_")}
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, bufsize=1, cwd=cwd
        )
    server = ServerProcess(proc, stderr_path)
    threading.Thread(target=_pump, args=(proc, server.stdout_lines), daemon=True).start()
    match = server.wait_for_line(PORTS, READY_TIMEOUT_S)
    server.port, server.metrics_port = int(match.group(2)), int(match.group(4))
    return server


@contextmanager
def serving(
    repo: Path,
    log_dir: Path,
    *flags: str,
    client: dict[str, Any] | None = None,
    **options: Any,
) -> Iterator[ServerProcess]:
    """`start_server`, wait until health is SERVING (checked with a client made from `client`,
    e.g. {"tls": ca_pem} for a TLS server), and terminate on the way out."""
    server = start_server(repo, log_dir, *flags, **options)
    try:
        server.wait_serving(**(client or {}))
        yield server
    finally:
        server.terminate()


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)


class Reference:
    """Independent numpy answers computed from the exported arrays (np.load, no server code)."""

    def __init__(self, version_dir: Path) -> None:
        import json

        import numpy as np

        def load(name: str) -> np.ndarray:
            return np.load(version_dir / name, allow_pickle=False)

        self.np = np
        self.dir = version_dir
        self.manifest = json.loads((version_dir / "manifest.json").read_text())
        self.global_mean = float(self.manifest["scoring"]["global_mean"])
        self.user_ids = [str(u) for u in load("user_ids.npy")]
        self.item_ids = [str(i) for i in load("item_ids.npy")]
        self.users = load("user_factors.npy").astype(np.float64)
        self.items = load("item_factors.npy").astype(np.float64)
        self.user_bias = load("user_bias.npy").astype(np.float64)
        self.item_bias = load("item_bias.npy").astype(np.float64)
        self.rank_bias = load("item_rank_bias.npy").astype(np.float64)
        self.text_to_user = load("text_to_user.npy").astype(np.float64)
        self.indptr = load("rated_indptr.npy")
        self.indices = load("rated_indices.npy")

    def rated(self, user_id: str) -> list[str]:
        u = self.user_ids.index(user_id)
        return [self.item_ids[i] for i in self.indices[self.indptr[u] : self.indptr[u + 1]]]

    def top(
        self, vector, k: int, skip: set[str] = frozenset(), only: set[str] | None = None
    ) -> list[tuple[str, float]]:
        """Items by dot(vector, item) + rank bias, best first, ties by lower row."""
        scores = self.items @ vector + self.rank_bias
        rows = [
            r
            for r in range(len(self.item_ids))
            if self.item_ids[r] not in skip and (only is None or self.item_ids[r] in only)
        ]
        rows.sort(key=lambda r: (-scores[r], r))
        return [(self.item_ids[r], float(scores[r])) for r in rows[:k]]

    def recommend(
        self,
        user_id: str,
        k: int,
        exclude_rated: bool = True,
        include: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
    ):
        u = self.user_ids.index(user_id)
        skip = set(exclude) | (set(self.rated(user_id)) if exclude_rated else set())
        return self.top(self.users[u], k, skip, set(include) if include else None)

    def rating(self, user_id: str | None, item_id: str, vector=None) -> float:
        i = self.item_ids.index(item_id)
        if user_id is None:
            return float(self.global_mean + self.item_bias[i] + self.items[i] @ vector)
        u = self.user_ids.index(user_id)
        return float(
            self.global_mean + self.user_bias[u] + self.item_bias[i] + self.items[i] @ self.users[u]
        )

    def similar(self, item_id: str, k: int) -> list[tuple[str, float]]:
        np = self.np
        unit = self.items / np.maximum(np.linalg.norm(self.items, axis=1, keepdims=True), 1e-12)
        i = self.item_ids.index(item_id)
        cos = unit @ unit[i]
        rows = sorted((r for r in range(len(cos)) if r != i), key=lambda r: (-cos[r], r))
        return [(self.item_ids[r], float(cos[r])) for r in rows[:k]]

    def encode(self, texts: list[str], encoder_file: str):
        """The exported ONNX encoder run directly with onnxruntime on one batch of texts."""
        import onnxruntime as ort

        from bertrec.text import TextTokenizer

        max_len = int(self.manifest["dims"]["max_seq_len"])
        tokenizer = TextTokenizer.from_file(self.dir / "tokenizer.json", max_len)
        session = ort.InferenceSession(
            str(self.dir / encoder_file), providers=["CPUExecutionProvider"]
        )
        wanted = {i.name for i in session.get_inputs()}
        feed = {k: v for k, v in tokenizer(texts).as_feed().items() if k in wanted}
        return session.run(None, feed)[0].astype(self.np.float64)
