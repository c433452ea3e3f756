"""Request-body memory: the server's peak RSS when many large requests arrive at once.

    python -m bertrec.bench.request_memory [--calls 400] [--request-bytes 3900000]
        [-- extra `bertrec serve` flags, e.g. --max-inflight-request-bytes 100000000000]

One `bertrec serve` process (a tiny random-weight model exported to a temporary repository),
whose encoder holds every RecommendForText call for up to 3 s (`--encoder-max-queue-delay-us`
3000000, batches of up to 512), so calls stay in flight together. One client sends `--calls`
calls at once, each a valid request padded to `--request-bytes` with an unknown field (servers
keep unknown fields, so the padding costs what a real large request would). Prints one JSON
line: idle and peak RSS (VmRSS before, VmHWM after), and the status codes. Compare the default
byte budget (`max_inflight_request_bytes`, 256 MiB) with a huge one passed after `--`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

HOLD_FLAGS = (
    "--encoder-max-queue-delay-us", "3000000",
    "--encoder-max-batch-size", "512",
    "--encoder-max-queue-size", "4096",
)  # fmt: skip


def padded_request(size: int) -> bytes:
    """A RecommendForText request of about `size` bytes (a short text, then padding)."""
    from bertrec.v1 import recommender_pb2 as pb

    request = pb.RecommendForTextRequest(text="a quiet film", k=3).SerializeToString()
    return with_unknown_field(request, size)


def with_unknown_field(request: bytes, size: int, field: int = 1000) -> bytes:
    """`request` plus an unknown length-delimited field `field` of `size` zero bytes.

    Servers keep unknown fields (forward compatibility), so this is a valid request of any
    size we like; the transport tests pad requests the same way.
    """
    return request + varint(field << 3 | 2) + varint(size) + b"\0" * size


def varint(value: int) -> bytes:
    """`value` as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def status_mb(pid: int, field: str) -> int:
    """A memory line of /proc/<pid>/status (VmRSS, VmHWM), in MiB."""
    from bertrec.bench.common import proc_memory_kib

    return (proc_memory_kib(pid, field) or 0) // 1024


def export_tiny_model(root: Path) -> Path:
    """A repository holding version 1 of `memory`, the tiny random-weight model."""
    from bertrec.bench.overload_model import write_trained_output
    from bertrec.export.onnx_export import export_model

    repo = root / "repo"
    export_model(write_trained_output(root / "trained", "tiny", 200, 50, 16), repo, "memory")
    return repo


def send_at_once(port: int, request: bytes, calls: int) -> Counter[str]:
    """Send `calls` copies of `request` together; the count of each status code."""
    import grpc

    codes: Counter[str] = Counter()
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        method = channel.unary_unary("/bertrec.v1.RecommenderService/RecommendForText")
        futures = [method.future(request, timeout=60) for _ in range(calls)]
        for future in futures:
            try:
                future.result()
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
    return codes


def measure(repo: Path, calls: int, request_bytes: int, serve_flags: Sequence[str]) -> dict:
    command = [
        sys.executable, "-m", "bertrec", "serve", "--model-repo", str(repo), "--model", "memory",
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
        "--workers", "1", *HOLD_FLAGS, *serve_flags,
    ]  # fmt: skip
    from bertrec.bench.spawned import Spawned

    server = Spawned("memory-server", command, repo.parent)
    try:
        server.wait_ready()
        idle_mb = status_mb(server.proc.pid, "VmRSS")
        request = padded_request(request_bytes)
        start = time.monotonic()
        codes = send_at_once(server.port, request, calls)
        return {
            "calls": calls,
            "request_bytes": len(request),
            "serve_flags": list(serve_flags),
            "idle_rss_mb": idle_mb,
            "peak_rss_mb": status_mb(server.proc.pid, "VmHWM"),
            "codes": dict(codes),
            "seconds": round(time.monotonic() - start, 1),
        }
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--request-bytes", type=int, default=3_900_000)
    parser.add_argument("serve_flags", nargs="*", help="extra `bertrec serve` flags (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bertrec-memory-") as root:
        repo = export_tiny_model(Path(root))
        result = measure(repo, args.calls, args.request_bytes, args.serve_flags)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
