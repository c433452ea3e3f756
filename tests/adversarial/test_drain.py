"""Graceful drain under encoder load (issue 12, item 10): a real `bertrec serve` process.

Many RecommendForText calls are sent at once and the signal arrives while most are still
queued (in the encoder, in the handler pool, or not yet taken from the gRPC core): every one of
them must still be answered OK, and the process must exit 0. Before the fix, SIGTERM left up to
182 of 200 CANCELLED (the gRPC core cancels calls it has not handed to Python yet), and SIGHUP
killed the process outright.
"""

from __future__ import annotations

import signal
import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest
from server_harness import ServerProcess, start_server

from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

CALLS = 200
TEXT = "a fast paced thriller with a detective chasing an art thief across Europe " * 5
FLAGS = (
    "--encoder-max-batch-size", "1",  # one text per batch: the burst takes a while to encode
    "--grace-period-s", "30",
    "--max-text-bytes", "1000",
)  # fmt: skip


def signal_with_calls_in_flight(server: ServerProcess, sig: signal.Signals) -> tuple[Counter, int]:
    """Send `CALLS` calls, deliver `sig` once the first is answered; (status counts, unfinished
    calls when the signal was sent)."""
    request = pb.RecommendForTextRequest(text=TEXT, k=5)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        stub.RecommendForText(request, timeout=30)  # connected and warm
        first = threading.Event()
        futures = [stub.RecommendForText.future(request, timeout=60) for _ in range(CALLS)]
        for future in futures:
            future.add_done_callback(lambda _f: first.set())
        assert first.wait(30)
        server.proc.send_signal(sig)
        unfinished = sum(not f.done() for f in futures)
        for future in futures:
            future.exception()  # waits for the outcome
        codes = Counter(f.code().name for f in futures)
    return codes, unfinished


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_under_encoder_load_drains_every_call_then_exits_0(
    model_repo: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    server = start_server(model_repo, tmp_path, *FLAGS)
    try:
        server.wait_serving()
        codes, unfinished = signal_with_calls_in_flight(server, sig)
        returncode = server.proc.wait(60)
    finally:
        server.terminate()
    assert unfinished >= 10, "the signal came after the calls had finished: nothing was tested"
    assert codes == Counter({"OK": CALLS}), (codes, server.stderr()[-2000:])
    assert returncode == 0, server.stderr()[-2000:]
    log = server.stderr()
    assert f"{sig.name}: draining" in log
    assert "drain: quiet" in log and "stopped" in log
