"""Start-up, readiness and graceful shutdown of dedicated server processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import MODEL, metric_value, start_server

from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

STATUS = health_pb2.HealthCheckResponse.ServingStatus.Name


def test_not_serving_until_ready_then_graceful_sigterm_with_calls_in_flight(
    model_repo: Path, tmp_path: Path, ref
) -> None:
    server = start_server(
        model_repo, tmp_path,
        "--warmup-iterations", "300",  # a start-up window long enough to observe
        "--ranker-max-queue-delay-us", "2000000",  # calls wait 2 s for their batch
        "--grace-period-s", "20",
    )  # fmt: skip
    try:
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.RecommenderServiceStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
            assert STATUS(next(watch).status) == "NOT_SERVING"
            try:
                stub.Recommend(pb.RecommendRequest(user_id="u0001", k=3), timeout=5)
                raise AssertionError("Recommend answered before the model was ready")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "loading" in exc.details()
            assert STATUS(next(watch).status) == "SERVING"

            users = [f"u{i:04d}" for i in range(20)]
            calls = [stub.Recommend.future(pb.RecommendRequest(user_id=u, k=4), timeout=60)
                     for u in users]  # fmt: skip
            depth = {"model": MODEL, "batcher": "ranker"}
            deadline = time.monotonic() + 5
            while metric_value(server.metrics_url, "bertrec_queue_depth", **depth) < len(users):
                assert time.monotonic() < deadline, "calls never queued"
                time.sleep(0.01)
            server.proc.send_signal(signal.SIGTERM)

            assert STATUS(next(watch).status) == "NOT_SERVING"
            watch.cancel()
            for user, call in zip(users, calls, strict=True):
                items = [i.item_id for i in call.result(timeout=30).items]
                assert items == [i for i, _ in ref.recommend(user, 4)]
        # Draining, the server still answers new calls (a pod keeps receiving them until its
        # endpoints are gone) and stops once none has been in flight for a moment.
        assert server.proc.wait(30) == 0
        assert "stopped" in server.stderr()
        with grpc.insecure_channel(server.target) as channel:
            try:
                pb_grpc.RecommenderServiceStub(channel).GetModelInfo(
                    pb.GetModelInfoRequest(), timeout=5
                )
                raise AssertionError("a call was answered after the server stopped")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.terminate()


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bertrec", "serve", *argv],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_bad_flag_value_exits_2_with_one_line(model_repo: Path) -> None:
    done = run_cli("--model-repo", str(model_repo), "--model", MODEL, "--grpc-port", "70000")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bertrec serve: error: grpc_port=70000 (from --grpc-port): must be a port number "
        "0..65535 (0 = pick a free one)"
    ]


def test_missing_version_exits_2_naming_what_exists(model_repo: Path) -> None:
    done = run_cli(
        "--model-repo", str(model_repo), "--model", MODEL, "--version", "9",
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
    )  # fmt: skip
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("bertrec serve: error: ")
    assert "has no version 9 (has 1)" in last


def test_a_second_server_cannot_take_the_health_port(model_repo: Path, tmp_path: Path) -> None:
    """The health-only port refuses a second single-worker server, as the gRPC port does:
    sharing it (grpc's default SO_REUSEPORT) would answer probes for either server."""
    from tls_material import free_port

    health_port = str(free_port())
    first = start_server(model_repo, tmp_path / "first", "--health-port", health_port)
    try:
        first.wait_serving()
        done = run_cli(
            "--model-repo", str(model_repo), "--model", MODEL, "--workers", "1",
            "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
            "--health-port", health_port,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("bertrec serve: error: ") and health_port in last, last
    finally:
        first.terminate()
