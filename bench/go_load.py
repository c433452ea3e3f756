"""The Go load generator (`clients/go/cmd/bertrec-loadgen`) for `bench.server`'s Recommend rows.

Why: the Python generator (grpc.aio) spends about as much CPU per call as the server it measures,
so on a 2-core machine it takes the core a second worker process needs; grpc-go spends a
fraction of that. It is built from the checkout with `clients/go/build.sh` (Debian's Go and
grpc-go sources, offline), so it is available only where the Go toolchain is.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "clients" / "go" / "build.sh"


@dataclass(frozen=True)
class GoRun:
    """One closed-loop run, as the generator reports it."""

    calls: int
    errors: int
    elapsed_s: float
    p50_ms: float
    p99_ms: float


def build_go_loadgen(out_dir: Path) -> Path:
    """Build the generator into `out_dir`; its path. Raises RuntimeError with the build's
    stderr when the toolchain is missing or the build fails."""
    if not BUILD_SCRIPT.is_file():
        raise RuntimeError(f"no {BUILD_SCRIPT}: the Go generator needs a source checkout")
    done = subprocess.run(
        ["bash", str(BUILD_SCRIPT), str(out_dir)], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the Go load generator failed:\n{done.stderr[-2000:]}")
    return out_dir / "bertrec-loadgen"


def run_go_load(
    binary: Path, target: str, concurrency: int, duration_s: float, channels: int, users: int,
    k: int = 10, user_format: str = "u%07d",
) -> GoRun:  # fmt: skip
    """Recommend for random users `user_format % n`, n below `users` (the synthetic versions'
    ids by default), `concurrency` calls in flight over `channels` connections, for
    `duration_s` (no warm-up: the caller runs one first)."""
    command = [
        str(binary), "--target", target, "--concurrency", str(concurrency),
        "--channels", str(channels), "--duration-s", str(duration_s), "--warmup-s", "0",
        "--users", str(users), "--k", str(k), "--user-format", user_format,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 120)
    if done.returncode != 0:
        raise RuntimeError(f"bertrec-loadgen failed ({done.returncode}): {done.stderr[-2000:]}")
    out = json.loads(done.stdout)
    return GoRun(out["calls"], out["errors"], out["elapsed_s"], out["p50_ms"], out["p99_ms"])
